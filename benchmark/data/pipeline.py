"""The one shard reader: webdataset tars in the img2dataset layout, toy or CC3M alike.

Determinism: the shard order is shuffled from (seed, epoch), the sample shuffle buffer
of each (rank, worker) uses an RNG seeded from (seed, epoch, rank, worker), and every
sample's augmentations are seeded from (seed, epoch, key). So the same seed, epoch and
worker count give the same batches, and a given sample gets the same crops whatever
the worker count.

Robustness: bad samples are skipped and counted by reason through ``SkipCounter``
(webdataset exception handlers that count, warn once per reason, and continue).
"""

from __future__ import annotations

import io
import logging
import random
from collections import Counter
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2
from webdataset.autodecode import DecodingError

from .catalog import expand_urls
from .transforms import apply_views, sample_seed

log = logging.getLogger(__name__)

# img2dataset writes one of these; the first present is the sample's image.
IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
MASK_KEY = "seg.png"
# Only these fields are decoded: webdataset's default handlers would also unpickle
# .pyd/.pth members, which we must never do with shards downloaded from the web.
_DECODED_KEYS = (*IMAGE_KEYS, MASK_KEY, "txt", "json", "cls")


class SkipCounter:
    """Counts skipped samples by reason; its methods are webdataset exception handlers.

    Reasons used: ``truncated_tar`` (unreadable or cut-off tar), ``missing_shard``,
    ``undecodable_image``, ``undecodable_mask``, ``bad_metadata`` (txt/json/cls that do
    not decode), ``missing_image``, ``missing_caption``, ``empty_caption``,
    ``missing_label``, ``missing_mask``. Each process (DataLoader worker) holds its own
    copy; ``take_delta`` hands the counts since the previous call to the batch, so the
    trainer sums them across workers.
    """

    def __init__(self) -> None:
        """Start with no skips."""
        self.counts: Counter = Counter()
        self._reported: Counter = Counter()
        self._warned: set[str] = set()

    def skip(self, reason: str, detail: object = "") -> None:
        """Record one skip; log a warning the first time each reason occurs."""
        self.counts[reason] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("skipping bad data (%s): %s; further '%s' skips are only counted",
                        reason, detail, reason)

    def tar_handler(self, exn: Exception) -> bool:
        """Handler for the tar-reading stage: count and continue with the next shard."""
        self.skip("missing_shard" if isinstance(exn, FileNotFoundError) else "truncated_tar", exn)
        return True

    def decode_handler(self, exn: Exception) -> bool:
        """Handler for the decode stage: classify by the field that failed, then continue."""
        field = getattr(exn, "k", None) if isinstance(exn, DecodingError) else None
        cause = exn.__cause__ or exn
        if field == MASK_KEY:
            self.skip("undecodable_mask", f"{getattr(exn, 'key', '?')}: {cause!r}")
        elif field in IMAGE_KEYS:
            self.skip("undecodable_image", f"{getattr(exn, 'key', '?')}: {cause!r}")
        else:
            self.skip("bad_metadata", f"{getattr(exn, 'key', '?')}.{field}: {cause!r}")
        return True

    def take_delta(self) -> dict[str, int]:
        """Counts accumulated since the previous call."""
        delta = self.counts - self._reported
        self._reported = Counter(self.counts)
        return dict(delta)


def _decode_image(key: str, data: bytes):
    """webdataset decoder: masks to mode-L PIL (values kept), other images to RGB PIL."""
    ext = key.lstrip(".").lower()
    if ext == MASK_KEY:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("L") if img.mode not in ("L", "P") else img.copy()
    if ext in IMAGE_KEYS:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    return None


class _ToExample:
    """Turns a decoded webdataset sample into a flat example (or None to skip it)."""

    def __init__(self, counter: SkipCounter, transforms: Sequence[Callable] | None, seed: int, epoch: int,
                 need_caption: bool, need_label: bool, need_mask: bool, mask_size: int | None):
        self.counter, self.transforms, self.seed, self.epoch = counter, transforms, seed, epoch
        self.need_caption, self.need_label, self.need_mask = need_caption, need_label, need_mask
        self.mask_size = mask_size

    def __call__(self, sample: dict) -> dict | None:
        """Validate and transform one sample; skipped samples are counted, not raised."""
        key = sample["__key__"]
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image is None:
            return self._skip("missing_image", key)
        caption = sample.get("txt")
        if self.need_caption:
            if caption is None:
                return self._skip("missing_caption", key)
            if not caption.strip():
                return self._skip("empty_caption", key)
        meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
        label = sample.get("cls", meta.get("label"))
        if self.need_label and label is None:
            return self._skip("missing_label", key)
        mask = sample.get(MASK_KEY)
        if self.need_mask and mask is None:
            return self._skip("missing_mask", key)
        views = [image] if self.transforms is None else \
            apply_views(image, self.transforms, sample_seed(self.seed, self.epoch, key))
        example = {"key": key, "views": views, "caption": (caption or "").strip(), "label": label,
                   "captions": meta.get("captions"), "objects": meta.get("objects")}
        if self.need_mask:
            size = self.mask_size or int(views[0].shape[-1])
            example["mask"] = _mask_tensor(mask, size)
        return example

    def _skip(self, reason: str, key: str) -> None:
        self.counter.skip(reason, key)
        return None


def _mask_tensor(mask: Image.Image, size: int) -> torch.Tensor:
    """Mask -> LongTensor [size, size]: same geometry as the eval transform (resize the
    shorter side, centre-crop) but NEAREST, so class ids are never blended."""
    resize = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.NEAREST), v2.CenterCrop(size)])
    return torch.from_numpy(np.array(resize(mask), dtype=np.int64))


class _Collate:
    """Stacks examples into the batch dict and attaches this worker's skip counts."""

    def __init__(self, counter: SkipCounter, tokenizer: Callable | None, need_label: bool, need_mask: bool):
        self.counter, self.tokenizer = counter, tokenizer
        self.need_label, self.need_mask = need_label, need_mask

    def __call__(self, examples: list[dict]) -> dict:
        """Build the batch dict described in ``make_loader``."""
        views = [torch.stack([ex["views"][i] for ex in examples]) for i in range(len(examples[0]["views"]))]
        captions = [ex["caption"] for ex in examples]
        batch = {"image": views[0], "caption": captions, "key": [ex["key"] for ex in examples]}
        if len(views) > 1:
            batch["image_views"] = views
        if self.tokenizer is not None:
            batch["text"] = self.tokenizer(captions)
        if self.need_label:
            batch["label"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        if self.need_mask:
            batch["mask"] = torch.stack([ex["mask"] for ex in examples])
        batch["skipped"] = self.counter.take_delta()
        return batch


class _SeededShuffle:
    """Sample-shuffle stage whose RNG is created when iteration starts, per (rank, worker),
    so re-iterating a loader and running in any worker process give the same order."""

    def __init__(self, bufsize: int, seed: int, epoch: int):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src: Iterable) -> Iterable:
        """Shuffle ``src`` through a buffer of ``bufsize`` samples."""
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(sample_seed(self.seed, self.epoch, f"samples/{rank}/{worker}"))
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


def _sample_pipeline(urls: Sequence[str], counter: SkipCounter, to_example: _ToExample, *, shuffle: bool,
                     seed: int, epoch: int, shuffle_buffer: int, split: bool = True) -> list:
    """The per-sample stages shared by the loader, the checker and the eval reader."""
    urls = list(urls)
    if shuffle:
        random.Random(sample_seed(seed, epoch, "shards")).shuffle(urls)
    stages: list = [wds.SimpleShardList(urls)]
    if split:
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=counter.tar_handler))
    if shuffle:
        stages.append(_SeededShuffle(shuffle_buffer, seed, epoch))
    stages += [
        wds.decode(_decode_image, only=_DECODED_KEYS, handler=counter.decode_handler),
        wds.map(to_example),
    ]
    return stages


def make_loader(urls: str | Sequence[str], *, batch_size: int, image_transforms: Sequence[Callable],
                tokenizer: Callable[[list[str]], torch.Tensor] | None, need_caption: bool,
                need_label: bool = False, need_mask: bool = False, mask_size: int | None = None,
                shuffle: bool, seed: int, epoch: int = 0, num_workers: int = 0, drop_last: bool = True,
                shuffle_buffer: int = 2000) -> torch.utils.data.DataLoader:
    """A DataLoader over webdataset shards yielding batch dicts, for one epoch.

    Keys: ``image`` FloatTensor [B,3,S,S] (first view); ``image_views`` list of tensors,
    one per view (only with more than one view); ``text`` LongTensor [B, context] (only
    with a tokenizer); ``caption`` list[str]; ``label`` LongTensor [B] (``need_label``,
    from ``.cls``, else ``.json["label"]``); ``mask`` LongTensor [B,M,M] (``need_mask``,
    ``M = mask_size`` or the view size); ``key`` list[str]; ``skipped`` dict reason->count
    of samples this worker skipped since its previous batch (sum them over batches).

    For segmentation pass the deterministic ``build_eval_transform`` as the only view:
    the mask is resized with the same resize+centre-crop geometry, so random crops or
    flips would misalign image and mask.

    Same ``seed``, ``epoch`` and ``num_workers`` give identical batches. Shards are split
    across ranks and workers, so each worker should get at least one shard; with
    ``drop_last`` each worker drops its own final partial batch, and skips after a
    worker's last batch are not reported through ``skipped``.
    """
    urls = expand_urls(urls)
    counter = SkipCounter()
    to_example = _ToExample(counter, list(image_transforms), seed, epoch, need_caption, need_label,
                            need_mask, mask_size)
    pipeline = wds.DataPipeline(
        *_sample_pipeline(urls, counter, to_example, shuffle=shuffle, seed=seed, epoch=epoch,
                          shuffle_buffer=shuffle_buffer),
        wds.batched(batch_size, collation_fn=_Collate(counter, tokenizer, need_label, need_mask),
                    partial=not drop_last),
    )
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False)


def check_shards(urls: str | Sequence[str], need_caption: bool = True) -> dict:
    """Read every sample of a shard set; return ``{"samples", "skipped", "shards"}``.

    Used by ``mugbench data check``: ``samples`` counts good samples, ``skipped`` maps each
    reason to its count. Images are decoded fully, so this also catches corrupt files.
    """
    urls = expand_urls(urls)
    counter = SkipCounter()
    to_example = _ToExample(counter, None, 0, 0, need_caption, False, False, None)
    stages = _sample_pipeline(urls, counter, to_example, shuffle=False, seed=0, epoch=0,
                              shuffle_buffer=0, split=False)
    good = sum(1 for _ in wds.DataPipeline(*stages))
    return {"samples": good, "skipped": dict(counter.counts), "shards": len(urls)}


def load_split_tensors(urls: str | Sequence[str], transform: Callable, need_mask: bool = False,
                       mask_size: int | None = None) -> dict:
    """Read a whole (small) evaluation split, in shard order, into memory.

    Returns ``image`` [N,3,S,S], ``label`` LongTensor [N] (-1 where a sample has none),
    ``key`` list[str], ``captions`` list[list[str]] (from ``.json`` when present, else the
    ``.txt`` caption), ``objects`` list (the ``.json`` scene description of generated data, else
    None), ``mask`` LongTensor [N,M,M] when ``need_mask``, and ``skipped``.
    """
    urls = expand_urls(urls)
    counter = SkipCounter()
    to_example = _ToExample(counter, [transform], 0, 0, False, False, need_mask, mask_size)
    stages = _sample_pipeline(urls, counter, to_example, shuffle=False, seed=0, epoch=0,
                              shuffle_buffer=0, split=False)
    examples = list(wds.DataPipeline(*stages))
    if not examples:
        raise ValueError(f"no readable samples in {urls[:3]}{' ...' if len(urls) > 3 else ''}")
    out = {
        "image": torch.stack([ex["views"][0] for ex in examples]),
        "label": torch.tensor([-1 if ex["label"] is None else int(ex["label"]) for ex in examples]),
        "key": [ex["key"] for ex in examples],
        "captions": [ex["captions"] or ([ex["caption"]] if ex["caption"] else []) for ex in examples],
        "objects": [ex["objects"] for ex in examples],
        "skipped": dict(counter.counts),
    }
    if need_mask:
        out["mask"] = torch.stack([ex["mask"] for ex in examples])
    return out
