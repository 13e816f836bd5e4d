"""Weighted k-NN on frozen features: cosine similarity, k nearest, votes weighted by
exp(similarity / T) (Wu et al., 2018; the k=20, T=0.07 setting used by DINO)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .outcomes import percent, topk_outcomes
from .sharding import map_batches

QUERY_CHUNK = 1024  # queries per similarity matmul: [1024, N_train] floats, 5 GB for ImageNet's 1.28M


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """Class scores ``[Q, num_classes]`` for each query from its ``k`` nearest training features."""
    train = F.normalize(train_feats, dim=1)
    k = min(k, len(train))
    scores = []
    for i in range(0, len(query_feats), chunk):
        sim = F.normalize(query_feats[i:i + chunk], dim=1) @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), num_classes, device=top_sim.device)
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
                 temperature: float = 0.07, standardize_features: bool = False,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Whether each val example is right at top-1 (and, with more than 10 classes, top-5), in the
    val split's order: what `evaluate_knn` averages, kept for paired comparisons between encoders.

    In a torchrun job each rank votes for its run of the query chunks and the outcomes are gathered
    (`sharding.map_batches`): ImageNet's 50,000 x 1.28M similarities (1e17 FLOP for ViT-B features) are
    split over the ranks, with the same chunks, hence the same numbers, as one process. The similarities
    are computed on ``device``."""
    if standardize_features:
        train_feats, val_feats = standardize(train_feats, val_feats)
    train_feats, train_labels = train_feats.to(device), train_labels.to(device)

    def chunk(a: int, b: int) -> dict[str, torch.Tensor]:
        scores = knn_predict(train_feats, train_labels, val_feats[a:b].to(device), num_classes, k, temperature)
        return topk_outcomes(scores, val_labels[a:b].to(device))

    return map_batches(chunk, len(val_feats), QUERY_CHUNK, desc="k-NN")


def evaluate_knn(train_feats, train_labels, val_feats, val_labels, num_classes: int, *, k: int = 20,
                 temperature: float = 0.07, standardize_features: bool = False) -> dict[str, float]:
    """Top-1 (and, with more than 10 classes, top-5) accuracy in percent."""
    return percent(knn_outcomes(train_feats, train_labels, val_feats, val_labels, num_classes, k=k,
                                temperature=temperature, standardize_features=standardize_features))
