"""Linear probe on cached frozen features, optionally over a grid of learning rates in one pass.

MAE's protocol (He et al., 2022, "Linear probing"): class token, a BatchNorm without affine
parameters before the linear head, LARS, linear warmup then cosine decay, weight decay 0.
Features are cached once, so the probe trains in seconds. Two solvers share one loop:
``sgd`` (momentum; the fast path for small sets) and ``lars`` (timm's LARS, the paper scale).
A grid of base learning rates trains one head per rate on the same batches, so every rate
sees the same data order and the whole grid costs little more than one rate.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import nn

from ..progress import progress_bar
from ..protocols.linear import SOLVERS  # the protocol validates the option; one list
from .outcomes import percent_right
from .sharding import gather_objects, is_main, world


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at ``step`` of ``total``: linear warmup over ``warmup`` steps, then a
    half-cycle cosine to 0 (MAE's per-step ``lr_sched``, shared by the probe and fine-tuning)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _heads(dim: int, num_classes: int, count: int, seed: int) -> nn.ModuleList:
    heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(count))
    for head in heads:  # the same start for every rate: a grid entry equals a run at that rate alone
        nn.init.trunc_normal_(head.weight, std=0.01, generator=torch.Generator().manual_seed(seed))  # MAE's init
        nn.init.zeros_(head.bias)
    return heads


def _optimizer(heads: nn.ModuleList, peaks: list[float], solver: str, weight_decay: float):
    if solver == "sgd":
        groups = [{"params": list(h.parameters()), "lr": lr} for h, lr in zip(heads, peaks)]
        return torch.optim.SGD(groups, lr=peaks[0], momentum=0.9, weight_decay=weight_decay)
    if solver == "lars":
        # MAE's LARS adapts only matrices; biases get plain momentum SGD without weight decay.
        groups = []
        for head, lr in zip(heads, peaks):
            groups.append({"params": [head.weight], "lr": lr, "weight_decay": weight_decay, "always_adapt": True})
            groups.append({"params": [head.bias], "lr": lr, "weight_decay": 0.0, "always_adapt": False})
        # timm's LARS skips the trust ratio of groups whose decay is 0 unless always_adapt is set.
        return Lars(groups, lr=peaks[0], momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown linear-probe solver {solver!r}: use one of {', '.join(SOLVERS)}")


def evaluate_linear(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                    val_labels: torch.Tensor, num_classes: int, *, epochs: int = 100, lr: float = 0.1,
                    lrs: list[float] | None = None, batch_size: int = 256, weight_decay: float = 0.0,
                    warmup_epochs: int = 0, solver: str = "sgd", seed: int = 0,
                    device: torch.device | str = "cpu") -> tuple[dict[str, float], dict, dict[str, torch.Tensor]]:
    """Train BatchNorm(affine=False) + Linear heads on ``train_feats``; score val top-1 in percent.

    ``lrs`` is a grid of base learning rates (peak = base x batch / 256, MAE's rule); without it
    the grid is ``[lr]``. Returns ``({"top1": best}, {"best_lr": ..., "grid_top1": {lr: top1}},
    {"top1": right})``: ``right`` says, per val example in order, whether the best rate's head
    classified it right (its mean is the reported top-1). The heads train on ``device`` (ImageNet's
    1.28M cached features take seconds per epoch on a GPU, minutes on a CPU).
    """
    grid = [float(x) for x in (lrs or [lr])]
    # In a torchrun job the grid is split over the ranks (rank r trains rates r, r + W, ...): every head
    # starts alike and sees the same batches whatever else trains beside it, so each rate's result is
    # the one a single process gets; the outcomes are then gathered.
    rank, size = world()
    mine = list(range(len(grid)))[rank::size]
    right = dict(zip(mine, _train_heads(train_feats, train_labels, val_feats, val_labels, num_classes,
                                        [grid[i] for i in mine], epochs=epochs, batch_size=batch_size,
                                        weight_decay=weight_decay, warmup_epochs=warmup_epochs, solver=solver,
                                        seed=seed, device=torch.device(device)) if mine else []))
    right = dict(gather_objects(sorted(right.items())))
    top1 = [percent_right(right[i]) for i in range(len(grid))]
    best = max(range(len(grid)), key=lambda i: top1[i])
    info = {"best_lr": grid[best], "grid_top1": {str(b): t for b, t in zip(grid, top1)}}
    return {"top1": top1[best]}, info, {"top1": right[best]}


def _train_heads(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, grid: list[float], *, epochs: int, batch_size: int,
                 weight_decay: float, warmup_epochs: int, solver: str, seed: int,
                 device: torch.device) -> list[torch.Tensor]:
    """One head per base rate of ``grid``, trained in one pass on ``device``; per head, whether it
    classified each val example right (on the CPU)."""
    gen = torch.Generator().manual_seed(seed + 1)  # batch order, drawn on the CPU whatever the device
    dim = train_feats.shape[1]
    train_feats, train_labels = train_feats.to(device), train_labels.to(device)
    val_feats, val_labels = val_feats.to(device), val_labels.to(device)
    norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6).to(device)  # parameter-free: one shared by every head
    heads = _heads(dim, num_classes, len(grid), seed).to(device)
    peaks = [base * batch_size / 256 for base in grid]
    opt = _optimizer(heads, peaks, solver, weight_decay)
    steps_per_epoch = math.ceil(len(train_feats) / batch_size)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    step = 0
    norm.train()
    with progress_bar(epochs, desc="linear probe", unit="epoch", disable=not is_main()) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(train_feats), generator=gen).to(device)
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                scale = warmup_cosine(step, total, warmup)
                for group in opt.param_groups:
                    group["lr"] = group.setdefault("peak_lr", group["lr"]) * scale
                x = norm(train_feats[idx])
                # Summed losses: each head's gradient is its own cross-entropy's.
                loss = sum(F.cross_entropy(head(x), train_labels[idx]) for head in heads)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            bar.update()  # per epoch: probe steps on cached features are many and short
    norm.eval()
    with torch.no_grad():
        x = norm(val_feats)
        return [(head(x).argmax(1) == val_labels).cpu() for head in heads]
