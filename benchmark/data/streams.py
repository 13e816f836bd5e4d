"""Pre-training's one global sample stream: the same global batches whatever the number of ranks,
DataLoader workers and accumulation steps.

The rule, for epoch ``e``, global batch ``B`` and ``S = data.streams`` virtual streams:

- Shards: the shard list is shuffled with ``random.Random(sample_seed(seed, e, "shards"))`` and
  shard ``i`` of it goes to stream ``i % S``. With ``resampled`` stream ``s`` instead draws shards of
  the whole set with replacement, forever, from ``random.Random(sample_seed(seed, e, "resample/s"))``.
- Samples: stream ``s`` reads its shards in order through the shared per-sample stages of
  `pipeline` (tar reading, metadata decoding, `pipeline._ToExample` with its per-sample seeded views),
  shuffles the raw samples through its own buffer of ``shuffle_buffer`` samples, seeded by
  ``sample_seed(seed, e, "stream/s")`` (0: no shuffling), and drops bad samples (counted by reason).
- Batches: the global batch of step ``t`` is the concatenation, over ``s = 0 .. S-1`` in order, of
  the next ``B/S`` samples of stream ``s``.
- Ranks: rank ``r`` of ``W`` owns streams ``[r*S/W, (r+1)*S/W)``, that is rows ``[r*B/W, (r+1)*B/W)``
  of every global batch, and trains them as ``accum_steps`` micro-batches of ``B/(W*accum_steps)``
  rows, in order.
- Workers: a rank's streams are split contiguously over ``min(num_workers, S/W)`` DataLoader workers
  (0: the main process reads them all); each worker yields one part per step, its streams' rows, and
  the main process concatenates the parts in worker order. Workers decide who reads a stream, never
  what it reads.

So ranks, workers and accumulation only cut the same global batches differently. ``data.streams`` is
a condition of the study: it must divide ``B`` and be a multiple of ``W`` (`check_streams`), and
another value gives other batches.

Epoch end: after ``steps_per_epoch`` steps (nothing further is read), or earlier, at the first step
some stream of the whole job cannot fill its ``B/S`` rows. That step is not trained: the epoch drops
what every stream had left at it, i.e. the short stream's last samples and the rest of every other
stream. Which samples these are depends on the data, the seed and ``data.streams`` only, never on the
hardware. A rank whose streams run short yields one last image-less ``{"skipped", "repaired"}`` dict
with that step's counts and stops; other ranks may still have data at that step, and the trainer
stops every rank together at the first step one of them has no batch
(``train.loop._while_every_rank_has_data``), which is what makes the rule hold for the whole job.
With ``resampled`` no stream runs short and an epoch is exactly ``steps_per_epoch`` steps.
"""
from __future__ import annotations

import itertools
import queue
import random
import threading
from collections import Counter
from typing import Callable, Iterable, Iterator, Sequence

import torch
import webdataset as wds

from .catalog import expand_urls
from .pipeline import DecodeOptions, SkipCounter, TarSamples, _Collate, _ToExample, example_stages
from .tokenizer import trim_padding
from .transforms import sample_seed


def too_few_shards(shards: int, streams: int) -> str:
    """The one-line refusal of ``shards`` shards for ``streams`` streams."""
    return (f"The pre-training data has {shards} shard{'s' if shards != 1 else ''}, fewer than data.streams={streams}: "
            f"every stream reads whole shards, so each needs at least one. Lower data.streams to at most {shards} "
            f"(still a divisor of train.batch_size and a multiple of the world size), or use data with more shards.")


def check_streams(streams: int, global_batch: int, world_size: int, accum_steps: int,
                  shards: int | None = None) -> list[str]:
    """What keeps ``streams`` virtual streams from making global batches of ``global_batch`` on
    ``world_size`` ranks with ``accum_steps`` micro-batches each, one line per problem (empty: fine).
    ``shards``: the shard count, when known and read once each (not resampled)."""
    problems = []
    if global_batch % streams:
        problems.append(f"data.streams={streams} does not divide train.batch_size={global_batch}: every stream gives "
                        f"each global batch the same number of samples.")
    if streams % world_size:
        problems.append(f"data.streams={streams} is not a multiple of the world size {world_size}: every rank reads "
                        f"the same number of whole streams.")
    if global_batch % (world_size * accum_steps):
        problems.append(f"train.batch_size={global_batch} is not divisible by world size x train.accum_steps = "
                        f"{world_size} x {accum_steps}: every micro-batch holds the same number of samples.")
    if shards is not None and shards < streams:
        problems.append(too_few_shards(shards, streams))
    return problems


def stream_shards(urls: Sequence[str], streams: int, seed: int, epoch: int) -> list[list[str]]:
    """Epoch ``epoch``'s shards of each stream: the list shuffled from (seed, epoch), shard ``i`` to
    stream ``i % streams``."""
    if len(urls) < streams:
        raise ValueError(too_few_shards(len(urls), streams))
    order = list(urls)
    random.Random(sample_seed(seed, epoch, "shards")).shuffle(order)
    return [order[s::streams] for s in range(streams)]


def _contiguous(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into ``parts`` contiguous ranges, the first ones one longer where it does not divide."""
    size, extra = divmod(hi - lo, parts)
    bounds = [lo]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return list(zip(bounds, bounds[1:]))


class _StreamParts(torch.utils.data.IterableDataset):
    """One worker's side: per step, the next ``rows`` examples of each of its streams, collated into one
    part tagged ``step`` and ``streams`` (its range), with the skips and repairs counted while filling it.
    A step some stream cannot fill gives an end part (``end``: the counts only) and ends the worker."""

    def __init__(self, *, layout: list[list[str]] | None, urls: list[str], worker_streams: list[tuple[int, int]],
                 rows: int, steps: int, transforms: list[Callable], tokenizer: Callable | None, need_caption: bool,
                 need_label: bool, seed: int, epoch: int, shuffle_buffer: int, decode: DecodeOptions):
        self.layout, self.urls, self.worker_streams, self.rows, self.steps = layout, urls, worker_streams, rows, steps
        self.transforms, self.tokenizer = transforms, tokenizer
        self.need_caption, self.need_label = need_caption, need_label
        self.seed, self.epoch, self.shuffle_buffer, self.decode = seed, epoch, shuffle_buffer, decode

    def _examples(self, stream: int, counter: SkipCounter, to_example: _ToExample) -> Iterator[dict]:
        """Stream ``stream``'s examples, in its order."""
        if self.layout is None:  # resampled: shards drawn with replacement, forever
            draws = random.Random(sample_seed(self.seed, self.epoch, f"resample/{stream}"))
            shards = ({"url": draws.choice(self.urls)} for _ in itertools.count())
        else:
            shards = iter([{"url": url} for url in self.layout[stream]])
        stages: list = [lambda: shards]  # a callable source: DataPipeline would take a list apart into stages
        stages.append(TarSamples(counter.tar_handler))
        if self.shuffle_buffer:
            order = random.Random(sample_seed(self.seed, self.epoch, f"stream/{stream}"))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=order))
        return iter(wds.DataPipeline(*stages, *example_stages(counter, to_example)))

    def __iter__(self) -> Iterator[dict]:
        """This worker's parts, step after step."""
        info = torch.utils.data.get_worker_info()  # the worker id only: the rank is given, never looked up
        if info is not None and info.num_workers != len(self.worker_streams):
            raise RuntimeError(f"{info.num_workers} loader workers read streams laid out for "
                               f"{len(self.worker_streams)}")
        lo, hi = self.worker_streams[info.id if info is not None else 0]
        counter = SkipCounter()  # this process's own: its counts travel with its parts
        to_example = _ToExample(counter, self.transforms, self.seed, self.epoch, self.need_caption, self.need_label,
                                need_mask=False, mask_size=None, decode=self.decode)
        # Untrimmed text: parts are concatenated first, then each micro-batch is trimmed.
        collate = _Collate(counter, self.tokenizer, self.need_label, need_mask=False, trim_text=False)
        streams = [self._examples(s, counter, to_example) for s in range(lo, hi)]
        for step in range(self.steps):
            # Every stream of the worker is read for the step, also after one ran short, so the step's
            # counts are the same however the streams are split over workers.
            rows = [list(itertools.islice(stream, self.rows)) for stream in streams]
            tag = {"step": step, "streams": (lo, hi)}
            if any(len(r) < self.rows for r in rows):
                skipped, repaired = counter.take_delta()
                yield dict(tag, end=True, skipped=skipped, repaired=repaired)
                return
            yield dict(tag, **collate([example for r in rows for example in r]))


def stream_batches(urls: str | Sequence[str], *, streams: int, rank: int, world_size: int, accum_steps: int,
                   global_batch: int, steps_per_epoch: int, image_transforms: Sequence[Callable],
                   tokenizer: Callable[[list[str]], torch.Tensor] | None, need_caption: bool, need_label: bool,
                   seed: int, epoch: int, num_workers: int, shuffle_buffer: int,
                   decode: DecodeOptions = DecodeOptions(), resampled: bool = False, pin_memory: bool = False,
                   prefetch_factor: int | None = None) -> Iterator[dict]:
    """Rank ``rank``'s micro-batches of epoch ``epoch`` of the global sample stream (module docstring).

    Yields, step after step, the step's ``accum_steps`` micro-batches of ``global_batch / (world_size *
    accum_steps)`` rows, in the dict format of `pipeline.make_loader`: ``image``, ``image_views`` (more
    than one view), ``text`` (with a ``tokenizer``; trimmed per micro-batch), ``caption``, ``key``,
    ``label`` (``need_label``), ``skipped`` and ``repaired``. The step's counts (all of the rank's
    streams) are on its first micro-batch, the others carry empty dicts. An epoch whose streams run
    short ends with one image-less ``{"skipped", "repaired"}`` dict holding the counts of the step that
    could not be filled. ``rank`` and ``world_size`` are given, never looked up, so one process can read
    every rank's share. ``pin_memory`` and ``prefetch_factor`` (with workers only) are the DataLoader's.

    A `ValueError` names what does not fit (`check_streams`) before anything is read.
    """
    urls = expand_urls(urls)
    problems = check_streams(streams, global_batch, world_size, accum_steps, None if resampled else len(urls))
    if not 0 <= rank < world_size:
        problems.append(f"rank {rank} is not one of the {world_size} ranks.")
    if steps_per_epoch < 1:
        problems.append(f"steps_per_epoch={steps_per_epoch}: an epoch needs at least one step.")
    if problems:
        raise ValueError(" ".join(problems))
    per_rank = streams // world_size
    workers = min(num_workers, per_rank)
    worker_streams = _contiguous(rank * per_rank, (rank + 1) * per_rank, max(1, workers))
    dataset = _StreamParts(layout=None if resampled else stream_shards(urls, streams, seed, epoch), urls=urls,
                           worker_streams=worker_streams, rows=global_batch // streams, steps=steps_per_epoch,
                           transforms=list(image_transforms), tokenizer=tokenizer, need_caption=need_caption,
                           need_label=need_label, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                           decode=decode)
    extra = {"prefetch_factor": prefetch_factor} if workers and prefetch_factor else {}
    # One part per step is pinned by the loader's own thread; several are concatenated here, straight
    # into pinned memory (a pinned part would be copied out of it again).
    joined = len(worker_streams) > 1
    # Its own generator: drawing the loader's base seed from the global RNG would shift every later
    # random draw of training, so a mid-epoch resume would no longer be exact.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, persistent_workers=False,
        generator=torch.Generator().manual_seed(sample_seed(seed, epoch, "loader")),
        pin_memory=pin_memory and not joined, **extra)
    batches = _micro_batches(loader, worker_streams, steps_per_epoch, accum_steps,
                             global_batch // (world_size * accum_steps), getattr(tokenizer, "pad_id", None),
                             pin=pin_memory and joined and torch.cuda.is_available())
    # With workers, the parts are joined a step ahead in a thread of their own: at ViT-B's 512 images a rank,
    # joining is a copy of ~300 MB per view (0.1 s on a laptop core), which the training loop would otherwise
    # wait for at every step while its GPU idles.
    return _ahead_in_thread(batches, depth=2 * accum_steps) if workers else batches


def _ahead_in_thread(items: Iterator[dict], depth: int) -> Iterator[dict]:
    """``items`` as they come, produced up to ``depth`` ahead by a daemon thread (copies and waits on the
    loader release the GIL). An exception in the thread is raised here; stopping early stops the thread."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, which raises it)
            put(exc)

    thread = threading.Thread(target=produce, name="mugbench-stream-join", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def _micro_batches(loader: Iterable[dict], worker_streams: list[tuple[int, int]], steps: int, accum_steps: int,
                   rows: int, pad_id: int | None, pin: bool) -> Iterator[dict]:
    """The rank's micro-batches from the workers' parts (one per worker and step, in worker order)."""
    parts_in = iter(loader)
    for step in range(steps):
        parts = [_checked(next(parts_in, None), step, streams) for streams in worker_streams]
        skipped = dict(sum((Counter(p["skipped"]) for p in parts), Counter()))
        repaired = dict(sum((Counter(p["repaired"]) for p in parts), Counter()))
        if any(p.get("end") for p in parts):
            yield {"skipped": skipped, "repaired": repaired}
            return
        for i, micro in enumerate(split_rows(_concat(parts, pin), accum_steps, pad_id)):
            micro["skipped"], micro["repaired"] = (skipped, repaired) if i == 0 else ({}, {})
            yield micro


def _checked(part: dict | None, step: int, streams: tuple[int, int]) -> dict:
    """``part`` if it is step ``step``'s part of ``streams``. A DataLoader hands its workers' outputs
    round-robin; should that ever not hold, batches would silently mix steps."""
    if part is None or part["step"] != step or tuple(part["streams"]) != streams:
        got = "no part" if part is None else f"step {part['step']} of streams {tuple(part['streams'])}"
        raise RuntimeError(f"The pre-training loader handed {got} where step {step} of streams {streams} was due: "
                           f"its workers' parts came out of order.")
    return part


def _cat(tensors: list[torch.Tensor], pin: bool) -> torch.Tensor:
    """``tensors`` concatenated along rows (a single one as it is), into pinned memory with ``pin``."""
    if len(tensors) == 1:
        return tensors[0]
    if not pin:
        return torch.cat(tensors)
    out = torch.empty((sum(len(t) for t in tensors), *tensors[0].shape[1:]), dtype=tensors[0].dtype, pin_memory=True)
    return torch.cat(tensors, out=out)


def _concat(parts: list[dict], pin: bool) -> dict:
    """The rank's share of a step: its parts' rows, in order."""
    first = parts[0]
    views = [_cat([p["image_views"][v] for p in parts], pin) for v in range(len(first["image_views"]))] \
        if "image_views" in first else [_cat([p["image"] for p in parts], pin)]
    share = {"image": views[0], "caption": [c for p in parts for c in p["caption"]],
             "key": [k for p in parts for k in p["key"]]}
    if len(views) > 1:
        share["image_views"] = views
    for name in ("text", "label"):
        if name in first:
            share[name] = _cat([p[name] for p in parts], pin)
    return share


def split_rows(batch: dict, parts: int, pad_id: int | None = None) -> list[dict]:
    """``batch`` cut into ``parts`` micro-batches of consecutive rows (views of its tensors, slices of its
    lists, each image view), as the trainer receives a step's with ``train.accum_steps=parts``; with
    ``pad_id``, each micro-batch's text trimmed to its own longest caption."""
    rows = len(batch["image"]) // parts

    def cut(name: str, value, part: slice):
        if name == "image_views":
            return [view[part] for view in value]
        if name == "text" and pad_id is not None:
            return trim_padding(value[part], pad_id)
        return value[part]

    micro = [{name: cut(name, value, slice(i * rows, (i + 1) * rows)) for name, value in batch.items()}
             for i in range(parts)]
    for m in micro:
        if "image_views" in m:  # the loader's format: ``image`` is view 0 itself
            m["image"] = m["image_views"][0]
    return micro
