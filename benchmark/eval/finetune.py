"""End-to-end fine-tuning: MAE's ImageNet recipe built from timm's own utilities.

He et al. (2022), Table 9 / BEiT's recipe: AdamW, layer-wise lr decay, drop path, RandAugment,
random erasing, Mixup + CutMix with label smoothing, warmup then cosine. Every piece comes
from timm (``create_transform``, ``Mixup``, ``SoftTargetCrossEntropy``, ``create_optimizer_v2``
with ``layer_decay``, ``DropPath``), so the harness fine-tunes exactly as timm users expect.
The encoder keeps the harness's read-out (``eval.pool``) and gets a fresh linear head.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import random_seed

from ..data.pipeline import make_loader
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .determinism import determinism_note
from .linear import warmup_cosine


def set_drop_path(model: torch.nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks (timm's rule), set on a
    model that may have been built without it."""
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(p) if p > 0 else torch.nn.Identity())


def classifier_from_encoder(encoder: torch.nn.Module, num_classes: int, pool: str, drop_path: float) -> torch.nn.Module:
    """A copy of the encoder with drop path and a new linear head on the ``pool`` read-out."""
    model = copy.deepcopy(encoder)
    model.reset_classifier(num_classes, global_pool=pool)
    torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE's fine-tuning head init
    torch.nn.init.zeros_(model.head.bias)
    set_drop_path(model, drop_path)
    return model


def train_transform(img_size: int, cfg):
    """timm's training transform with MAE's fine-tuning augmentation."""
    transform = create_transform(img_size, is_training=True, auto_augment=cfg.finetune_randaug, color_jitter=None,
                                 interpolation="bicubic", re_prob=cfg.finetune_reprob, re_mode="pixel", re_count=1,
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def _posterize(img: Image.Image, bits: int, **_) -> Image.Image:
    """RandAugment's posterize as timm wrote it for Pillow < 13: keeping 0 bits gives a black image.

    MAE's ``inc1`` policy reaches 0 bits at the magnitude cap, which Pillow 13 rejects with an error.
    """
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


@torch.no_grad()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, device) -> float:
    """Top-1 accuracy in percent of ``model`` on preprocessed ``images``."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i:i + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    return 100.0 * correct / max(1, len(images))


@contextlib.contextmanager
def flushing_denormals():
    """Treat denormal floats as zero while inside (CPU only; CUDA kernels flush anyway).

    MAE's tiny head init (std 2e-5) makes the first hundred or so steps' gradients denormal,
    which runs about ten times slower on x86 CPUs (measured: 28 against 280 img/s on the toy ViT).
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def finetune_protocol(encoder: torch.nn.Module, data: dict, cfg, seed: int, *, device, workdir=None):
    """Fine-tune a copy of ``encoder`` on ``data["train_urls"]`` (labelled shards) and score
    ``data["val"]`` tensors after every epoch; returns best and last top-1.

    ``data``: ``{"train_urls": [...], "train_count": N, "val": {"image", "label"}, "num_classes": C}``;
    an ImageFolder set gives ``train_batches(epoch=, batch_size=, transform=, seed=)`` instead of
    ``train_urls``.
    """
    with flushing_denormals():
        return _finetune(encoder, data, cfg, seed, device=device)


def _finetune(encoder: torch.nn.Module, data: dict, cfg, seed: int, *, device):
    # Every RNG the recipe draws from, so the numbers depend on the seed alone, never on the protocols
    # or methods run before in the same process: torch (init, drop path), Python's (timm's RandAugment
    # magnitudes, random erasing) and numpy's (timm's Mixup / CutMix, RandAugment's choice of ops).
    random_seed(seed)
    img_size = int(data["val"]["image"].shape[-1])
    model = classifier_from_encoder(encoder, data["num_classes"], cfg.pool, cfg.finetune_drop_path).to(device)
    batch = cfg.finetune_batch_size
    lr = cfg.finetune_blr * batch / 256
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=cfg.finetune_weight_decay,
                                    layer_decay=cfg.finetune_layer_decay, betas=(0.9, 0.999))
    mixup, soft_target_loss = None, SoftTargetCrossEntropy()
    if cfg.finetune_mixup > 0 or cfg.finetune_cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.finetune_mixup, cutmix_alpha=cfg.finetune_cutmix,
                      label_smoothing=cfg.finetune_label_smoothing, num_classes=data["num_classes"])
    transform = train_transform(img_size, cfg)
    steps_per_epoch = max(1, data["train_count"] // batch)
    total, warmup = cfg.finetune_epochs * steps_per_epoch, cfg.finetune_warmup_epochs * steps_per_epoch
    history, step = [], 0
    for epoch in range(cfg.finetune_epochs):
        model.train()
        if "train_batches" in data:  # an ImageFolder set (ImageNet)
            loader = data["train_batches"](epoch=epoch, batch_size=batch, transform=transform, seed=seed)
        else:
            loader = make_loader(data["train_urls"], batch_size=batch, image_transforms=[transform], tokenizer=None,
                                 need_caption=False, need_label=True, shuffle=True, seed=seed, epoch=epoch,
                                 shuffle_buffer=data["train_count"])
        for b in loader:
            scale = warmup_cosine(step, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * scale * group.get("lr_scale", 1.0)
            images, labels = b["image"].to(device), b["label"].to(device)
            if mixup is not None:
                images, targets = mixup(images, labels)
                loss = soft_target_loss(model(images), targets)
            else:
                loss = F.cross_entropy(model(images), labels, label_smoothing=cfg.finetune_label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        history.append(top1(model, data["val"]["image"], data["val"]["label"], batch_size=cfg.batch_size,
                            device=device))
    options = {key: getattr(cfg, f"finetune_{key}") for key in (
        "epochs", "batch_size", "blr", "layer_decay", "weight_decay", "drop_path", "warmup_epochs", "mixup",
        "cutmix", "label_smoothing", "randaug", "reprob")}
    options.update(pool=cfg.pool, top1_per_epoch=history, **determinism_note(device))
    return {"top1": max(history), "top1_last": history[-1]}, options
