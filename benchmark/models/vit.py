"""The shared image encoder: a timm VisionTransformer, and the masking used by masked methods.

Every method of a study gets the same encoder (same architecture, same init seed). Its state
dict loads into ``timm.create_model(spec.timm_name, **spec.timm_kwargs())`` unchanged.
"""
from __future__ import annotations

import torch
import timm
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..config import EncoderSpec
from .global_batch import global_batch_rand


def build_encoder(spec: EncoderSpec, seed: int | None = None) -> VisionTransformer:
    """Create the shared ViT; with ``seed`` the init is identical for every method of a study.

    Position embeddings are fixed 2-D sin-cos, as in MAE (He et al., 2022), so that masked and
    contrastive methods start from the same well-conditioned encoder.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = timm.create_model(spec.timm_name, pretrained=False, drop_path_rate=spec.drop_path_rate, **spec.timm_kwargs())
    grid = spec.img_size // spec.patch_size
    with torch.no_grad():
        pe = sincos_2d(spec.embed_dim, grid)
        if model.cls_token is not None and not model.no_embed_class:
            pe = torch.cat([torch.zeros(1, spec.embed_dim), pe], dim=0)
        model.pos_embed.copy_(pe.unsqueeze(0))
    model.pos_embed.requires_grad_(False)
    return model


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding of shape [grid*grid, dim] (MAE's layout)."""
    assert dim % 4 == 0, "embed_dim must be divisible by 4 for 2-D sin-cos embeddings"
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed(pos):
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    # MAE puts the width (x) axis first in the channel layout.
    return torch.cat([embed(xs), embed(ys)], dim=1).float()


def random_masking(x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample (MAE's per-sample shuffle).

    Returns ``(kept [B, K, D], mask [B, N] with 1 = removed, ids_restore [B, N])`` where
    ``ids_restore`` puts a sequence in kept-then-removed order back into patch order.
    """
    b, n, d = x.shape
    keep = max(1, int(round(n * (1 - mask_ratio))))
    noise = global_batch_rand(b, n, device=x.device)  # the same mask for a sample on any number of ranks
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    mask = mask.gather(1, ids_restore)
    return kept, mask, ids_restore


def masked_encode(
    encoder: VisionTransformer, images: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode only a random ``1 - mask_ratio`` of the patches; prefix (class) tokens are kept.

    Returns ``(latent [B, P + K, D] after the final norm, mask [B, N], ids_restore [B, N])``
    with P prefix tokens first. ``mask_ratio=0`` encodes every patch (in shuffled order).
    """
    x = encoder._pos_embed(encoder.patch_embed(images))
    p = encoder.num_prefix_tokens
    kept, mask, ids_restore = random_masking(x[:, p:], mask_ratio)
    x = encoder.norm_pre(torch.cat([x[:, :p], kept], dim=1))
    # timm's own forward_features honours grad_checkpointing; this path must too.
    x = checkpoint_seq(encoder.blocks, x) if encoder.grad_checkpointing and torch.is_grad_enabled() else encoder.blocks(x)
    return encoder.norm(x), mask, ids_restore


def pooled_features(encoder: VisionTransformer, images: torch.Tensor, pool: str = "token") -> torch.Tensor:
    """Frozen-feature read-out shared by all protocols: class token (``token``) or mean of patches (``avg``)."""
    tokens = encoder.forward_features(images)
    if pool == "token":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, encoder.num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"unknown pooling {pool!r}: use 'token' or 'avg'")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] in row-major patch order (the ViT's token order)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify` for square images."""
    b, n, _ = patches.shape
    g = int(n ** 0.5)
    p = patch_size
    x = patches.reshape(b, g, g, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, g * p, g * p)


def export_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights, contiguous and detached, for safetensors / timm."""
    return {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
