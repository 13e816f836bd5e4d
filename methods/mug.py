"""MUG (Zhao et al., TMLR 2024, Algorithm 1): MAE plus a caption decoder on the masked latent.

loss = recon_weight * MAE pixel loss + cap_weight * captioning loss, where the caption decoder
cross-attends to the latent of the MASKED image (visible tokens only), as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mugbench.method import check_range
from mugbench.methods.mae import MAE
from mugbench.models.text import CaptionDecoder, caption_loss
from mugbench.models.vit import masked_encode
from mugbench.registry import register_method


@register_method("mug")
class MUG(MAE):
    """MUlti-modal Generator: reconstruct the image and generate its caption from one latent."""

    @dataclass
    class Options(MAE.Options):
        """MAE's options plus the two loss weights and the caption decoder's size
        (``None`` = the study's text-tower size)."""

        recon_weight: float = 1.0
        cap_weight: float = 1.0
        cap_width: Optional[int] = None
        cap_layers: Optional[int] = None
        cap_heads: Optional[int] = None

        def __post_init__(self):
            super().__post_init__()
            check_range("mug", "recon_weight", self.recon_weight, 0.0, 100.0)
            check_range("mug", "cap_weight", self.cap_weight, 0.0, 100.0)

    needs_text = True

    def __init__(self, encoder, text, options):
        super().__init__(encoder, text, options)
        self.caption_decoder = CaptionDecoder(
            text, encoder.embed_dim,
            width=options.cap_width or text.width,
            layers=options.cap_layers or text.layers,
            heads=options.cap_heads or text.heads,
        )

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        latent, mask, ids_restore = masked_encode(self.encoder, images, self.options.mask_ratio)
        recon = self.reconstruction_loss(images, latent, mask, ids_restore)
        cap = caption_loss(self.caption_decoder, latent, batch["text"], self.text_spec.pad_id)
        loss = self.options.recon_weight * recon + self.options.cap_weight * cap
        return {"loss": loss, "recon": recon, "caption": cap}
