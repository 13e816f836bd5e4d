"""Semantic segmentation: UperNet on four blocks of the ViT, fine-tuned end to end, scored by mIoU.

The setting of BEiT (Bao et al., 2022) and MAE (He et al., 2022) on ADE20K, built from
mmsegmentation 1.x parts: the encoder's block outputs are rescaled to strides 4/8/16/32
(`ViTPyramid`), decoded by ``UPerHead`` plus an auxiliary ``FCNHead`` inside ``EncoderDecoder``,
trained with mmengine's ``Runner`` (AdamW, layer-wise lr decay, linear warmup then poly decay)
on mmseg's datasets and transforms, and scored with mmseg's ``IoUMetric``.

In a job of several ranks (a process group of world size W > 1) every rank calls `segment` with the same
arguments and the Runner trains under DDP, as mmseg's 8x2 ADE20K runs: the global batch of
``batch_size`` crops is split evenly (`check_batch_split`), each iteration's crops are one global
sample stream whatever W is (`GlobalStreamSampler`, `PositionDataset`), BatchNorm is SyncBN on CUDA
(per rank on the CPU, where torch's SyncBatchNorm does not run), validation is sharded over ranks and
gathered, and rank 0 alone writes the records. Numbers not taken
from the protocol's options (``eval.segmentation.*``) are those of mmseg's
``mae-base_upernet_8xb2-amp-160k_ade20k`` config and its ADE20K dataset defaults, cited where used.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import pickle
import random
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..data.train_batches import seeded_rngs
from ..files import atomic_write_text
from ..progress import progress_bar
from ..train.checkpoint import load_checkpoint
from .determinism import determinism_note
from .mmseg_compat import ensure_mmseg_importable
from .sharding import broadcast_object, gather_objects, world

_RESULT_FILE, _RUN_FILE = "result.json", "run.json"
# The names mmengine's CheckpointHook gives this protocol's checkpoints (by_epoch=False).
_CHECKPOINT_NAME = re.compile(r"^iter_(\d+)\.pth$")
# Marks a HistoryBuffer stored as plain data in a checkpoint (see `_plain`).
_BUFFER_TAG = "__mugbench_history_buffer__"


# --------------------------------------------------------------------------- the model

def block_indices(depth: int) -> list[int]:
    """The four blocks (0-based) whose outputs feed the pyramid.

    BEiT and MAE take blocks 4, 6, 8, 12 of 12 (1-based; 8, 12, 16, 24 of 24), i.e. blocks
    ``round(d/3), round(d/2), round(2d/3), d``; the same rule gives every block for depth 4 and
    repeats blocks for depth < 4 (depth 2: blocks 1, 1, 1, 2), so four levels always exist.
    """
    picks = [math.floor(depth * f + 0.5) for f in (1 / 3, 1 / 2, 2 / 3)] + [depth]
    return [max(1, p) - 1 for p in picks]


def _rescale(dim: int, factor: float) -> nn.Module:
    """Resample a [B, dim, h, w] map by ``factor`` (a power of two), as BEiT's fpn1-4.

    Up by 2^k: k stride-2 2x2 transposed convolutions with BatchNorm + GELU between them (BEiT
    uses SyncBN: so does a CUDA job of several ranks, `QuietRunner.wrap_model`); 1: identity; down
    by 2^k: a 2^k max-pool.
    """
    k = round(math.log2(factor))
    if 2.0 ** k != factor:
        raise ValueError(f"patch size / target stride must be a power of two, got {factor}")
    if k == 0:
        return nn.Identity()
    if k < 0:
        return nn.MaxPool2d(kernel_size=2 ** -k, stride=2 ** -k)
    layers: list[nn.Module] = []
    for i in range(k):
        if i:
            layers += [nn.BatchNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class ViTPyramid(nn.Module):
    """mmseg backbone: four block outputs of a timm ViT rescaled to strides 4, 8, 16, 32.

    For 16 px patches this is BEiT / MAE's neck (two deconvs, one deconv, identity, max-pool);
    other patch sizes scale by ``patch_size / stride`` the same way (8 px: one deconv, identity,
    pool 2, pool 4; 4 px: identity, pools 2, 4, 8). Block outputs are taken before the final
    norm, prefix tokens dropped, as in BEiT's backbone.
    """

    strides = (4, 8, 16, 32)

    def __init__(self, encoder: nn.Module, indices: list[int]):
        super().__init__()
        self.encoder, self.indices = encoder, list(indices)
        patch = encoder.patch_embed.patch_size[0]
        dim = encoder.embed_dim
        self.rescales = nn.ModuleList(_rescale(dim, patch / s) for s in self.strides)

    def init_weights(self) -> None:
        """Keep the encoder's weights: mmengine calls ``init_weights`` on every child that has
        one, and timm's ViT would re-initialise itself. The rescaling layers keep PyTorch's init."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, 3, H, W] -> four [B, D, H/s, W/s] maps, s = 4, 8, 16, 32."""
        unique = sorted(set(self.indices))
        outs = self.encoder.forward_intermediates(x, indices=unique, intermediates_only=True)
        by_block = dict(zip(unique, outs))
        return tuple(r(by_block[i]) for r, i in zip(self.rescales, self.indices))


def _prepare_encoder(encoder: nn.Module, crop: int, indices: list[int]) -> nn.Module:
    """A deep copy of ``encoder`` at input size ``crop``, without layers UperNet does not use.

    timm's ``set_input_size`` resamples the position embedding (as MAE's fine-tuning does). The
    embedding is the study's fixed sin-cos table (`build_encoder`) and stays frozen; it is frozen
    explicitly because an encoder reloaded from an export gets it back as a trainable Parameter.
    """
    enc = copy.deepcopy(encoder)
    if tuple(enc.patch_embed.img_size) != (crop, crop):
        enc.set_input_size(img_size=(crop, crop))
    if enc.pos_embed is not None:
        enc.pos_embed.requires_grad_(False)
    # Blocks after the last one read, the final norm and the head get no gradient: drop them.
    enc.prune_intermediate_layers(sorted(set(indices)), prune_norm=True, prune_head=True)
    return enc


def _layer_id(name: str, num_blocks: int) -> int:
    """Depth of a parameter for layer-wise lr decay (BEiT's rule): embeddings 0, block i i+1,
    everything else (pyramid, heads) num_blocks + 1."""
    prefix = "backbone.encoder."
    if not name.startswith(prefix):
        return num_blocks + 1
    rest = name[len(prefix):]
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return 0


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                 num_blocks: int) -> list[dict]:
    """AdamW groups: lr scaled by ``layer_decay ** (num_blocks + 1 - layer_id)``; no weight
    decay on biases, norms (1-D) and token/position embeddings (BEiT / mmseg's
    ``LayerDecayOptimizerConstructor``). Frozen parameters (the sin-cos table) are left out."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith((".bias", "cls_token", "pos_embed", "reg_token"))
        lid = _layer_id(name, num_blocks)
        group = groups.setdefault((lid, no_decay), {
            "params": [], "lr": lr * layer_decay ** (num_blocks + 1 - lid),
            "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def _model_cfg(backbone: dict, num_classes: int, embed_dim: int, crop: int, options, ignore_index: int) -> dict:
    """mmseg's ``EncoderDecoder`` with UPerHead + FCNHead, as mmseg's ``upernet_mae`` base config
    (pool scales 1-2-3-6, dropout 0.1, aux head on the stride-16 level, half the width);
    ``options``: the protocol's ``Segmentation.Options`` (head width, auxiliary loss weight)."""
    from mmengine.config import ConfigDict  # mmseg reads test_cfg by attribute

    # SyncBN in mmseg's configs: built as BN here, converted to SyncBN for a CUDA job of several ranks
    # (`QuietRunner.wrap_model`), BN in one process (what mmengine reverts SyncBN to there anyway).
    norm = dict(type="BN", requires_grad=True)

    def ce(weight):
        return dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=weight)

    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(
            type="SegDataPreProcessor", mean=[255 * m for m in IMAGENET_DEFAULT_MEAN],
            std=[255 * s for s in IMAGENET_DEFAULT_STD], bgr_to_rgb=True, pad_val=0, seg_pad_val=255,
            size=(crop, crop)),
        backbone=backbone,
        decode_head=dict(type="UPerHead", in_channels=[embed_dim] * 4, in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=options.channels, dropout_ratio=0.1,
                         num_classes=num_classes, norm_cfg=norm, align_corners=False,
                         ignore_index=ignore_index, loss_decode=ce(1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=embed_dim, in_index=2,
                            channels=max(1, options.channels // 2), num_convs=1, concat_input=False,
                            dropout_ratio=0.1, num_classes=num_classes, norm_cfg=norm,
                            align_corners=False, ignore_index=ignore_index,
                            loss_decode=ce(options.aux_weight)),
        train_cfg=dict(),
        # Sliding windows of the crop size with a 2/3 stride (MAE's ADE20K: 512 crop, 341 stride).
        test_cfg=ConfigDict(mode="slide", crop_size=(crop, crop), stride=(max(1, 2 * crop // 3),) * 2),
    )


# --------------------------------------------------------------------------- data

def _pipelines(crop: int, reduce_zero_label: bool, scale_range) -> tuple[list, list]:
    """mmseg's ADE20K train and test pipelines at crop ``crop``: resize towards (4c, c) (2048 x
    512 for 512 crops), random scale in ``scale_range`` (ADE20K's 0.5-2), crop with at most 75 % of
    one class, flip, colour jitter."""
    scale = (4 * crop, crop)
    annotations = dict(type="LoadAnnotations", reduce_zero_label=reduce_zero_label)
    train = [dict(type="LoadImageFromFile"), annotations,
             dict(type="RandomResize", scale=scale, ratio_range=tuple(scale_range), keep_ratio=True),
             dict(type="RandomCrop", crop_size=(crop, crop), cat_max_ratio=0.75),
             dict(type="RandomFlip", prob=0.5), dict(type="PhotoMetricDistortion"), dict(type="PackSegInputs")]
    # Labels are loaded after the resize: predictions are scored at the original resolution.
    test = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=scale, keep_ratio=True),
            annotations, dict(type="PackSegInputs")]
    return train, test


def _dataset_cfg(data, split: str, pipeline: list) -> dict:
    """An mmseg dataset config for ``split`` (train | val) of the `SegmentationSet` ``data``, in its
    ``layout``. The set's own class names go in as metainfo; a set without them (ADE20K) keeps those
    of its mmseg dataset class."""
    layout = data.layout
    img_path, seg_path = getattr(layout, split)
    cfg = dict(type=layout.dataset_type, data_root=str(data.root),
               data_prefix=dict(img_path=img_path, seg_map_path=seg_path),
               img_suffix=layout.img_suffix, seg_map_suffix=layout.seg_map_suffix,
               reduce_zero_label=bool(data.reduce_zero_label), ignore_index=int(data.ignore_index),
               pipeline=pipeline)
    if data.classes:
        cfg["metainfo"] = dict(classes=tuple(data.classes))
    return cfg


def class_names(data) -> list[str]:
    """The label names of the `SegmentationSet` ``data`` by mask value: its own ``classes``, else those
    its mmseg dataset class declares (``ADE20KDataset``'s 150). A `ValueError` for a dataset class
    mmseg does not know, or a set that names no classes on a dataset class that has none."""
    from mmseg.registry import DATASETS

    dataset_type = data.layout.dataset_type
    dataset_cls = DATASETS.get(dataset_type)
    if dataset_cls is None:
        raise ValueError(f"Segmentation set {data.name!r} names the dataset class {dataset_type!r} in its layout, "
                         f"which mmsegmentation does not register. Use one of mmseg's dataset classes (such as "
                         f"BaseSegDataset for a plain img_dir/ann_dir layout, or ADE20KDataset).")
    names = list(data.classes) or list(getattr(dataset_cls, "METAINFO", {}).get("classes", ()))
    if not names:
        raise ValueError(f"Segmentation set {data.name!r} names no classes, and its dataset class {dataset_type} "
                         f"declares none either: give the set's class names by mask value "
                         f"(SegmentationSet.classes).")
    return names


def check_batch_split(batch_size: int, world_size: int, *, synced_bn: bool = False) -> int:
    """The per-rank batch of a global batch of ``batch_size`` crops over ``world_size`` ranks; a
    `ValueError` saying what to change when it does not split evenly, or leaves one crop per rank
    where BatchNorm is not synchronised (``synced_bn``: SyncBN, a CUDA job of several ranks).

    The study calls it before training, so that a job that cannot run stops before pre-training.
    One crop is refused because UPerHead's pooling branch at scale 1 normalises a 1x1 map: per-rank
    BatchNorm then sees a single value per channel, which torch refuses in training (SyncBN counts
    the crops of every rank).
    """
    batch_size, world_size = int(batch_size), int(world_size)
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"segmentation needs a positive batch and world size, got {batch_size} over {world_size}")
    per_rank, left = divmod(batch_size, world_size)
    if left:
        raise ValueError(f"eval.segmentation.batch_size={batch_size} (the global batch) does not split evenly over "
                         f"{world_size} ranks: make it a multiple of {world_size}, or run on a number of ranks "
                         f"that divides it")
    if per_rank == 1 and not synced_bn:
        where = "one process" if world_size == 1 else f"{world_size} ranks without SyncBN (the CPU)"
        raise ValueError(f"eval.segmentation.batch_size={batch_size} over {where} gives one crop per rank, which "
                         f"UPerHead's BatchNorm cannot train on: use at least {2 * world_size}")
    return per_rank


def stream_order(seed: int, size: int, epoch: int) -> list[int]:
    """The order in which pass ``epoch`` of the global sample stream visits a set of ``size`` samples:
    a permutation seeded by ``seed + epoch`` (one fresh shuffle per pass)."""
    gen = torch.Generator().manual_seed(int(seed) + int(epoch))
    return torch.randperm(int(size), generator=gen).tolist()


class GlobalStreamSampler(torch.utils.data.Sampler):
    """This rank's positions in the job's one global sample stream, endless and resumable.

    Positions p = 0, 1, 2, ... are the stream (`PositionDataset` maps position p to sample
    ``stream_order(seed, N, p // N)[p % N]`` and seeds its augmentation from (seed, p)). Iteration t's
    global batch is positions ``[t*B, (t+1)*B)``; rank r of W reads ``[t*B + r*b, t*B + (r+1)*b)``,
    b = B / W. So every iteration trains on the same crops whatever the number of ranks, and the
    ranks' slices in rank order are the batch one process would load.

    Unlike mmengine's ``InfiniteSampler`` it can start at any iteration without replaying the data
    (`resume_at`), so a resumed run skips what it already trained on at no cost (mmengine's loop
    loads and augments every skipped batch: hours at ADE20K scale).

    ``dataset`` and ``seed`` are what mmengine's ``build_dataloader`` passes every sampler (only the
    dataset's length is read: the order is `PositionDataset`'s); ``batch_size`` is the GLOBAL batch B;
    ``rank``, ``world_size`` default to the process group's (`sharding.world`).
    """

    def __init__(self, dataset, seed: int | None = 0, batch_size: int = 1, rank: int | None = None,
                 world_size: int | None = None):
        if rank is None or world_size is None:
            rank, world_size = world()
        self.size, self.seed = len(dataset), int(seed or 0)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.per_rank = self.batch_size // self.world_size
        if self.per_rank * self.world_size != self.batch_size or not 0 <= self.rank < self.world_size:
            raise ValueError(f"a global batch of {batch_size} does not split evenly over {world_size} ranks "
                             f"(rank {rank}): see check_batch_split")
        self.start = 0  # the global position the stream starts at: a whole number of global batches

    def resume_at(self, iteration: int) -> None:
        """Start the stream at iteration ``iteration``'s global batch (position ``iteration * B``)."""
        self.start = int(iteration) * self.batch_size

    def __iter__(self):
        if self.start % self.batch_size:
            raise ValueError(f"the stream starts at position {self.start}, not at a whole global batch of "
                             f"{self.batch_size}")
        first = self.start + self.rank * self.per_rank
        while True:
            yield from range(first, first + self.per_rank)
            first += self.batch_size

    def __len__(self) -> int:
        return self.size


def _position_seed(seed: int, position: int) -> int:
    """A 32-bit seed for the augmentation of stream position ``position`` (numpy mixes the pair, so
    neighbouring positions and seeds give unrelated draws)."""
    return int(np.random.SeedSequence([int(seed), int(position)]).generate_state(1)[0])


class PositionDataset(torch.utils.data.Dataset):
    """An mmseg dataset read by stream position: item p is sample ``stream_order(seed, N, p // N)[p % N]``
    of ``dataset``, through its pipeline with ``random``, ``numpy.random`` and torch's CPU generator
    seeded from (seed, p).

    mmseg's RandomResize, RandomCrop (and its retries), RandomFlip and PhotoMetricDistortion, and
    mmengine's re-draw of a sample the pipeline drops, draw from those global generators: seeded per
    position, a crop depends on (seed, position) alone, not on which rank (or dataloader worker)
    loads it nor on what it loaded before. The generators' states are restored afterwards, so the
    training step's own draws (dropout) go on as without the wrapper.

    ``dataset``: an mmseg dataset or its config (built in the current registry scope).
    """

    def __init__(self, dataset, seed: int = 0):
        if isinstance(dataset, dict):
            from mmseg.registry import DATASETS

            dataset = DATASETS.build(dataset)
        self.dataset, self.seed = dataset, int(seed)
        self._orders: dict[int, list[int]] = {}  # the pass being read (and the last one: workers overlap)

    @property
    def metainfo(self) -> dict:
        """The wrapped dataset's metainfo (class names, palette) for mmengine's loop and visualizer."""
        return self.dataset.metainfo

    def full_init(self) -> None:
        """Load the wrapped dataset's annotations (mmengine's ``build_dataloader`` calls it)."""
        if hasattr(self.dataset, "full_init"):
            self.dataset.full_init()

    def __len__(self) -> int:
        return len(self.dataset)

    def index(self, position: int) -> int:
        """The sample at stream position ``position``."""
        epoch, offset = divmod(int(position), len(self.dataset))
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = stream_order(self.seed, len(self.dataset), epoch)
        return self._orders[epoch][offset]

    def __getitem__(self, position: int) -> dict:
        """The sample at ``position`` through the pipeline, its random draws seeded from (seed, position)."""
        with seeded_rngs(_position_seed(self.seed, position)):  # the CPU generators only: CUDA's is the step's
            return self.dataset[self.index(position)]


def _resumable_loop_cls():
    """mmengine's ``IterBasedTrainLoop`` whose resume jumps the sampler instead of replaying."""
    from mmengine.runner.loops import IterBasedTrainLoop, _InfiniteDataloaderIterator

    class _Skip:
        """Answers the loop's replay of ``_iter`` batches without loading any, then defers to ``inner``."""

        def __init__(self, skip: int, inner):
            self.skip, self.inner = skip, inner

        def __iter__(self):
            return self

        def __next__(self):
            if self.skip:
                self.skip -= 1
                return None
            return next(self.inner)

    class ResumableIterLoop(IterBasedTrainLoop):
        """Iteration-based loop; on resume the data order continues where the run stopped."""

        def run(self):
            if self._iter > 0:
                self.dataloader.sampler.resume_at(self._iter)  # GlobalStreamSampler
                # The old iterator may already have prefetched from position 0: start afresh.
                self.dataloader_iterator = _Skip(self._iter, _InfiniteDataloaderIterator(self.dataloader))
            return super().run()

    return ResumableIterLoop


# --------------------------------------------------------------------------- scoring

def _constant_prediction_scores(dataset, classes, ignore_index: int) -> dict[str, float]:
    """``IoUMetric`` of predicting label 0 everywhere (background for the toy world) on the
    mmseg ``dataset``'s label maps: the floor any trained model must beat."""
    from mmseg.datasets.transforms import LoadAnnotations
    from mmseg.evaluation import IoUMetric

    load = LoadAnnotations()  # the dataset's own reduce_zero_label travels with each sample
    metric = IoUMetric(ignore_index=ignore_index)
    metric.dataset_meta = dict(classes=tuple(classes))
    for i in range(len(dataset)):
        gt = torch.from_numpy(load(dataset.get_data_info(i))["gt_seg_map"].astype(np.int64))
        metric.process({}, [{"pred_sem_seg": {"data": torch.zeros_like(gt)}, "gt_sem_seg": {"data": gt}}])
    return {k: float(v) for k, v in metric.compute_metrics(metric.results).items()}


# --------------------------------------------------------------------------- the protocol

def _fingerprint(encoder: nn.Module) -> str:
    """SHA-256 of the encoder's weights, so a work_dir is never resumed with another encoder."""
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _isolated_globals(device: torch.device):
    """Restore what mmengine's Runner changes process-wide: RNG states (it seeds python, numpy
    and torch), cuDNN flags, mmengine's default scope, and the OMP / MKL thread variables it sets
    in a distributed job."""
    from mmengine.registry import DefaultScope

    py_state, np_state = random.getstate(), np.random.get_state()
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), DefaultScope.overwrite_default_scope("mmseg"):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _UnusableCheckpoint(Exception):
    """A checkpoint file the protocol will not resume from (raised before anything is changed)."""


def _checkpoints(workdir: Path) -> list[Path]:
    """The ``iter_<N>.pth`` files directly in ``workdir``, newest first.

    mmengine resumes from whatever path the file ``last_checkpoint`` holds; that file is not
    read here, so only names this protocol writes, in its own folder, are ever candidates.
    """
    found = [(int(m.group(1)), p) for p in workdir.glob("iter_*.pth") if (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def _plain(value):
    """``value`` (a checkpoint's ``meta`` or ``message_hub``) as data ``weights_only`` loading reads.

    mmengine stores its logs as ``HistoryBuffer`` objects holding numpy arrays, and numpy
    scalars among its runtime information: the buffers become tagged dicts of lists (undone by
    `_restore_buffers`), numpy values Python numbers or lists. float64 to float is exact.
    """
    from mmengine.logging import HistoryBuffer

    if isinstance(value, HistoryBuffer):
        logs, counts = value.data
        return {_BUFFER_TAG: True, "log_history": logs.tolist(), "count_history": counts.tolist(),
                "max_length": int(value.max_length)}
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, dict):
        return type(value)((k, _plain(v)) for k, v in value.items())  # an OrderedDict stays one
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    return value


def _restore_buffers(message_hub: dict) -> None:
    """Turn the tagged dicts `_plain` made of the message hub's log buffers back into buffers."""
    from mmengine.logging import HistoryBuffer

    scalars = message_hub["log_scalars"]
    for key, value in scalars.items():
        if isinstance(value, dict) and value.get(_BUFFER_TAG):
            scalars[key] = HistoryBuffer(value["log_history"], value["count_history"], value["max_length"])


def _check_resumable(checkpoint, model: nn.Module) -> None:
    """Raise `_UnusableCheckpoint` unless ``checkpoint`` is one of this protocol's, for ``model``.

    Checked before anything is loaded, so that a refused file leaves the runner untouched and
    training can start from scratch: the entries ``Runner.resume`` reads, and weights whose
    names and shapes are the model's (``load_state_dict`` would copy some before failing).
    """
    if not isinstance(checkpoint, dict) or not {"meta", "state_dict", "message_hub", "optimizer"} <= checkpoint.keys():
        raise _UnusableCheckpoint("it lacks the meta, state_dict, message_hub or optimizer entries")
    meta, hub = checkpoint["meta"], checkpoint["message_hub"]
    if not isinstance(meta, dict) or not isinstance(meta.get("iter"), int) or not isinstance(meta.get("epoch"), int):
        raise _UnusableCheckpoint("its meta entry has no iteration")
    if not isinstance(hub, dict) or not all(isinstance(hub.get(k), dict) for k in ("log_scalars", "runtime_info", "resumed_keys")):
        raise _UnusableCheckpoint("its message_hub entry is not mmengine's")
    # CheckpointHook deletes the files these steps name when it resumes: whole numbers only.
    keep = hub["runtime_info"].get("keep_ckpt_ids", [])
    if not isinstance(keep, list) or not all(isinstance(step, int) for step in keep):
        raise _UnusableCheckpoint("its keep_ckpt_ids are not iteration numbers")
    saved, own = checkpoint["state_dict"], model.state_dict()
    if not isinstance(saved, dict) or saved.keys() != own.keys() or any(
            not isinstance(saved[k], torch.Tensor) or saved[k].shape != own[k].shape for k in own):
        raise _UnusableCheckpoint("its weights do not fit this model")


def _weights_only_checkpoint_hook():
    """An mmengine hook that makes every checkpoint the runner saves readable with ``weights_only``."""
    from mmengine.hooks import Hook

    class WeightsOnlyCheckpointHook(Hook):
        """Stores ``meta`` and ``message_hub`` as plain data (`_plain`); runs after other hooks."""

        priority = "LOWEST"

        def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
            """Convert the checkpoint's non-tensor entries in place, just before it is written."""
            for key in ("meta", "message_hub"):
                if key in checkpoint:
                    checkpoint[key] = _plain(checkpoint[key])

    return WeightsOnlyCheckpointHook()


def _bn_average_hook():
    """An mmengine hook that averages BatchNorm running statistics over the ranks after every iteration,
    for a job whose BatchNorm is per rank (the CPU, where SyncBN does not run).

    DDP averages gradients but not buffers: each rank's running mean / variance would follow its own
    crops, so validation would score each rank's share of the images with another model, and the
    checkpoint (rank 0's) would not be the model validated. The running statistics are an exponential
    average, linear in the batch statistics, so averaging after every update keeps every rank at the
    average of what the ranks would have tracked alone. It runs before CheckpointHook (higher priority),
    so every checkpoint holds the averaged statistics.
    """
    import torch.distributed as dist
    from mmengine.hooks import Hook
    from mmengine.model import is_model_wrapper
    from torch.nn.modules.batchnorm import _BatchNorm

    class BNAverageHook(Hook):
        """All-reduces (mean) the running statistics of every BatchNorm that is not SyncBN."""

        priority = "NORMAL"

        def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
            """Average the statistics this iteration's forward pass updated (in one collective)."""
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            buffers = [b for m in model.modules()
                       if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm) and m.track_running_stats
                       for b in (m.running_mean, m.running_var)]
            if not buffers:
                return
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
                b.copy_(part.view_as(b))

    return BNAverageHook()


def _progress_hook(disable: bool = False):
    """An mmengine hook that shows training iterations with `progress.progress_bar` (a bar on a terminal,
    plain lines in a log): the runner's own logger writes to work_dir only (`_quiet_runner_cls`).
    ``disable``: ranks other than 0 count silently."""
    from mmengine.hooks import Hook

    class ProgressHook(Hook):
        """Opens the bar when training starts, at the iteration it resumed from; counts iterations."""

        priority = "VERY_LOW"

        def before_train(self, runner) -> None:
            """Open the bar (training may resume part-way)."""
            self.bar = progress_bar(runner.max_iters, initial=runner.iter, desc="segmentation", unit="iter",
                                    disable=disable)

        def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
            """Count the iteration; show its loss (mmengine's logger has read it already)."""
            if outputs and "loss" in outputs:
                self.bar.set_postfix(loss=f"{float(outputs['loss']):.3f}", refresh=False)
            self.bar.update()

        def after_train(self, runner) -> None:
            """Close the bar."""
            self.bar.close()

    return ProgressHook()


def _quiet_runner_cls():
    """mmengine's ``Runner`` with a quiet console that resumes only from weights-only checkpoints.

    Its own logger would print INFO lines (the environment report, every logged iteration); here
    everything goes to work_dir and only errors to stdout. Its own resume would unpickle
    (fully, with the switch torch >= 2.6 needs) whatever file ``last_checkpoint`` names, so a
    planted file would run code; here see `load_or_resume` and `load_checkpoint`. In a job of
    several ranks it wraps the model for DDP on the protocol's device (`wrap_model`).
    """
    from mmengine.model import is_model_wrapper
    from mmengine.registry import MODEL_WRAPPERS
    from mmengine.runner import Runner

    class QuietRunner(Runner):
        """A Runner with a quiet console and a weights-only resume confined to work_dir.

        ``device``: where the model trains; distributed (``launcher="pytorch"``), ``model_wrapper_cfg``
        wraps it (mmengine reads that from a config file's ``cfg``; given here, no config is dumped
        into work_dir) and ``sync_bn`` converts its BatchNorm to SyncBN.
        """

        def __init__(self, *args, device: torch.device = torch.device("cpu"), sync_bn: bool = False,
                     model_wrapper_cfg: dict | None = None, **kwargs):
            # Checkpoints not resumed from, with the reason: the protocol reports them when done.
            self.refused_checkpoints: list[str] = []
            self.train_device, self.sync_bn = torch.device(device), bool(sync_bn)
            self.ddp_cfg = dict(model_wrapper_cfg or dict(type="MMDistributedDataParallel"))
            super().__init__(*args, **kwargs)

        def wrap_model(self, model_wrapper_cfg, model):
            """One process: mmengine's own (the model as it is, SyncBN reverted; `_build_runner` then
            moves it to the device). Distributed: the model on ``device``, BatchNorm made SyncBN if
            ``sync_bn``, wrapped as the ``model_wrapper_cfg`` given to the runner says
            (``MMDistributedDataParallel``).

            mmengine's own distributed branch moves the model to ``get_device()`` (the current GPU
            whenever one exists, even for a CPU job) and reads ``LOCAL_RANK`` from the environment
            even when the config gives ``device_ids``; here the device is the protocol's, and
            ``device_ids`` come from the config alone (None on the CPU, the rank's GPU on CUDA).
            """
            if not self.distributed or is_model_wrapper(model):
                return super().wrap_model(model_wrapper_cfg, model)
            model = model.to(self.train_device)
            if self.sync_bn:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return MODEL_WRAPPERS.build(dict(self.ddp_cfg), default_args=dict(module=model))

        def train(self):
            """mmengine's training; afterwards the model holds the trained weights, so a `val` that
            follows scores them as they are instead of resuming them from the last checkpoint (which
            rank 0 alone wrote: other ranks need not see it, nor read it)."""
            model = super().train()
            self._has_loaded = True
            return model

        def build_logger(self, *args, **kwargs):
            """The usual logger, its console handler raised to ERROR."""
            logger = super().build_logger(*args, **kwargs)
            for handler in logger.handlers:
                if not isinstance(handler, logging.FileHandler):
                    handler.setLevel(logging.ERROR)
            return logger

        def load_or_resume(self) -> None:
            """Resume from the newest ``iter_<N>.pth`` in work_dir that loads weights-only, if any.

            A file that does not (a crafted pickle, a truncated write, a link out of work_dir)
            is never executed: it is noted in ``refused_checkpoints``, the next older one is
            tried, and with none left training starts from scratch.

            In a job of several ranks every rank reads the shared work_dir and resumes on its own;
            the ranks then compare what they resumed from, and a difference (a file one rank could
            read and another not) is an error rather than ranks training different models.
            """
            if self._has_loaded:
                return
            resumed = None
            for path in _checkpoints(Path(self.work_dir)):
                try:
                    self.resume(str(path))
                    resumed = path.name
                    break
                except _UnusableCheckpoint as exc:
                    note = f"{path}: {exc}"
                    self.logger.warning(f"not resuming from {note}")
                    if note not in self.refused_checkpoints:  # once per file, however often asked
                        self.refused_checkpoints.append(note)
            if self.distributed:
                seen = gather_objects([resumed])
                if len(set(seen)) > 1:
                    raise RuntimeError(f"segmentation: the ranks resumed from different checkpoints of "
                                       f"{self.work_dir} ({', '.join(f'rank {r}: {n}' for r, n in enumerate(seen))}): "
                                       f"is the work_dir on a file system every rank sees the same way?")

        def load_checkpoint(self, filename, map_location="cpu", strict=False, revise_keys=None):
            """Read ``filename`` with the harness's weights-only loader, confined to work_dir, and
            load its weights into the model (``Runner.resume`` then restores the rest).

            Raises `_UnusableCheckpoint`, with nothing changed, for a file that cannot be read
            that way or is not one of this protocol's. ``map_location`` and ``revise_keys`` are
            not needed: tensors come to the CPU and are copied onto the model's device, and
            the names are those the same model saved. ``strict`` is implied by the check.
            """
            model = self.model.module if is_model_wrapper(self.model) else self.model
            try:
                checkpoint = load_checkpoint(Path(filename), within=Path(self.work_dir))
            except pickle.UnpicklingError:  # torch's long advice to unpickle anyway is not repeated
                raise _UnusableCheckpoint("torch.load(weights_only=True) refuses it (it is not tensors and plain "
                                          "data only)") from None
            except Exception as exc:  # truncated zip, a link out of work_dir: unusable too
                raise _UnusableCheckpoint(f"it cannot be read ({type(exc).__name__}: {exc})"[:300]) from None
            _check_resumable(checkpoint, model)
            try:
                _restore_buffers(checkpoint["message_hub"])
            except (AssertionError, KeyError, TypeError, ValueError) as exc:  # HistoryBuffer's own checks
                raise _UnusableCheckpoint(f"its message_hub logs are malformed ({exc!r:.200})") from None
            self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
            model.load_state_dict(checkpoint["state_dict"])
            self._has_loaded = True
            self.logger.info(f"Load checkpoint from {filename}")
            return checkpoint

    return QuietRunner


def _import_mmseg() -> None:
    """Import mmseg (through the mmcv-lite stand-in if needed) and register its modules."""
    ensure_mmseg_importable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mmcv-lite / mmengine import-time notices
        from mmseg.utils import register_all_modules

        register_all_modules(init_default_scope=False)


def _build_runner(encoder: nn.Module, data, options, seed: int, *, device: torch.device, workdir: Path,
                  name: str, classes: list, indices: list[int], val_batch: int, rank_batch: int, sync_bn: bool):
    """mmengine's Runner for UperNet on a copy of ``encoder``, resuming from ``workdir``; under DDP over
    the process group's ranks when it has more than one (``launcher="pytorch"``: mmengine's
    ``setup_env`` joins the existing group rather than initialising one), each rank loading ``rank_batch``
    crops of every global batch, BatchNorm made SyncBN where ``sync_bn``."""
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    from mmseg.registry import MODELS

    crop, ignore_index = int(options.crop), int(data.ignore_index)
    enc = _prepare_encoder(encoder, crop, indices)
    backbone = dict(type=ViTPyramid, encoder=enc, indices=indices)
    model = MODELS.build(_model_cfg(backbone, len(classes), enc.embed_dim, crop, options, ignore_index))
    groups = param_groups(model, options.lr, options.weight_decay, options.layer_decay, len(enc.blocks))
    optimizer = torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.999), weight_decay=options.weight_decay)
    # bf16 autocast on CUDA (the study's "auto" precision; MAE's config uses fp16 AMP), fp32 on CPU.
    optim = (AmpOptimWrapper(optimizer=optimizer, dtype="bfloat16") if device.type == "cuda"
             else OptimWrapper(optimizer=optimizer))
    iters, warmup = int(options.iters), min(int(options.warmup_iters), int(options.iters))
    # MAE's ADE20K schedule: linear warmup from 1e-6 x lr, then poly (power 1) decay to 0.
    schedule = []
    if warmup:
        schedule.append(dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=warmup))
    if warmup < iters:
        schedule.append(dict(type="PolyLR", power=1.0, eta_min=0.0, begin=warmup, end=iters, by_epoch=False))
    train_pipe, test_pipe = _pipelines(crop, bool(data.reduce_zero_label), options.scale_range)
    # Loading and augmentation in `options.workers` processes per rank (0: in this one). Each crop is seeded
    # by its stream position (`PositionDataset`), so the crops do not depend on the worker count.
    workers = int(options.workers)
    loader = dict(num_workers=workers, persistent_workers=workers > 0)
    rank, size = world()
    distributed = {}
    if size > 1:
        # MMDistributedDataParallel as mmengine builds it (buffers not broadcast: SyncBN keeps them
        # equal on CUDA, `_bn_average_hook` on the CPU), on the rank's GPU, or device_ids=None on the CPU.
        # Every parameter of the pruned encoder, pyramid and heads reaches the loss: no unused ones.
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        distributed = dict(launcher="pytorch", model_wrapper_cfg=dict(
            type="MMDistributedDataParallel", device_ids=device_ids, broadcast_buffers=False,
            find_unused_parameters=False))
    hooks = [_weights_only_checkpoint_hook(), _progress_hook(disable=rank != 0)]
    if size > 1 and not sync_bn:
        hooks.append(_bn_average_hook())
    runner = _quiet_runner_cls()(
        model=model, work_dir=str(workdir), experiment_name=name, default_scope="mmseg",
        device=device, sync_bn=sync_bn, **distributed,
        # Each rank loads its slice of every global batch (`GlobalStreamSampler`), b = B / W crops,
        # each augmented as its stream position says (`PositionDataset`).
        train_dataloader=dict(loader, batch_size=rank_batch,
                              dataset=dict(type=PositionDataset, dataset=_dataset_cfg(data, "train", train_pipe),
                                           seed=seed),
                              sampler=dict(type=GlobalStreamSampler, batch_size=int(options.batch_size))),
        # DefaultSampler (not shuffled) gives rank r images r, r + W, ..., padded to equal counts by
        # repeating the first ones; IoUMetric's collection interleaves the ranks' results back into
        # dataset order and cuts the padding, so each image counts once.
        val_dataloader=dict(loader, batch_size=val_batch, dataset=_dataset_cfg(data, "val", test_pipe),
                            sampler=dict(type="DefaultSampler", shuffle=False)),
        # Validation only once, after training, so that a resumed run scores the same way.
        train_cfg=dict(type=_resumable_loop_cls(), max_iters=iters, val_interval=iters + 1, val_begin=iters + 1),
        val_cfg=dict(type="ValLoop"),
        # collect_device "gpu" is mmengine's name for gathering through the process group
        # (all_gather_object, gloo too); its "cpu" mode would write pickles under ./.dist_test.
        val_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"], ignore_index=ignore_index,
                           collect_device="gpu"),
        optim_wrapper=optim, param_scheduler=schedule,
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=min(50, max(1, iters // 10)), log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            # Ten checkpoints per run (mmseg: every 16k of 160k iterations); only the last is kept.
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=max(1, iters // 10),
                            max_keep_ckpts=1, save_last=True),
        ),
        custom_hooks=hooks,
        log_processor=dict(by_epoch=False),
        resume=True,  # from work_dir's newest checkpoint, if there is one (QuietRunner.load_or_resume)
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="nccl"),
                     mp_cfg=dict(mp_start_method=multiprocessing.get_start_method(), opencv_num_threads=0)),
        randomness=dict(seed=seed),
        log_level="INFO",
    )
    if size == 1:
        runner.model.to(device)  # the Runner moved it to its own choice of device (distributed: `wrap_model`)
    return runner


def segment(encoder: nn.Module, data, options, *, seed: int, device, workdir: Path, batch_size: int):
    """Fine-tune ``encoder`` (a copy) with UperNet on ``data`` and return ``(metrics, options)``.

    ``data`` is a `SegmentationSet`: ``root`` in its mmseg ``layout`` (dataset class, folders,
    suffixes), ``classes`` by mask value (toy: ``["background", *shapes]``; empty for ADE20K, whose
    mmseg dataset class names its 150), ``reduce_zero_label``, ``ignore_index`` and
    ``val_batch_size`` (None: ``batch_size``, the harness's ``eval.batch_size``; ADE20K validates one
    image at a time, as its images differ in size). ``options`` is the protocol's
    ``Segmentation.Options`` (``eval.segmentation.*``). ``workdir`` keeps mmengine's logs and
    checkpoints: a rerun resumes from the last checkpoint, and after a finished run returns the
    stored result; a run made there with other settings or another encoder is discarded and
    training starts afresh.

    Metrics (percent, ``IoUMetric``): ``mIoU``, ``aAcc``, ``mAcc`` on the validation split and
    ``background_mIoU``, the mIoU of predicting label 0 everywhere.

    In a job of several ranks every rank calls it with the same arguments (``device`` the rank's own;
    ``workdir`` one folder on a file system they share, which resuming needs: every rank reads the
    checkpoint, and ranks that resume from different ones stop with an error; folders that differ by
    rank, as ``mugbench eval``'s temporary ones, serve runs from scratch, rank 0's keeping the records)
    and it trains under DDP: ``options.batch_size`` is the
    global batch, split evenly over the ranks (`check_batch_split`), the crops of every iteration
    are those one process would train on (`GlobalStreamSampler`), BatchNorm is SyncBN on CUDA and per
    rank on the CPU (torch's SyncBatchNorm needs a GPU), validation is sharded and gathered. Rank 0
    decides (result already there, stale run to discard) and alone writes the records; every rank
    returns the same ``(metrics, options)``, whose options then carry ``ranks``.
    """
    device = torch.device(device)
    workdir = Path(workdir).resolve()
    crop, indices = int(options.crop), block_indices(len(encoder.blocks))
    if int(options.iters) < 1:
        raise ValueError(f"eval.segmentation.iters must be at least 1, got {options.iters}")
    rank, size = world()
    sync_bn = device.type == "cuda" and size > 1  # torch's SyncBatchNorm refuses CPU tensors
    rank_batch = check_batch_split(options.batch_size, size, synced_bn=sync_bn)
    _import_mmseg()
    classes = class_names(data)
    recorded = {
        "head": "UPerHead+FCNHead", "iters": options.iters, "batch_size": options.batch_size, "crop": crop,
        "lr": options.lr, "weight_decay": options.weight_decay, "layer_decay": options.layer_decay,
        "warmup_iters": options.warmup_iters, "channels": options.channels, "aux_weight": options.aux_weight,
        "scale_range": options.scale_range,
        "blocks": indices, "strides": list(ViTPyramid.strides), "schedule": "linear-warmup+poly1",
        "optimizer": "adamw(0.9,0.999)", "test_mode": "slide",
        "photometric": True,  # `_pipelines`' PhotoMetricDistortion, on every set
        "precision": "bf16" if device.type == "cuda" else "fp32",
        **determinism_note(device),
    }
    # The number of ranks and loader workers is a record of how the run went, not part of the setting it
    # resumes by: on CUDA (SyncBN, one global sample stream) training is the same algorithm on any number
    # of GPUs, and crops are seeded by their place in the stream whatever process loads them.
    signature = {"options": dict(recorded), "seed": int(seed), "dataset": data.name, "classes": classes,
                 "encoder_sha256": _fingerprint(encoder)}
    recorded["workers"] = int(options.workers)
    if size > 1:
        recorded["ranks"] = size
    ignore_index = int(data.ignore_index)
    # Rank 0 reads and changes the work_dir; every rank then takes its branch. The broadcast is also
    # the barrier: the other ranks receive the decision only once rank 0's files are in place.
    done = None
    if rank == 0:
        done = _read_json(workdir / _RESULT_FILE)
        if done is None or done.get("signature") != signature:
            done = None
            previous = _read_json(workdir / _RUN_FILE)
            if previous is not None and previous != signature:
                _discard_run(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            _write_json(workdir / _RUN_FILE, signature)
    done = broadcast_object(done)
    if done is not None:
        return done["metrics"], done["options"]
    val_batch = int(data.val_batch_size if data.val_batch_size is not None else batch_size)

    # Unique per call: mmengine keeps loggers, visualizers and scopes in global tables by name.
    name = f"segmentation_{os.getpid()}_{time.time_ns()}"
    runner = None
    try:
        with _isolated_globals(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)  # the pyramid's and heads' init
            runner = _build_runner(encoder, data, options, seed, device=device, workdir=workdir, name=name,
                                   classes=classes, indices=indices, val_batch=val_batch, rank_batch=rank_batch,
                                   sync_bn=sync_bn)
            # ``train`` resumes from work_dir's newest checkpoint when there is one, read weights-only
            # (QuietRunner.load_or_resume); ``val`` then scores the weights in memory.
            # mmengine prints some notices (checkpoint found / loaded) with print(): into the log.
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                runner.train()
                scores = runner.val()
            if printed.getvalue().strip():
                runner.logger.info(printed.getvalue().strip())
            # Rank 0's result is every rank's: it alone reads the val labels again for the floor.
            floor = _constant_prediction_scores(runner.val_dataloader.dataset, classes, ignore_index) \
                if rank == 0 else None
    finally:
        if runner is not None:  # release the log file: a study runs this once per method
            for handler in list(runner.logger.handlers):
                if isinstance(handler, logging.FileHandler):
                    handler.close()
                    runner.logger.removeHandler(handler)
    result = None
    if rank == 0:
        # Warned here (warnings are silenced while mmengine runs): every rank refused the same files.
        for note in runner.refused_checkpoints:
            warnings.warn(f"segmentation: not resumed from {note}; a checkpoint that cannot be read with "
                          f"weights_only=True is never unpickled, so training started from an earlier one or "
                          f"from scratch", stacklevel=2)
        metrics = {k: float(scores[k]) for k in ("mIoU", "aAcc", "mAcc")}  # IoUMetric's, gathered over ranks
        metrics["background_mIoU"] = floor["mIoU"]
        _write_json(workdir / _RESULT_FILE, {"signature": signature, "metrics": metrics, "options": recorded})
        result = metrics, recorded
    # Rank 0's result everywhere; received once result.json is written (a barrier, as above).
    return broadcast_object(result)


def _discard_run(workdir: Path) -> None:
    """Forget a run made with other settings or another encoder (the study keys its work_dirs by
    pre-training settings only): its checkpoints and result go, its logs stay."""
    for path in [*workdir.glob("iter_*.pth"), workdir / "last_checkpoint", workdir / _RESULT_FILE,
                 workdir / _RUN_FILE]:
        path.unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    """A JSON file's content, or None if absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict) -> None:
    """Write JSON atomically (temp file, then rename)."""
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True))
