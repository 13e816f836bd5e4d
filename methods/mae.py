"""MAE (He et al., 2022): reconstruct the pixels of randomly masked patches from the visible ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mugbench.data.transforms import ViewSpec
from mugbench.method import Method, check_range
from mugbench.models.mae_decoder import MaskedDecoder, masked_patch_loss
from mugbench.models.vit import masked_encode, patchify
from mugbench.registry import register_method


@register_method("mae")
class MAE(Method):
    """Masked autoencoder: the encoder sees 25% of the patches, a light decoder predicts the rest."""

    @dataclass
    class Options:
        """MAE's published ViT-B defaults: mask ratio 0.75, decoder 8 x 512, normalised pixels."""

        mask_ratio: float = 0.75
        decoder_width: int = 512
        decoder_depth: int = 8
        decoder_heads: int = 16
        norm_pix_loss: bool = True

        def __post_init__(self):
            check_range("mae", "mask_ratio", self.mask_ratio, 0.0, 0.99)
            check_range("mae", "decoder_depth", self.decoder_depth, 1, 64)

    views = (ViewSpec(scale=(0.2, 1.0)),)  # MAE: RandomResizedCrop(0.2-1) + flip
    needs_text = False

    def __init__(self, encoder, text, options):
        super().__init__(encoder, text, options)
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.decoder = MaskedDecoder(
            encoder.embed_dim, encoder.patch_embed.num_patches, self.patch_size,
            width=options.decoder_width, depth=options.decoder_depth, heads=options.decoder_heads,
            num_prefix_tokens=encoder.num_prefix_tokens,
        )

    def reconstruction_loss(self, images: torch.Tensor, latent, mask, ids_restore) -> torch.Tensor:
        """Pixel loss of the decoder's prediction on the removed patches."""
        pred = self.decoder(latent, ids_restore)
        return masked_patch_loss(pred, patchify(images, self.patch_size), mask, self.options.norm_pix_loss)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        latent, mask, ids_restore = masked_encode(self.encoder, images, self.options.mask_ratio)
        recon = self.reconstruction_loss(images, latent, mask, ids_restore)
        return {"loss": recon, "recon": recon}
