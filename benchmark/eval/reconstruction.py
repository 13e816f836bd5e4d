"""Reconstruction of masked images: the error on removed patches and a picture grid (MAE's Fig. 2)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .sharding import batch_seed, map_batches


def _to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to [0, 1] RGB."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def _flat_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Every patch replaced by its mean value (over its pixels and channels together)."""
    means = F.avg_pool2d(images.mean(1, keepdim=True), patch_size)
    return F.interpolate(means, scale_factor=patch_size, mode="nearest").expand_as(images)


@torch.no_grad()
def reconstruction_error(method, images: torch.Tensor, *, seed: int, patch_size: int,
                         batch_size: int = 200, device="cpu") -> dict[str, float]:
    """Mean squared error of the predicted pixels on removed patches only, in the input's
    normalised pixel space (masks drawn from ``seed``), beside ``flat_patch_mse``: the error of
    filling each removed patch with its own true mean value. With MAE's per-patch normalised
    targets a reconstruction gets each patch's mean and scale for free, so beating the flat patch
    is what shows that edges and textures were predicted. ``patch_size``: the encoder's, in pixels.

    Each batch draws its masks from ``seed`` and its place (`sharding.batch_seed`); in a torchrun job the
    ranks reconstruct their runs of the batches and the per-image sums are gathered and added in order,
    so the numbers are those of one process."""
    def batch(a: int, b: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed(seed, a))
            x = images[a:b].to(device)
            out = method.reconstruct(x)
        removed = out["pixel_mask"].expand_as(x)
        dims = tuple(range(1, x.ndim))
        sums = [((out["reconstruction"] - x) ** 2 * removed).sum(dims),
                ((_flat_patches(x, patch_size) - x) ** 2 * removed).sum(dims), removed.sum(dims)]
        return torch.stack(sums, 1).double().cpu()  # per image: error, flat-patch error, removed pixels

    total, flat, count = map_batches(batch, len(images), batch_size, desc="reconstruction").sum(0).tolist()
    return {"masked_mse": total / max(count, 1.0), "flat_patch_mse": flat / max(count, 1.0)}


@torch.no_grad()
def save_reconstruction_grid(method, images: torch.Tensor, path: Path, *, seed: int, device="cpu") -> Path:
    """Write a PNG with one column per image: original, masked input, reconstruction pasted into
    the removed patches."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = images.to(device)
        out = method.reconstruct(x)
    rows = torch.cat([_to_pixels(x), _to_pixels(out["masked"]), _to_pixels(out["pasted"])])
    path.parent.mkdir(parents=True, exist_ok=True)
    # Upscaled so that a 32-pixel toy image is readable in a report.
    scale = max(1, 128 // images.shape[-1])
    rows = torch.nn.functional.interpolate(rows, scale_factor=scale, mode="nearest")
    save_image(rows.cpu(), path, nrow=len(images), padding=2, pad_value=1.0)
    return path
