"""End-to-end fine-tuning: MAE's ImageNet recipe built from timm's own utilities.

He et al. (2022), Table 9 / BEiT's recipe: AdamW, layer-wise lr decay, drop path, RandAugment,
random erasing, Mixup + CutMix with label smoothing, warmup then cosine. Every piece comes
from timm (``create_transform``, ``Mixup``, ``SoftTargetCrossEntropy``, ``create_optimizer_v2``
with ``layer_decay``, ``DropPath``), so the harness fine-tunes exactly as timm users expect.
The encoder keeps the harness's read-out (``eval.pool``) and gets a fresh linear head; the
recipe's numbers are the protocol's options (``eval.finetune.*``, `mugbench.protocols.finetune`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import random_seed

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..progress import progress_bar
from .determinism import determinism_note
from .linear import warmup_cosine
from .outcomes import percent_right


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


def fit_probe_head(model: torch.nn.Module, images, labels: torch.Tensor, *, batch_size: int, device,
                   l2: float = 1e-3, iters: int = 200) -> None:
    """LP-FT's first stage (Kumar et al., ICLR 2022): fit ``model.head`` as a linear probe on the frozen
    model's pre-logit features of ``images`` (the un-augmented train split), by full-batch L-BFGS on the
    cross-entropy plus ``l2`` times the squared weights. Fine-tuning then starts from a head that already
    reads the features, instead of one whose first gradients distort them."""
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.forward_head(model.forward_features(images[i:i + batch_size].to(device)),
                                              pre_logits=True) for i in range(0, len(labels), batch_size)])
    head, labels = model.head, labels.to(device)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def train_transform(img_size: int, options):
    """timm's training transform with MAE's fine-tuning augmentation (``options``: the protocol's
    ``FineTune.Options``; its crop ranges, ``randaug`` policy and ``reprob`` random-erasing probability)."""
    transform = create_transform(img_size, is_training=True, scale=options.crop_scale, ratio=options.crop_ratio,
                                 auto_augment=options.randaug, color_jitter=None,
                                 interpolation="bicubic", re_prob=options.reprob, re_mode="pixel", re_count=1,
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
def right_per_image(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                    device) -> torch.Tensor:
    """Whether ``model``'s top-1 class is each preprocessed image's label: a CPU bool tensor, in order."""
    model.eval()
    right = [model(images[i:i + batch_size].to(device)).argmax(1).cpu() == labels[i:i + batch_size]
             for i in range(0, len(images), batch_size)]
    return torch.cat(right) if right else torch.zeros(0, dtype=torch.bool)


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


def finetune(encoder: torch.nn.Module, data, options, *, seed: int, device, pool: str, batch_size: int):
    """Fine-tune a copy of ``encoder`` on ``data``'s augmented train batches and score its val split
    after every epoch; returns ``(metrics, recorded options, outcomes)``: best and last top-1 in percent.

    ``data`` is a `ClassificationSet` (its ``train_batches`` reads the train split again through
    ``train_transform``: webdataset shards for the toy set, an ImageFolder for ImageNet);
    ``options`` the protocol's ``FineTune.Options``; ``pool`` the read-out the new head sits on
    (``eval.pool``) and ``batch_size`` the scoring batch (``eval.batch_size``). A third value holds
    the per-image outcomes behind the two numbers: ``{"top1": right, "top1_last": right}``, whether
    each val image was right after the best epoch (the first to reach the best top-1) and the last.
    """
    with flushing_denormals():
        return _finetune(encoder, data, options, seed=seed, device=device, pool=pool, batch_size=batch_size)


def _finetune(encoder: torch.nn.Module, data, opts, *, seed: int, device, pool: str, batch_size: int):
    """`finetune`'s body, run with denormals flushed."""
    # Every RNG the recipe draws from, so the numbers depend on the seed alone, never on the protocols
    # or methods run before in the same process: torch (init, drop path), Python's (timm's RandAugment
    # magnitudes, random erasing) and numpy's (timm's Mixup / CutMix, RandAugment's choice of ops).
    random_seed(seed)
    img_size = int(data.val.image.shape[-1])
    model = classifier_from_encoder(encoder, data.num_classes, pool, opts.drop_path).to(device)
    if opts.head_init == "probe":
        fit_probe_head(model, data.train.image, data.train.label, batch_size=batch_size, device=device)
    batch = opts.batch_size
    lr = opts.blr * batch / 256  # MAE's linear scaling rule
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=opts.weight_decay,
                                    layer_decay=opts.layer_decay, betas=(0.9, 0.999))
    mixup, soft_target_loss = None, SoftTargetCrossEntropy()
    if opts.mixup > 0 or opts.cutmix > 0:
        mixup = Mixup(mixup_alpha=opts.mixup, cutmix_alpha=opts.cutmix, label_smoothing=opts.label_smoothing,
                      num_classes=data.num_classes)
    transform = train_transform(img_size, opts)
    steps_per_epoch = max(1, data.train_count // batch)
    total, warmup = opts.epochs * steps_per_epoch, opts.warmup_epochs * steps_per_epoch
    history, step, loss = [], 0, None
    with progress_bar(total, desc="fine-tuning", unit="step") as bar:
        for epoch in range(opts.epochs):
            model.train()
            for b in data.train_batches(epoch=epoch, batch_size=batch, transform=transform, seed=seed):
                scale = warmup_cosine(step, total, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr * scale * group.get("lr_scale", 1.0)
                images, labels = b["image"].to(device), b["label"].to(device)
                if mixup is not None:
                    images, targets = mixup(images, labels)
                    loss = soft_target_loss(model(images), targets)
                else:
                    loss = F.cross_entropy(model(images), labels, label_smoothing=opts.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                bar.update()
            right = right_per_image(model, data.val.image, data.val.label, batch_size=batch_size, device=device)
            top1 = percent_right(right)
            if not history or top1 > max(history):  # the first epoch of the max, as max(history) reports it
                best = right
            history.append(top1)
            # The loss once per epoch (reading it waits for the device), and only if a batch came.
            bar.set_postfix(top1=f"{top1:.1f}", **({} if loss is None else {"loss": f"{loss.item():.3f}"}))
    recorded = dataclasses.asdict(opts)  # every recipe option, in declaration order
    recorded.update(pool=pool, top1_per_epoch=history, **determinism_note(device))
    return {"top1": max(history), "top1_last": history[-1]}, recorded, {"top1": best, "top1_last": right}
