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
from .sharding import is_main, map_batches, world


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
    with torch.no_grad():  # sharded over the ranks of a torchrun job; every rank fits the same head
        feats = map_batches(lambda a, b: model.forward_head(model.forward_features(images[a:b].to(device)),
                                                            pre_logits=True).float().cpu(),
                            len(labels), batch_size, desc="fine-tuning: probe features").to(device)
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
    """Whether ``model``'s top-1 class is each preprocessed image's label: a CPU bool tensor, in order
    (sharded over the ranks of a torchrun job; ``model`` unwrapped, as its forward must run no collective)."""
    model.eval()
    return map_batches(lambda a, b: model(images[a:b].to(device)).argmax(1).cpu() == labels[a:b], len(images),
                       batch_size)


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


def split_batch(batch_size: int, world_size: int, accum_steps: int = 1, *, even: bool = False) -> int:
    """The images of one forward pass when a global batch of ``batch_size`` is split over ``world_size``
    ranks and ``accum_steps`` passes each; a `ValueError` saying what divides when it does not split
    evenly, or (``even``: Mixup/CutMix, which pair each image with another of its pass) when a pass is odd."""
    parts = world_size * accum_steps
    if batch_size % parts:
        raise ValueError(f"eval.finetune.batch_size={batch_size} does not split evenly over {world_size} rank(s) x "
                         f"{accum_steps} accumulation pass(es): choose a multiple of {parts}, or another "
                         f"eval.finetune.accum_steps.")
    micro = batch_size // parts
    if even and micro % 2:
        raise ValueError(f"eval.finetune.batch_size={batch_size} over {world_size} rank(s) x {accum_steps} pass(es) "
                         f"gives passes of {micro} images, and Mixup/CutMix pair the images of a pass: make it even.")
    return micro


def finetune(encoder: torch.nn.Module, data, options, *, seed: int, device, pool: str, batch_size: int):
    """Fine-tune a copy of ``encoder`` on ``data``'s augmented train batches and score its val split
    after every epoch; returns ``(metrics, recorded options, outcomes)``: best and last top-1 in percent.

    ``data`` is a `ClassificationSet` (its ``train_batches`` reads the train split again through
    ``train_transform``: webdataset shards for the toy set, an ImageFolder for ImageNet);
    ``options`` the protocol's ``FineTune.Options``; ``pool`` the read-out the new head sits on
    (``eval.pool``) and ``batch_size`` the scoring batch (``eval.batch_size``). A third value holds
    the per-image outcomes behind the two numbers: ``{"top1": right, "top1_last": right}``, whether
    each val image was right after the best epoch (the first to reach the best top-1) and the last.

    In a torchrun job every rank calls it: the model trains under DDP, ``options.batch_size`` is the
    global batch (each rank loads its rows of it, `GlobalTrainBatches`; the learning rate follows the
    global batch) and scoring is sharded. One process and N ranks then train on the same batches with
    the same crops; they differ by float reduction order and, where on, by drop path and Mixup/CutMix,
    which each rank draws for its own rows (as in MAE's and DeiT's DDP recipes).
    """
    with flushing_denormals():
        return _finetune(encoder, data, options, seed=seed, device=device, pool=pool, batch_size=batch_size)


def _finetune(encoder: torch.nn.Module, data, opts, *, seed: int, device, pool: str, batch_size: int):
    """`finetune`'s body, run with denormals flushed."""
    # Every RNG the recipe draws from, so the numbers depend on the seed alone, never on the protocols
    # or methods run before in the same process: torch (init, drop path), Python's (timm's RandAugment
    # magnitudes, random erasing) and numpy's (timm's Mixup / CutMix, RandAugment's choice of ops).
    random_seed(seed)
    rank, size = world()
    device = torch.device(device)
    mixing = opts.mixup > 0 or opts.cutmix > 0
    micro = split_batch(opts.batch_size, size, opts.accum_steps, even=mixing)
    img_size = int(data.val.image.shape[-1])
    model = classifier_from_encoder(encoder, data.num_classes, pool, opts.drop_path).to(device)
    if opts.head_init == "probe":
        fit_probe_head(model, data.train.image, data.train.label, batch_size=batch_size, device=device)
    batch = opts.batch_size
    lr = opts.blr * batch / 256  # MAE's linear scaling rule, on the global batch
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=opts.weight_decay,
                                    layer_decay=opts.layer_decay, betas=(0.9, 0.999))
    # DDP broadcasts rank 0's weights (the probe head included) and averages gradients: the mean of the
    # ranks' mean losses over equal shares is the global batch's mean loss.
    trained = model if size == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    mixup, soft_target_loss = None, SoftTargetCrossEntropy()
    if mixing:
        mixup = Mixup(mixup_alpha=opts.mixup, cutmix_alpha=opts.cutmix, label_smoothing=opts.label_smoothing,
                      num_classes=data.num_classes)
    transform = train_transform(img_size, opts)
    # bf16 autocast on CUDA, as pre-training (MAE's fine-tuning uses fp16 AMP), fp32 on the CPU.
    cuda = device.type == "cuda"
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    steps_per_epoch = max(1, data.train_count // batch)
    total, warmup = opts.epochs * steps_per_epoch, opts.warmup_epochs * steps_per_epoch
    history, step, loss = [], 0, None
    with progress_bar(total, desc="fine-tuning", unit="step", disable=not is_main()) as bar:
        for epoch in range(opts.epochs):
            trained.train()
            for b in data.train_batches(epoch=epoch, batch_size=batch, transform=transform, seed=seed, rank=rank,
                                        world_size=size):
                scale = warmup_cosine(step, total, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr * scale * group.get("lr_scale", 1.0)
                optimizer.zero_grad(set_to_none=True)
                passes = list(zip(b["image"].split(micro), b["label"].split(micro)))
                for k, (images, labels) in enumerate(passes):
                    last = k == len(passes) - 1  # DDP reduces the summed gradients once, after the last pass
                    with contextlib.nullcontext() if last or size == 1 else trained.no_sync():
                        with precision:
                            loss = _pass_loss(trained, images.to(device), labels.to(device), mixup,
                                              soft_target_loss, opts.label_smoothing)
                        (loss / len(passes)).backward()
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
    recorded.update(pool=pool, top1_per_epoch=history, precision="bf16" if cuda else "fp32", **determinism_note(device))
    return {"top1": max(history), "top1_last": history[-1]}, recorded, {"top1": best, "top1_last": right}


def _pass_loss(model, images: torch.Tensor, labels: torch.Tensor, mixup, soft_target_loss,
               label_smoothing: float) -> torch.Tensor:
    """The mean loss of one forward pass: soft-target cross-entropy after Mixup/CutMix, else cross-entropy
    with label smoothing."""
    if mixup is not None:
        images, targets = mixup(images, labels)
        return soft_target_loss(model(images), targets)
    return F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
