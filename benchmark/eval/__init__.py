"""The uniform evaluation harness.

Feature protocols see only the frozen encoder: ``fn(features, data, eval_cfg, seed) ->
(metrics, protocol_options)`` where ``features`` holds ``train`` / ``val`` feature tensors of
one encoder on one classification set. Capability protocols need what only some methods can
do (caption, reconstruct): ``fn(method, data, eval_cfg, seed, *, tokenizer, device, artifact)
-> (metrics, protocol_options, examples)``; ``artifact`` is a path stem for figures.
"""
from __future__ import annotations

from pathlib import Path

from .captioning import caption_images, naming_rates
from .knn import evaluate_knn
from .linear import evaluate_linear
from .reconstruction import reconstruction_error, save_reconstruction_grid


def knn_protocol(feats, data, cfg, seed):
    """Weighted k-NN top-1/top-5 on frozen features."""
    opts = {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "standardize_features": cfg.knn_standardize}
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


def captioning_protocol(method, data, cfg, seed, *, tokenizer, device, artifact: Path):
    """Generated captions of the validation images: how often they name the main object."""
    val = data["val"]
    opts = {"beam": cfg.caption_beam, "max_len": cfg.caption_max_len, "images": len(val["image"])}
    captions = caption_images(method, val["image"], tokenizer, beam=cfg.caption_beam,
                              max_len=cfg.caption_max_len, seed=seed, device=device)
    examples = [{"key": k, "generated": c, "reference": r[0] if r else ""}
                for k, c, r in list(zip(val["key"], captions, val["captions"]))[:8]]
    return naming_rates(captions, val["objects"]), opts, examples


def reconstruction_protocol(method, data, cfg, seed, *, tokenizer, device, artifact: Path):
    """Masked-patch pixel error on the validation images, and a PNG grid of the first few."""
    images = data["val"]["image"]
    metrics = reconstruction_error(method, images, seed=seed, device=device)
    grid = save_reconstruction_grid(method, images[:cfg.figure_images], artifact.with_suffix(".png"),
                                    seed=seed, device=device)
    return metrics, {"mask_ratio": method.options.mask_ratio, "figure": grid.name}, []


FEATURE_PROTOCOLS = {"knn": knn_protocol, "linear": linear_protocol}
# name -> (the capability a method needs, protocol); methods without it are skipped.
CAPABILITY_PROTOCOLS = {"captioning": ("caption", captioning_protocol),
                        "reconstruction": ("reconstruct", reconstruction_protocol)}
PROTOCOLS = (*FEATURE_PROTOCOLS, *CAPABILITY_PROTOCOLS)
