"""Frozen features of an encoder on an evaluation split, computed once per (encoder, split)."""
from __future__ import annotations

import torch

from ..models.vit import pooled_features


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: torch.Tensor, *, pool: str = "token",
                     batch_size: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pooled encoder features ``[N, D]`` (float32, on the CPU) for ``images [N, 3, H, W]``."""
    was_training = encoder.training
    encoder.eval().to(device)
    out = [pooled_features(encoder, images[i:i + batch_size].to(device), pool).float().cpu()
           for i in range(0, len(images), batch_size)]
    encoder.train(was_training)
    return torch.cat(out)
