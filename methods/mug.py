"""MUG (Zhao et al., TMLR 2024, Algorithm 1): MAE plus a caption decoder on the masked latent.

loss = recon_weight * MAE pixel loss + cap_weight * captioning loss. By default the caption
decoder cross-attends to the latent of the MASKED image (visible tokens only), as in the paper;
``cap_latent="full"`` instead encodes the whole image a second time and captions from that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mugbench.method import check_range
from mugbench.methods.cap import CaptioningMixin, caption_decoder_for, encode_tokens
from mugbench.methods.mae import MAE
from mugbench.models.text import caption_loss
from mugbench.models.vit import masked_encode
from mugbench.registry import register_method

CAP_LATENTS = ("visible", "full")


@register_method("mug")
class MUG(CaptioningMixin, MAE):
    """MUlti-modal Generator: reconstruct the image and generate its caption from one latent."""

    @dataclass
    class Options(MAE.Options):
        """MAE's options plus the two loss weights, the latent the captioner reads (``visible``:
        the masked image's, the paper's choice; ``full``: a second pass on the whole image) and the
        caption decoder's size (``None`` = the study's text-tower size)."""

        recon_weight: float = 1.0
        cap_weight: float = 1.0
        cap_latent: str = "visible"
        cap_width: Optional[int] = None
        cap_layers: Optional[int] = None
        cap_heads: Optional[int] = None

        def __post_init__(self):
            super().__post_init__()
            check_range("mug", "recon_weight", self.recon_weight, 0.0, 100.0)
            check_range("mug", "cap_weight", self.cap_weight, 0.0, 100.0)
            if self.cap_latent not in CAP_LATENTS:
                raise ValueError(f"mug.cap_latent={self.cap_latent!r} is not one of {', '.join(CAP_LATENTS)}")

    needs_text = True
    paradigm = "multi-modal generative"

    def __init__(self, encoder, text, options):
        super().__init__(encoder, text, options)
        self.caption_decoder = caption_decoder_for(encoder, text, options)

    def caption_memory(self, images: torch.Tensor, mask_ratio: Optional[float] = None) -> torch.Tensor:
        """Encoder tokens the caption decoder attends to. By default the latent it was trained on:
        ``visible`` masks at the training ratio (as the paper's released demo does at inference),
        ``full`` encodes every patch."""
        if mask_ratio is None:
            mask_ratio = self.options.mask_ratio if self.options.cap_latent == "visible" else 0.0
        return encode_tokens(self.encoder, images, mask_ratio)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """``loss`` = recon_weight * ``recon`` + cap_weight * ``caption`` (the paper's Algorithm 1)."""
        images, t = batch["image"], self.text_spec
        latent, mask, ids_restore = masked_encode(self.encoder, images, self.options.mask_ratio)
        recon = self.reconstruction_loss(images, latent, mask, ids_restore)
        memory = latent if self.options.cap_latent == "visible" else encode_tokens(self.encoder, images, 0.0)
        cap = caption_loss(self.caption_decoder, memory, batch["text"], t.pad_id, t.eot_id)
        loss = self.options.recon_weight * recon + self.options.cap_weight * cap
        return {"loss": loss, "recon": recon, "caption": cap}
