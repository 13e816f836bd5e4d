"""MAE (He et al., 2022): reconstruct the pixels of randomly masked patches from the visible ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mugbench.method import Method, check_range, evaluating
from mugbench.models.mae_decoder import MaskedDecoder, masked_patch_loss
from mugbench.models.vit import masked_encode, patchify, unpatchify
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

    # Trains on the study's base view (data.augment), whose default is MAE's RandomResizedCrop(0.2-1).
    needs_text = False
    paradigm = "single-modal generative"

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

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask_ratio: Optional[float] = None) -> dict[str, torch.Tensor]:
        """Mask ``images [B, 3, H, W]`` at random, predict the removed patches, and return pictures
        in the input's (normalised) pixel space, as in MAE's Fig. 2:

        - ``masked``: the input with removed patches set to 0 (the mean colour after normalisation);
        - ``reconstruction``: the decoder's prediction for every patch;
        - ``pasted``: the input's visible patches with the prediction in the removed ones;
        - ``mask``: ``[B, N]`` patches in row-major order, 1 = removed; ``pixel_mask``: ``[B, 1, H, W]``.

        With ``norm_pix_loss`` the decoder predicts each patch normalised by its own mean and
        variance; a removed patch's statistics are unknown to the model, so (as MAE's visualisation
        does) each prediction is mapped back with the true target patch's mean and variance.
        ``mask_ratio`` defaults to the training ratio; seed torch for a repeatable mask.
        """
        with evaluating(self):
            ratio = self.options.mask_ratio if mask_ratio is None else mask_ratio
            latent, mask, ids_restore = masked_encode(self.encoder, images, ratio)
            pred = self.decoder(latent, ids_restore).float()
        p, c = self.patch_size, images.shape[1]
        target = patchify(images, p)
        if self.options.norm_pix_loss:
            # Same statistics as masked_patch_loss's target normalisation, inverted.
            pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        removed = mask.bool().unsqueeze(-1).expand_as(target)
        return {
            "masked": unpatchify(torch.where(removed, torch.zeros_like(target), target), p, c),
            "reconstruction": unpatchify(pred.to(images.dtype), p, c),
            "pasted": unpatchify(torch.where(removed, pred.to(images.dtype), target), p, c),
            "mask": mask,
            "pixel_mask": unpatchify(removed.to(images.dtype), p, c)[:, :1],
        }
