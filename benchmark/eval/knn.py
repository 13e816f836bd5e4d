"""Weighted k-NN on frozen features: cosine similarity, k nearest, votes weighted by
exp(similarity / T) (Wu et al., 2018; the k=20, T=0.07 setting used by DINO)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .outcomes import percent, topk_outcomes


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores ``[Q, num_classes]`` for each query from its ``k`` nearest training features."""
    train = F.normalize(train_feats, dim=1)
    k = min(k, len(train))
    scores = []
    for i in range(0, len(query_feats), chunk):
        sim = F.normalize(query_feats[i:i + chunk], dim=1) @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def standardize(train_feats: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every feature dimension with the training split's mean and std.

    The same statistics MAE's linear probe applies through its parameter-free BatchNorm; before a
    cosine k-NN it stops a few large, nearly constant dimensions (common in short-trained ViTs)
    from dominating every similarity."""
    mean, std = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)
    return [(f - mean) / std for f in (train_feats, *others)]


def knn_outcomes(train_feats, train_labels, val_feats, val_labels, num_classes: int, *, k: int = 20,
                 temperature: float = 0.07, standardize_features: bool = False) -> dict[str, torch.Tensor]:
    """Whether each val example is right at top-1 (and, with more than 10 classes, top-5), in the
    val split's order: what `evaluate_knn` averages, kept for paired comparisons between encoders."""
    if standardize_features:
        train_feats, val_feats = standardize(train_feats, val_feats)
    scores = knn_predict(train_feats, train_labels, val_feats, num_classes, k, temperature)
    return topk_outcomes(scores, val_labels)


def evaluate_knn(train_feats, train_labels, val_feats, val_labels, num_classes: int, *, k: int = 20,
                 temperature: float = 0.07, standardize_features: bool = False) -> dict[str, float]:
    """Top-1 (and, with more than 10 classes, top-5) accuracy in percent."""
    return percent(knn_outcomes(train_feats, train_labels, val_feats, val_labels, num_classes, k=k,
                                temperature=temperature, standardize_features=standardize_features))
