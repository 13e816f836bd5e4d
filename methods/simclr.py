"""SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"): pull two augmented views of an image together, push every other image away.

The recipe is the one SLIP (Mu et al., 2022, "SLIP: Self-supervision meets Language-Image
Pre-training") used for ViTs on web images: two strongly augmented views, a 3-layer projection
MLP on the class token and an NT-Xent loss at temperature 0.1. The loss and the MLP live here as
module-level pieces so that SLIP (`mugbench.methods.slip`) adds exactly the same objective to CLIP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from mugbench.data.transforms import ViewSpec
from mugbench.method import Method, check_range
from mugbench.models.vit import pooled_features
from mugbench.registry import register_method
from mugbench.train.distributed import rank_and_world

__all__ = ["SIMCLR_VIEW", "ProjectionMLP", "check_simclr_options", "gather_rows", "nt_xent_loss", "simclr_features",
           "simclr_head_loss", "simclr_loss", "two_views", "SimCLR"]

# SLIP's SimCLR augmentation: RandomResizedCrop(0.08-1), colour jitter (0.4, 0.4, 0.4, 0.1) with
# p=0.8 -- strength 0.5 in ViewSpec's convention (brightness 0.8*s, hue 0.2*s), SLIP keeps it
# "not strengthened" -- grayscale p=0.2, Gaussian blur p=0.5 and a horizontal flip.
SIMCLR_VIEW = ViewSpec(scale=(0.08, 1.0), color_jitter=0.5, grayscale=0.2, blur=0.5)


class ProjectionMLP(nn.Sequential):
    """SLIP's SimCLR projection head: Linear-BN-ReLU, Linear-BN-ReLU, Linear.

    It runs on the gathered global batch (`simclr_head_loss`): SimCLR's "global BN" (per-device
    statistics would leak which views belong together).

    SLIP uses a hidden width of 4096 and an output of 256 on ViT-B; mugbench's defaults are
    smaller to suit the toy encoder, and a preset can set the published widths.
    """

    def __init__(self, in_dim: int, mlp_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, mlp_dim), nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, mlp_dim), nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True),
            nn.Linear(mlp_dim, out_dim),
        )


def nt_xent_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1, *,
                 rank: int | None = None, world_size: int | None = None) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross-entropy) of two batches of paired embeddings.

    ``z_a[i]`` and ``z_b[i]`` are two views of image i. Every one of the 2N embeddings is an
    anchor whose positive is its partner and whose negatives are the other 2N - 2 embeddings:
    ``-log(exp(s(i, i')/t) / sum_{k != i} exp(s(i, k)/t))`` with cosine similarity s, averaged
    over the anchors.

    Under ``torch.distributed`` (``rank``/``world_size`` default to the process group's) the
    embeddings of every rank are gathered *with* gradient, so the negatives are the global batch,
    while the anchors stay local. DDP's gradient average over ranks then equals the gradient of the
    loss averaged over the global batch. All ranks must pass the same N.
    """
    if rank is None or world_size is None:
        rank, world_size = rank_and_world()
    k_a, k_b = gather_rows(z_a, world_size), gather_rows(z_b, world_size)
    return _nt_xent_of_anchors(z_a, z_b, k_a, k_b, rank * z_a.shape[0], temperature)


def gather_rows(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order, with gradient (each rank's rows get the gradient
    of every rank's loss); ``x`` itself on one process."""
    return torch.cat(dist_nn.all_gather(x), dim=0) if world_size > 1 else x


def _nt_xent_of_anchors(q_a: torch.Tensor, q_b: torch.Tensor, k_a: torch.Tensor, k_b: torch.Tensor, first: int,
                        temperature: float) -> torch.Tensor:
    """NT-Xent of the anchors ``q_a``/``q_b`` (rows ``first ..`` of the global batch) against every row of
    ``k_a``/``k_b``: this rank's rows sit at offset ``first`` of the gathered matrix, which gives the
    positive's column and the self-similarity to exclude."""
    # Similarities in float32 even under bf16 autocast: at t = 0.1 the logits span [-10, 10] and
    # bf16's 8-bit mantissa would blur differences between close negatives.
    with torch.autocast(device_type=q_a.device.type, enabled=False):
        q_a, q_b = F.normalize(q_a.float(), dim=-1), F.normalize(q_b.float(), dim=-1)
        k_a, k_b = F.normalize(k_a.float(), dim=-1), F.normalize(k_b.float(), dim=-1)
        targets = torch.arange(q_a.shape[0], device=q_a.device) + first
        is_self = F.one_hot(targets, k_a.shape[0]).bool()
        # Each anchor scores [the other view of every image | its own view of every other image];
        # the positive is in the first block at the anchor's global index.
        logits_a = torch.cat([q_a @ k_b.T, (q_a @ k_a.T).masked_fill(is_self, float("-inf"))], dim=1)
        logits_b = torch.cat([q_b @ k_a.T, (q_b @ k_b.T).masked_fill(is_self, float("-inf"))], dim=1)
        return (F.cross_entropy(logits_a / temperature, targets) + F.cross_entropy(logits_b / temperature, targets)) / 2


def simclr_features(encoder: nn.Module, view_a: torch.Tensor, view_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """The class tokens of both views, ``{"view_a", "view_b"}`` ``[B, D]``: SimCLR's per-row features.
    Both views go through the encoder in one call (the ViT has no batch statistics, so this is the same
    as two calls)."""
    f_a, f_b = pooled_features(encoder, torch.cat([view_a, view_b]), "token").chunk(2)
    return {"view_a": f_a, "view_b": f_b}


def simclr_head_loss(head: nn.Module, f_a: torch.Tensor, f_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's coupling of the rows: this rank's class tokens ``f_a``/``f_b`` are gathered from every rank
    (with gradient), the head runs on the whole global batch one view at a time, as in SLIP, so each
    BatchNorm normalises with one view's statistics over the global batch (SimCLR's "global BN", on any
    device and number of ranks; the head is a few percent of a ViT-B step even at 4,096 rows), and NT-Xent
    scores this rank's anchors against every row."""
    rank, world = rank_and_world()
    z_a, z_b = head(gather_rows(f_a, world)), head(gather_rows(f_b, world))
    n = f_a.shape[0]
    rows = slice(rank * n, (rank + 1) * n)
    return _nt_xent_of_anchors(z_a[rows], z_b[rows], z_a, z_b, rank * n, temperature)


def simclr_loss(encoder: nn.Module, head: nn.Module, view_a: torch.Tensor, view_b: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """SimCLR's objective on two views: class tokens of the shared ViT -> ``head`` -> NT-Xent
    (`simclr_features`, then `simclr_head_loss`)."""
    f = simclr_features(encoder, view_a, view_b)
    return simclr_head_loss(head, f["view_a"], f["view_b"], temperature)


def check_simclr_options(method: str, options) -> None:
    """Range checks of the SimCLR branch's options (``temperature``, ``mlp_dim``, ``out_dim``),
    shared by every method that carries it; errors name ``method``."""
    check_range(method, "temperature", options.temperature, 1e-3, 10.0)
    check_range(method, "mlp_dim", options.mlp_dim, 1, 65536)
    check_range(method, "out_dim", options.out_dim, 1, 65536)


def two_views(batch: dict, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``first`` and ``first + 1`` of a multi-view batch, with a clear error if absent."""
    views = batch.get("image_views")
    if views is None or len(views) < first + 2:
        raise KeyError(f"this method needs batch['image_views'] with at least {first + 2} views "
                       f"(the loader adds them for the extra views a method declares)")
    return views[first], views[first + 1]


@register_method("simclr")
class SimCLR(Method):
    """Two SimCLR-augmented views per image; class token -> 3-layer MLP -> NT-Xent.

    The two views are declared as extra views (``image_views[1]`` and ``[2]``), exactly SLIP's SimCLR
    pair, and the loss ignores the study's base view (``image``): SimCLR's objective compares two
    strongly augmented views, and the base view is too weak an augmentation to be one of them. So
    SimCLR declares no base-view override; like every method it gets view 0 from ``data.augment``
    (unused), and its two SimCLR views are drawn from the same decoded image as SLIP's.
    """

    @dataclass
    class Options:
        """Temperature 0.1 (SLIP's SimCLR for ViTs); head widths sized for the toy encoder.

        SLIP's ViT-B head is ``mlp_dim=4096, out_dim=256``; the defaults (512, 128) keep the head
        a few times wider than the 96-wide toy ViT, with SimCLR's 128-d output.
        """

        temperature: float = 0.1
        mlp_dim: int = 512
        out_dim: int = 128

        def __post_init__(self):
            check_simclr_options("simclr", self)

    extra_views = (SIMCLR_VIEW, SIMCLR_VIEW)
    needs_text = False
    paradigm = "single-modal discriminative"

    def __init__(self, encoder, text, options):
        super().__init__(encoder, text, options)
        self.image_mlp = ProjectionMLP(encoder.embed_dim, options.mlp_dim, options.out_dim)

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """Class tokens of the batch's two SimCLR views (views 1 and 2; view 0 is the unused base view)."""
        return simclr_features(self.encoder, *two_views(batch, first=1))

    def loss(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Projection head and NT-Xent over the global batch (`simclr_head_loss`)."""
        loss = simclr_head_loss(self.image_mlp, features["view_a"], features["view_b"], self.options.temperature)
        return {"loss": loss, "ssl": loss}
