"""The uniform evaluation harness.

Feature protocols see only the frozen encoder: ``fn(features, data, eval_cfg, seed) ->
(metrics, protocol_options)`` where ``features`` holds ``train`` / ``val`` feature tensors of
one encoder on one classification set. Capability protocols need what only some methods can
do (embed text, caption, reconstruct): ``fn(method, data, eval_cfg, seed, *, tokenizer, device,
artifact) -> (metrics, protocol_options, examples)``; ``artifact`` is a path stem for figures.
Encoder protocols train a copy of the encoder end to end (fine-tuning, segmentation):
``fn(encoder, data, eval_cfg, seed, *, device, workdir) -> (metrics, protocol_options)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .captioning import caption_images, caption_scores, naming_rates
from .knn import evaluate_knn
from .linear import evaluate_linear
from .reconstruction import reconstruction_error, save_reconstruction_grid
from .retrieval import embed_pairs, recall_at_k
from .zeroshot import accuracy, class_names, embedding_scores, likelihood_scores, prompts_for


def knn_protocol(feats, data, cfg, seed):
    """Weighted k-NN top-1/top-5 on frozen features."""
    opts = {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "standardize_features": cfg.knn_standardize}
    return evaluate_knn(feats["train"], data["train"]["label"], feats["val"], data["val"]["label"],
                        data["num_classes"], **opts), opts


def linear_protocol(feats, data, cfg, seed):
    """BatchNorm(affine=False) + linear head on cached frozen features, over a grid of rates."""
    opts = {"epochs": cfg.linear_epochs, "lrs": list(cfg.linear_lrs or [cfg.linear_lr]),
            "batch_size": cfg.linear_batch_size, "weight_decay": cfg.linear_weight_decay,
            "warmup_epochs": cfg.linear_warmup_epochs, "solver": cfg.linear_solver, "schedule": "warmup-cosine"}
    metrics, grid = evaluate_linear(feats["train"], data["train"]["label"], feats["val"], data["val"]["label"],
                                    data["num_classes"], epochs=cfg.linear_epochs, lrs=opts["lrs"],
                                    batch_size=cfg.linear_batch_size, weight_decay=cfg.linear_weight_decay,
                                    warmup_epochs=cfg.linear_warmup_epochs, solver=cfg.linear_solver, seed=seed)
    return metrics, dict(opts, **grid)


def captioning_protocol(method, data, cfg, seed, *, tokenizer, device, artifact: Path):
    """Generated captions of the validation images: how often they name the main object."""
    val = data["val"]
    opts = {"beam": cfg.caption_beam, "max_len": cfg.caption_max_len, "images": len(val["image"])}
    captions = caption_images(method, val["image"], tokenizer, beam=cfg.caption_beam,
                              max_len=cfg.caption_max_len, seed=seed, device=device)
    examples = [{"key": k, "generated": c, "reference": r[0] if r else ""}
                for k, c, r in list(zip(val["key"], captions, val["captions"]))[:8]]
    metrics = caption_scores(captions, val["captions"])
    if all(val["objects"]):  # generated scenes know their objects: check the words too
        metrics.update(naming_rates(captions, val["objects"]))
    return metrics, opts, examples


def reconstruction_protocol(method, data, cfg, seed, *, tokenizer, device, artifact: Path):
    """Masked-patch pixel error on the validation images, and a PNG grid of the first few."""
    images = data["val"]["image"]
    metrics = reconstruction_error(method, images, seed=seed, device=device)
    grid = save_reconstruction_grid(method, images[:cfg.figure_images], artifact.with_suffix(".png"),
                                    seed=seed, device=device)
    # The figure's columns by key, so a report can set each beside other methods' captions of that image.
    columns = [{"key": k} for k in data["val"]["key"][:cfg.figure_images]]
    return metrics, {"mask_ratio": method.options.mask_ratio, "figure": grid.name}, columns


def zeroshot_protocol(method, data, cfg, seed, *, tokenizer, device, artifact: Path):
    """Zero-shot top-1 on the validation images: prompt embeddings where the method has a text
    tower, else caption likelihood of the prompts."""
    templates, val = prompts_for(data["name"]), data["val"]
    classes = class_names(data["name"], data["classes"])
    n = min(cfg.zeroshot_images or len(val["image"]), len(val["image"]))
    # A lazy ImageFolder split stays lazy when whole (slicing it would load every image at once).
    images = val["image"] if n == len(val["image"]) else val["image"][:n]
    labels = val["label"][:n]
    if callable(getattr(method, "encode_text", None)):
        mode = "embedding"
        scores = embedding_scores(method, images, classes, templates, tokenizer, device=device)
    else:
        mode = "likelihood"
        scores = likelihood_scores(method, images, classes, templates, tokenizer, seed=seed, device=device)
    return accuracy(scores, labels), {"mode": mode, "prompts": list(templates), "images": len(images)}, []


def retrieval_protocol(method, data, cfg, seed, *, tokenizer, device, artifact: Path):
    """Image<->text Recall@1/5/10 over the validation images and all their captions."""
    val = data["val"]
    image_emb, text_emb, owner = embed_pairs(method, val["image"], val["captions"], tokenizer, device=device)
    return recall_at_k(image_emb, text_emb, owner), {"images": len(image_emb), "texts": len(text_emb)}, []


def finetune_protocol(encoder, data, cfg, seed, *, device, workdir):
    """End-to-end fine-tuning with MAE's recipe from timm's utilities (best and last top-1)."""
    from .finetune import finetune_protocol as run

    return run(encoder, data, cfg, seed, device=device, workdir=workdir)


def segmentation_protocol(encoder, data, cfg, seed, *, device, workdir):
    """UperNet from mmsegmentation on four ViT blocks; mIoU by mmseg's IoUMetric."""
    from .segmentation import segmentation_protocol as run  # mmseg is a heavy import: only when used

    return run(encoder, data, cfg, seed, device=device, workdir=workdir)


@dataclass(frozen=True)
class EncoderProtocol:
    """A protocol that trains a copy of the encoder on sets of ``kind``."""

    fn: Callable
    kind: str


@dataclass(frozen=True)
class CapabilityProtocol:
    """A protocol for methods with any of the capabilities ``needs``, run on sets of ``kind``
    (``classification``: labelled images; ``captions``: images with reference captions)."""

    fn: Callable
    needs: tuple[str, ...]
    kind: str

    def applies_to(self, method) -> bool:
        """Whether ``method`` has one of the needed capabilities."""
        return any(callable(getattr(method, c, None)) for c in self.needs)


FEATURE_PROTOCOLS = {"knn": knn_protocol, "linear": linear_protocol}
ENCODER_PROTOCOLS = {
    "finetune": EncoderProtocol(finetune_protocol, "classification"),
    "segmentation": EncoderProtocol(segmentation_protocol, "segmentation"),
}
# Methods without the capability are skipped: no record, not a zero.
CAPABILITY_PROTOCOLS = {
    "zeroshot": CapabilityProtocol(zeroshot_protocol, ("encode_text", "score_text"), "classification"),
    "retrieval": CapabilityProtocol(retrieval_protocol, ("encode_text",), "captions"),
    "captioning": CapabilityProtocol(captioning_protocol, ("caption",), "captions"),
    "reconstruction": CapabilityProtocol(reconstruction_protocol, ("reconstruct",), "captions"),
}
PROTOCOLS = (*FEATURE_PROTOCOLS, *ENCODER_PROTOCOLS, *CAPABILITY_PROTOCOLS)
