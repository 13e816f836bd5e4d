"""Frozen features of an encoder on an evaluation split, computed once per (encoder, split)."""
from __future__ import annotations

import torch

from ..models.vit import pooled_features
from .sharding import map_batches


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: torch.Tensor, *, pool: str = "token",
                     batch_size: int = 256, device: torch.device | str = "cpu", desc: str | None = None) -> torch.Tensor:
    """Pooled encoder features ``[N, D]`` (float32, on the CPU) for ``images [N, 3, H, W]`` (a tensor, or a
    lazy `FolderImages` that loads the slices asked for).

    In a torchrun job each rank encodes its run of the batches (`sharding.map_batches`) and every rank gets
    all ``N`` rows in order, each image encoded once; a collective, so every rank calls it. ``desc``
    names the progress bar rank 0 shows."""
    was_training = encoder.training
    encoder.eval().to(device)
    try:
        return map_batches(lambda a, b: pooled_features(encoder, images[a:b].to(device), pool).float().cpu(),
                           len(images), batch_size, desc=desc)
    finally:
        encoder.train(was_training)
