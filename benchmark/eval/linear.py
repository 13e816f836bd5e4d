"""Linear probe on cached frozen features.

MAE's protocol puts a BatchNorm without affine parameters before the linear head (He et al.,
2022, "Linear probing"); here features are cached once, so the probe trains in seconds with
SGD + momentum and a cosine schedule (the fast path; LARS at large batch is the paper scale).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def evaluate_linear(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                    val_labels: torch.Tensor, num_classes: int, *, epochs: int = 100, lr: float = 0.1,
                    batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Train BatchNorm(affine=False) + Linear on ``train_feats`` and return val top-1 in percent."""
    gen = torch.Generator().manual_seed(seed)
    dim = train_feats.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=gen)
    nn.init.zeros_(head[1].bias)
    peak = lr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=peak, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_feats) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_feats), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            for group in opt.param_groups:
                group["lr"] = 0.5 * peak * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(train_feats[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        pred = head(val_feats).argmax(1)
    return {"top1": 100.0 * (pred == val_labels).float().mean().item()}
