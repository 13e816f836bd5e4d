"""MAE's light-weight pixel decoder and its loss (He et al., 2022, "Masked Autoencoders ...")."""
from __future__ import annotations

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

from .vit import sincos_2d


class MaskedDecoder(nn.Module):
    """Re-inserts mask tokens into the visible-token latent and predicts every patch's pixels."""

    def __init__(self, embed_dim: int, num_patches: int, patch_size: int, width: int = 512,
                 depth: int = 8, heads: int = 16, num_prefix_tokens: int = 1, channels: int = 3):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        pe = torch.cat([torch.zeros(num_prefix_tokens, width), sincos_2d(width, int(num_patches ** 0.5))])
        self.pos_embed = nn.Parameter(pe.unsqueeze(0), requires_grad=False)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch_size * patch_size * channels)
        self.grad_checkpointing = False  # `mugbench.train.loop.enable_grad_checkpointing` switches it on
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent [B, P + K, D]`` from `masked_encode` -> pixel predictions ``[B, N, p*p*C]``."""
        p = self.num_prefix_tokens
        x = self.embed(latent)
        b, n = ids_restore.shape
        tokens = torch.cat([x[:, p:], self.mask_token.expand(b, n - (x.shape[1] - p), -1)], dim=1)
        tokens = tokens.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :p], tokens], dim=1) + self.pos_embed
        x = checkpoint_seq(self.blocks, x) if self.grad_checkpointing and torch.is_grad_enabled() else self.blocks(x)
        return self.pred(self.norm(x)[:, p:])

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens and position embeddings are exempt from weight decay."""
        return {"mask_token", "pos_embed"}


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error over removed patches only; with ``norm_pix`` each target patch is
    normalised by its own mean and variance (MAE's ``norm_pix_loss``, which improves transfer)."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
