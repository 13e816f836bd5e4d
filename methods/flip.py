"""FLIP (Li et al., 2023, "Scaling Language-Image Pre-training via Masking"): CLIP whose image
encoder sees only a random subset of the patches during pre-training, and every patch at inference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mugbench.method import check_range
from mugbench.methods.clip import CLIP
from mugbench.models.vit import masked_encode
from mugbench.registry import register_method


@register_method("flip")
class FLIP(CLIP):
    """CLIP whose encoder sees a random (1 - mask_ratio) of the image patches in training, all at eval.

    The image embedding during training is the projected class token of the masked latent;
    ``encode_image`` (zero-shot, retrieval) is CLIP's and encodes the whole image, as FLIP does
    at inference. FLIP's optional final unmasked tuning phase is not part of this method.
    """

    @dataclass
    class Options:
        """FLIP's main setting masks 50% of the patches; CLIP's temperature init 0.07."""

        init_temperature: float = 0.07
        mask_ratio: float = 0.5

        def __post_init__(self):
            check_range("flip", "init_temperature", self.init_temperature, 1e-2, 1.0)  # as clip's
            # At least a few patches must remain; FLIP itself studies ratios up to 0.75.
            check_range("flip", "mask_ratio", self.mask_ratio, 0.0, 0.95)

    def encode_masked_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Joint-space embeddings of images of which only ``1 - mask_ratio`` of the patches are encoded."""
        latent, _, _ = masked_encode(self.encoder, images, self.options.mask_ratio)
        # latent[:, 0] is the class token after the encoder's final norm, the same read-out as
        # CLIP's pooled_features(..., "token"), so mask_ratio=0 reproduces CLIP's embedding.
        z = self.image_proj(latent[:, 0])
        return F.normalize(z, dim=-1) if normalize else z

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """Masked-image and caption embeddings; CLIP's `loss` contrasts them."""
        return {"image": self.encode_masked_image(batch["image"]), "text": self.encode_text(batch["text"])}
