"""The one shard reader: webdataset tars in the img2dataset layout, toy or CC3M alike.

Determinism: the shard order is shuffled from (seed, epoch), the sample shuffle buffer
of each (rank, worker) uses an RNG seeded from (seed, epoch, rank, worker), and every
sample's augmentations are seeded from (seed, epoch, key). So the same seed, epoch and
worker count give the same batches, and a given sample gets the same crops whatever
the worker count.

Robustness: bad samples are skipped and counted by reason through ``SkipCounter``
(webdataset exception handlers that count, warn once per reason, and continue); images in
the wrong mode (CMYK, palette, alpha, greyscale) are repaired to RGB and counted apart.

Multi-node: with ``resampled=True`` every (rank, worker) draws shards with replacement from
its own seeded stream and an epoch is a fixed number of batches, as open_clip does for
LAION; otherwise shards are split across ranks and workers and an epoch is one pass.

Pre-training does not use `make_loader`: it reads the same per-sample stages through the fixed virtual
streams of `streams.stream_batches`, whose batches do not depend on ranks, workers or accumulation.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2
from webdataset.autodecode import DecodingError
from webdataset.tariterators import group_by_keys, tar_file_iterator, url_opener

from .catalog import expand_urls
from .decode import BadImage, decode_mask, decode_rgb
from .transforms import apply_views, sample_seed
from .tokenizer import trim_padding

log = logging.getLogger(__name__)

# img2dataset writes one of these; the first present is the sample's image.
IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
MASK_KEY = "seg.png"
# Only these fields are decoded by webdataset: its default handlers would also unpickle
# .pyd/.pth members, which we must never do with shards downloaded from the web. Images
# are decoded by `decode_rgb`, which knows what a bad image is.
_METADATA_KEYS = ("txt", "json", "cls")
# Member suffixes we read, longest first: a member is (key, suffix) by the longest of these
# that ends its name, so keys may contain dots ("img.v2.jpg" is key "img.v2").
_SUFFIXES = tuple(sorted((*IMAGE_KEYS, MASK_KEY, *_METADATA_KEYS), key=len, reverse=True))


@dataclass(frozen=True)
class DecodeOptions:
    """How images are decoded: see `decode.decode_rgb` (``min_size``, ``draft_to``,
    ``repair_modes``)."""

    min_size: int = 0
    draft_to: int | None = None
    repair_modes: bool = True


def split_sample_key(fname: str) -> tuple[str | None, str | None]:
    """``(key, suffix)`` of a tar member by its known suffix; ``(None, None)`` for members we
    do not read, so that stray files (``.npy``, ``.parquet``) never start a sample of their own.

    webdataset's default splits at the first dot of the file name, which cuts keys such as
    ``photo.2019.jpg`` in two.
    """
    lower = fname.lower()
    for suffix in _SUFFIXES:
        if lower.endswith("." + suffix) and len(fname) > len(suffix) + 1:
            return fname[:-len(suffix) - 1], suffix
    return None, None


class TarSamples:
    """Stage: shard URLs -> samples (dicts of raw member bytes), grouped by `split_sample_key`;
    with ``only``, members of other suffixes are not read at all.

    A shard that breaks mid-way (truncated download) ends there: what was read before the
    break is kept, the break is reported to ``handler`` once, and reading goes on with the next
    shard. (webdataset's own expander reports such a break twice and then lets the partial
    last sample run into the next shard's first.)
    """

    def __init__(self, handler: Callable[[Exception], bool], only: Sequence[str] | None = None):
        self.handler, self.only = handler, tuple(only) if only else None

    def _wanted(self, fname: str) -> bool:
        return split_sample_key(fname)[1] in self.only

    def _members(self, src: Iterable[dict]) -> Iterable[dict]:
        for source in url_opener(src, handler=self.handler):
            url, broken = source["url"], []

            def stop_shard(exn: Exception) -> bool:
                broken.append(exn)
                return False  # leave this shard's iterator; the break is reported below

            try:
                for member in tar_file_iterator(source["stream"], handler=stop_shard,
                                                select_files=self._wanted if self.only else None):
                    member["__url__"] = url
                    yield member
            except Exception as exn:  # a header that cannot be read ends the shard too
                broken.append(exn)
            finally:
                source["stream"].close()
            if broken:
                broken[0].args = (*broken[0].args, url)
                self.handler(broken[0])
            yield {}  # end of shard: the last sample is complete, never merged with the next shard's

    def __call__(self, src: Iterable[dict]) -> Iterable[dict]:
        """Open each shard, list its members, group them into samples."""
        return group_by_keys(self._members(src), keys=split_sample_key, handler=self.handler)


class SkipCounter:
    """Counts skipped samples by reason; its methods are webdataset exception handlers.

    Reasons used: ``truncated_tar`` (unreadable or cut-off tar), ``missing_shard``,
    ``undecodable_image``, ``tiny_image``, ``wrong_mode`` (only when modes are not
    repaired), ``undecodable_mask``, ``bad_metadata`` (txt/json/cls that do not decode),
    ``missing_image``, ``missing_caption``, ``empty_caption``, ``missing_label``,
    ``missing_mask``. Repairs (``cmyk``, ``palette``, ``alpha``, ``grayscale``) are counted in
    ``repaired``; the sample is kept. Each process (DataLoader worker) holds its own copy;
    ``take_delta`` hands the counts since the previous call to the batch, so the trainer sums
    them across workers. With ``keep_keys`` every skip's ``(key, reason)`` is listed in
    ``bad_keys`` (for ``mugbench data check --fix-list``).
    """

    def __init__(self, keep_keys: bool = False) -> None:
        """Start with no skips."""
        self.counts: Counter = Counter()
        self.repaired: Counter = Counter()
        self._reported: Counter = Counter()
        self._reported_repairs: Counter = Counter()
        self._warned: set[str] = set()
        self.bad_keys: list[tuple[str, str]] | None = [] if keep_keys else None

    def skip(self, reason: str, detail: object = "", key: str = "-") -> None:
        """Record one skip of sample ``key`` ("-" when no single sample is to blame); log a
        warning the first time each reason occurs."""
        self.counts[reason] += 1
        if self.bad_keys is not None:
            self.bad_keys.append((key, reason))
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("skipping bad data (%s): %s; further '%s' skips are only counted",
                        reason, detail, reason)

    def repair(self, kind: str) -> None:
        """Record one image repaired to RGB (the sample is kept)."""
        self.repaired[kind] += 1

    def tar_handler(self, exn: Exception) -> bool:
        """Handler for the tar-reading stage: count and continue with the next shard."""
        where = next((a for a in reversed(exn.args) if isinstance(a, str) and a), "?")  # webdataset appends the URL
        self.skip("missing_shard" if isinstance(exn, FileNotFoundError) else "truncated_tar", f"{where}: {exn!r}")
        return True

    def decode_handler(self, exn: Exception) -> bool:
        """Handler for the metadata decode stage: count and continue."""
        field = getattr(exn, "k", None) if isinstance(exn, DecodingError) else None
        key = getattr(exn, "key", "-")
        self.skip("bad_metadata", f"{key}.{field}: {exn.__cause__ or exn!r}", key)
        return True

    def take_delta(self) -> tuple[dict[str, int], dict[str, int]]:
        """Skips and repairs accumulated since the previous call."""
        skipped, repaired = self.counts - self._reported, self.repaired - self._reported_repairs
        self._reported, self._reported_repairs = Counter(self.counts), Counter(self.repaired)
        return dict(skipped), dict(repaired)


class _ToExample:
    """Turns a decoded webdataset sample into a flat example (or None to skip it)."""

    def __init__(self, counter: SkipCounter, transforms: Sequence[Callable] | None, seed: int, epoch: int,
                 need_caption: bool, need_label: bool, need_mask: bool, mask_size: int | None,
                 decode: DecodeOptions = DecodeOptions()):
        self.counter, self.transforms, self.seed, self.epoch = counter, transforms, seed, epoch
        self.need_caption, self.need_label, self.need_mask = need_caption, need_label, need_mask
        self.mask_size, self.decode = mask_size, decode

    def __call__(self, sample: dict) -> dict | None:
        """Validate, decode and transform one sample; skipped samples are counted, not raised."""
        key = sample["__key__"]
        encoded = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if encoded is None:
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
        try:
            image, repair = decode_rgb(encoded, min_size=self.decode.min_size, draft_to=self.decode.draft_to,
                                       repair_modes=self.decode.repair_modes)
            mask = decode_mask(mask) if self.need_mask else None
        except BadImage as bad:
            return self._skip(bad.kind, key)
        if repair:
            self.counter.repair(repair)
        views = [image] if self.transforms is None else \
            apply_views(image, self.transforms, sample_seed(self.seed, self.epoch, key))
        example = {"key": key, "views": views, "caption": (caption or "").strip(), "label": label,
                   "captions": meta.get("captions"), "objects": meta.get("objects")}
        if self.need_mask:
            size = self.mask_size or int(views[0].shape[-1])
            example["mask"] = _mask_tensor(mask, size)
        return example

    def _skip(self, reason: str, key: str) -> None:
        self.counter.skip(reason, key, key)
        return None


def _mask_tensor(mask: Image.Image, size: int) -> torch.Tensor:
    """Mask -> LongTensor [size, size]: same geometry as the eval transform (resize the
    shorter side, centre-crop) but NEAREST, so class ids are never blended."""
    resize = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.NEAREST), v2.CenterCrop(size)])
    return torch.from_numpy(np.array(resize(mask), dtype=np.int64))


class _Collate:
    """Stacks examples into the batch dict and attaches this worker's skip counts."""

    def __init__(self, counter: SkipCounter, tokenizer: Callable | None, need_label: bool, need_mask: bool,
                 trim_text: bool = True):
        self.counter, self.tokenizer = counter, tokenizer
        self.need_label, self.need_mask = need_label, need_mask
        # Off where parts of one batch are collated apart and concatenated later (`streams`): they must
        # share one text length, so the concatenated batch is trimmed instead.
        self.trim_text = trim_text

    def __call__(self, examples: list[dict]) -> dict:
        """Build the batch dict described in ``make_loader``."""
        views = [torch.stack([ex["views"][i] for ex in examples]) for i in range(len(examples[0]["views"]))]
        captions = [ex["caption"] for ex in examples]
        batch = {"image": views[0], "caption": captions, "key": [ex["key"] for ex in examples]}
        if len(views) > 1:
            batch["image_views"] = views
        if self.tokenizer is not None:
            batch["text"] = self.tokenizer(captions)
            if self.trim_text and getattr(self.tokenizer, "pad_id", None) is not None:
                batch["text"] = trim_padding(batch["text"], self.tokenizer.pad_id)
        if self.need_label:
            batch["label"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        if self.need_mask:
            batch["mask"] = torch.stack([ex["mask"] for ex in examples])
        batch["skipped"], batch["repaired"] = self.counter.take_delta()
        return batch


class _Batches:
    """Stage: examples -> collated batches.

    With ``tally_tail``, a stream that ends after skips no batch has reported yields one last
    ``{"skipped", "repaired"}`` dict without images, so the counts add up exactly even when
    the final partial batch (which would have carried them) is dropped.
    """

    def __init__(self, size: int, collate: _Collate, drop_last: bool, tally_tail: bool):
        self.size, self.collate, self.drop_last, self.tally_tail = size, collate, drop_last, tally_tail

    def __call__(self, src: Iterable[dict]) -> Iterable[dict]:
        """Group ``src`` into batches of ``size``."""
        chunk = []
        for example in src:
            chunk.append(example)
            if len(chunk) == self.size:
                yield self.collate(chunk)
                chunk = []
        if chunk and not self.drop_last:
            yield self.collate(chunk)
        elif self.tally_tail:
            skipped, repaired = self.collate.counter.take_delta()
            if skipped or repaired:
                yield {"skipped": skipped, "repaired": repaired}


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


class _ResampledShards(torch.utils.data.IterableDataset):
    """Stage: an endless stream of shard URLs drawn with replacement, from an RNG seeded per
    (seed, epoch, rank, worker), so every worker of every node reads its own sequence and a
    rerun reads the same one."""

    def __init__(self, urls: Sequence[str], seed: int, epoch: int):
        self.urls, self.seed, self.epoch = list(urls), seed, epoch

    def __iter__(self):
        """Yield ``{"url": ...}`` forever."""
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(sample_seed(self.seed, self.epoch, f"resample/{rank}/{worker}"))
        while True:
            yield {"url": rng.choice(self.urls)}


def _sample_pipeline(urls: Sequence[str], counter: SkipCounter, to_example: _ToExample, *, shuffle: bool,
                     seed: int, epoch: int, shuffle_buffer: int, split: bool = True,
                     resampled: bool = False) -> list:
    """The per-sample stages shared by the loader, the checker and the eval reader."""
    urls = list(urls)
    if resampled:
        stages: list = [_ResampledShards(urls, seed, epoch)]
    else:
        if shuffle:
            random.Random(sample_seed(seed, epoch, "shards")).shuffle(urls)
        stages = [wds.SimpleShardList(urls)]
        if split:
            stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(TarSamples(counter.tar_handler))
    if shuffle:
        stages.append(_SeededShuffle(shuffle_buffer, seed, epoch))
    return stages + example_stages(counter, to_example)


def example_stages(counter: SkipCounter, to_example: _ToExample) -> list:
    """The stages after reading (and shuffling) raw samples: decode the metadata only, then turn each
    sample into an example, dropping (and counting in ``counter``) the ones that must be skipped."""
    return [wds.decode(only=_METADATA_KEYS, handler=counter.decode_handler), wds.map(to_example)]


def make_loader(urls: str | Sequence[str], *, batch_size: int, image_transforms: Sequence[Callable],
                tokenizer: Callable[[list[str]], torch.Tensor] | None, need_caption: bool,
                need_label: bool = False, need_mask: bool = False, mask_size: int | None = None,
                shuffle: bool, seed: int, epoch: int = 0, num_workers: int = 0, drop_last: bool = True,
                shuffle_buffer: int = 2000, decode: DecodeOptions = DecodeOptions(), resampled: bool = False,
                batches_per_epoch: int | None = None, pin_memory: bool = False,
                prefetch_factor: int | None = None, tally_tail: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over webdataset shards yielding batch dicts, for one epoch.

    Keys: ``image`` FloatTensor [B,3,S,S] (first view); ``image_views`` list of tensors,
    one per view (only with more than one view); ``text`` LongTensor [B, L] (only with a
    tokenizer; L: the batch's longest caption rounded up to 8, at most the context, `trim_padding`);
    ``caption`` list[str]; ``label`` LongTensor [B] (``need_label``,
    from ``.cls``, else ``.json["label"]``); ``mask`` LongTensor [B,M,M] (``need_mask``,
    ``M = mask_size`` or the view size); ``key`` list[str]; ``skipped`` dict reason->count
    of samples this worker skipped since its previous batch (sum them over batches);
    ``repaired`` dict kind->count of images converted to RGB, likewise.

    ``resampled``: draw shards with replacement per (rank, worker); the epoch then ends after
    ``batches_per_epoch`` batches on this rank (required). ``pin_memory`` and
    ``prefetch_factor`` go to the DataLoader (the latter only with workers). ``tally_tail``:
    each worker ends with an image-less ``{"skipped", "repaired"}`` dict when its last skips
    were in no batch, so summing over everything yielded gives exact counts.

    For segmentation pass the deterministic ``build_eval_transform`` as the only view:
    the mask is resized with the same resize+centre-crop geometry, so random crops or
    flips would misalign image and mask.

    Same ``seed``, ``epoch`` and ``num_workers`` give identical batches. Shards are split
    across ranks and workers, so each worker should get at least one shard; with
    ``drop_last`` each worker drops its own final partial batch.
    """
    urls = expand_urls(urls)
    if resampled and not batches_per_epoch:
        raise ValueError("resampled shards are an endless stream: give batches_per_epoch")
    counter = SkipCounter()
    to_example = _ToExample(counter, list(image_transforms), seed, epoch, need_caption, need_label,
                            need_mask, mask_size, decode)
    pipeline = wds.DataPipeline(
        *_sample_pipeline(urls, counter, to_example, shuffle=shuffle, seed=seed, epoch=epoch,
                          shuffle_buffer=shuffle_buffer, resampled=resampled),
        _Batches(batch_size, _Collate(counter, tokenizer, need_label, need_mask), drop_last, tally_tail),
    )
    if resampled:
        # Each worker yields its share of the rank's batches; the DataLoader interleaves them.
        pipeline = pipeline.with_epoch(nbatches=math.ceil(batches_per_epoch / max(1, num_workers)))
    extra = {"prefetch_factor": prefetch_factor} if num_workers and prefetch_factor else {}
    # Its own generator: a DataLoader draws a base seed when iterated, and drawing it from the global
    # RNG would shift the masks of every later step, so a mid-epoch resume would no longer be exact.
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, "loader"))
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers, generator=generator,
                                       persistent_workers=False, pin_memory=pin_memory, **extra)


def read_labelled_images(urls: str | Sequence[str]) -> list[tuple]:
    """Every labelled sample of a (small) split, in shard order, as ``(decoded RGB PIL image, label, key)``:
    what an augmenting protocol re-reads each epoch (`evalset.ShardTrainBatches`)."""
    counter = SkipCounter()
    to_example = _ToExample(counter, None, 0, 0, False, True, False, None)
    stages = _sample_pipeline(expand_urls(urls), counter, to_example, shuffle=False, seed=0, epoch=0,
                              shuffle_buffer=0, split=False)
    return [(ex["views"][0], int(ex["label"]), ex["key"]) for ex in wds.DataPipeline(*stages) if ex is not None]


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
