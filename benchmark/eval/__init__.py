"""The uniform evaluation harness: each protocol maps cached features to metric/value pairs.

A protocol is ``fn(features, data, eval_cfg, seed) -> (metrics, protocol_options)`` where
``features`` holds ``train`` / ``val`` feature tensors of one encoder on one dataset.
"""
from __future__ import annotations

from .knn import evaluate_knn
from .linear import evaluate_linear


def knn_protocol(feats, data, cfg, seed):
    """Weighted k-NN top-1/top-5 on frozen features."""
    opts = {"k": cfg.knn_k, "temperature": cfg.knn_temperature}
    return evaluate_knn(feats["train"], data["train"]["label"], feats["val"], data["val"]["label"],
                        data["num_classes"], **opts), opts


def linear_protocol(feats, data, cfg, seed):
    """BatchNorm(affine=False) + linear head on cached frozen features."""
    opts = {"epochs": cfg.linear_epochs, "lr": cfg.linear_lr, "batch_size": cfg.linear_batch_size,
            "weight_decay": cfg.linear_weight_decay, "solver": "sgd-momentum-cosine"}
    metrics = evaluate_linear(feats["train"], data["train"]["label"], feats["val"], data["val"]["label"],
                              data["num_classes"], epochs=cfg.linear_epochs, lr=cfg.linear_lr,
                              batch_size=cfg.linear_batch_size, weight_decay=cfg.linear_weight_decay, seed=seed)
    return metrics, opts


PROTOCOLS = {"knn": knn_protocol, "linear": linear_protocol}
