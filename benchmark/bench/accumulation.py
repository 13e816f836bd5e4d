"""Accumulation benchmark (`mugbench bench accumulation`): what exact gradient accumulation costs. For each
method, the shared trainer (`train.loop.train`) trains the same global batch in one piece and cut into
``k`` micro-batches (``train.accum_steps=k``), on synthetic batches already on the device
(`train_step.synthetic_batch` for the whole global batch, then ``k`` runs of consecutive rows, each
micro-batch's captions trimmed to its own longest, `trim_padding`, as the loader trims them).

Batch-coupled methods (`Method.couples_rows`: clip, slip, flip, coca, simclr) accumulate in two passes:
every micro-batch's features without gradients, the loss of their concatenation once, then each
micro-batch forwarded again with its share of the gradient. That costs about one extra forward of the
features per micro-batch, and holds one micro-batch's activations plus the cached features of the
whole global batch. Per-sample methods (mae, cap, mug) accumulate plainly: one forward and backward per
micro-batch.

Time: ms per global optimiser step, the median over the timed steps (after warm-up steps) of the time
between fetches of consecutive steps' first micro-batch, as `train_step.trainer_step_ms` measures it (on
CUDA the device is synchronised at each of those fetches, so a step's time is its own). The
configurations run side by side in one process, alternating over rounds (round r: every accumulation
count of the first method, then of the next, ...), and each keeps its median over the rounds: a busy
spell of a shared machine lands on both sides of a ratio.

Peak memory of the step, measured over the timed steps against the memory in use when they start (model,
optimiser state and the synthetic batches are in that baseline; gradients and activations are not):
on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated
then. On the CPU the resident set (``/proc/self/statm``) is *sampled* by a background thread every
millisecond, after freed heap memory is handed back to the system (``malloc_trim``, glibc), and the
largest sample minus the resident set at the start is reported: a peak shorter than the sampling
interval, or one while the training thread holds the GIL, can be missed, so the CPU figure is a lower
bound on the true peak, and pages the allocator keeps from an earlier step count as in use.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import io
import itertools
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, StudyConfig
from ..data.pretrain import text_spec
from ..data.streams import split_rows
from ..registry import get_method
from ..runs import build_method
from ..train.distributed import DistInfo
from ..train.loop import memory_in_use_mb, train
from .train_step import _sync, synthetic_batch, synthetic_tokenizer

TWO_PASS, PLAIN, NONE = "two passes", "plain", "none (one batch)"


@dataclass
class AccumulationRow:
    """One configuration: a method at a global batch, trained in ``accum_steps`` micro-batches."""

    method: str
    global_batch: int
    accum_steps: int
    micro_batch: int  # rows per micro-batch
    step_ms: float  # median over rounds of each round's median ms per global optimiser step
    peak_step_mb: float  # median over rounds of the step's peak memory over its baseline (module docstring)
    accumulation: str  # TWO_PASS, PLAIN, or NONE at accum_steps=1
    time_ratio: float | None = None  # step_ms over the same method's at the smallest accumulation count
    memory_ratio: float | None = None  # peak_step_mb likewise
    steps: int = 0
    warmup: int = 0
    rounds_ms: list = dataclasses.field(default_factory=list)  # each round's median ms/step
    rounds_mb: list = dataclasses.field(default_factory=list)  # each round's peak step MB


def check_splits(global_batch: int, accum: Sequence[int]) -> None:
    """Raise `ConfigError` unless every accumulation count is a whole number >= 1 that splits
    ``global_batch`` into micro-batches of equal size (the trainer's exact accumulation needs them)."""
    if not accum:
        raise ConfigError("mugbench bench accumulation needs at least one accumulation count, e.g. --accum 1,4.")
    for k in accum:
        if k < 1 or global_batch % k:
            fits = [d for d in (1, 2, 4, 8, 16, 32) if global_batch % d == 0]
            raise ConfigError(
                f"mugbench bench accumulation: a global batch of {global_batch} rows does not split into {k} "
                f"micro-batches of equal size, and exact accumulation (train.accum_steps={k}) trains equal "
                f"micro-batches of consecutive rows. Give --accum counts that divide {global_batch} (e.g. "
                f"{','.join(map(str, fits))}), or a --batch-size that every count divides.")


def _release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the system (glibc's ``malloc_trim``;
    nothing elsewhere), so the resident set is what is in use, not what earlier steps left behind."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class PeakMemory:
    """Peak memory between `start` and `stop`, in MB over what was in use at `start`: on CUDA the
    allocator's own peak; on the CPU the resident set, sampled every ``interval_s`` by a thread."""

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device, self.interval_s = device, interval_s
        self.base = self.peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Take the baseline and start watching."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        _release_freed_memory()
        self.base = self.peak = memory_in_use_mb(self.device)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="mugbench-rss-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, memory_in_use_mb(self.device))

    def stop(self) -> float:
        """Stop watching; the peak in MB over the baseline."""
        if self.device.type == "cuda":
            return memory_in_use_mb(self.device) - self.base
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.peak = max(self.peak, memory_in_use_mb(self.device))
        return self.peak - self.base


def accumulated_step(name: str, cfg: StudyConfig, spec, micro: list[dict], device, steps: int,
                     warmup: int) -> tuple[float, float]:
    """The shared trainer on ``micro`` (one global batch's micro-batches, ``accum_steps = len(micro)``), a
    freshly built ``name`` each call: (median ms per optimiser step over ``steps`` after ``warmup`` steps,
    the timed steps' peak memory in MB, `PeakMemory`). The timing ends at the fetch that would start the
    next step, which the batches then decline (the trainer ends the epoch there; nothing is checkpointed)."""
    method = build_method(name, cfg, spec)
    k, times, memory = len(micro), [], PeakMemory(device)
    peak = []

    def batches(epoch):
        for step in range(warmup + steps + 1):
            _sync(device)  # the step before this fetch is done on the device too
            if step == warmup + steps:
                times.append(time.perf_counter())
                peak.append(memory.stop())
                return
            if step == warmup:
                memory.start()
            if step >= warmup:
                times.append(time.perf_counter())  # after the baseline is taken: its cost is not timed
            for batch in micro:
                yield dict(batch)

    train_cfg = dataclasses.replace(cfg.train, epochs=1, ckpt_every=10 ** 9, accum_steps=k,
                                    batch_size=k * micro[0]["image"].shape[0])
    with tempfile.TemporaryDirectory(prefix="mugbench-bench-") as workdir:
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # no progress bar in the table's way
                train(method, batches, train_cfg, steps_per_epoch=warmup + steps + 1, workdir=Path(workdir),
                      info=DistInfo(device=device), seed=0, desc=f"{name} accum {k}")
        finally:
            memory.stop()  # no sampler left running when training stopped early (a second stop does nothing)
    return 1000 * statistics.median(b - a for a, b in itertools.pairwise(times)), peak[0]


def run(cfg: StudyConfig, methods: list[str], *, device, accum: Sequence[int] = (1, 4), steps: int = 6,
        warmup: int = 2, rounds: int = 2, global_batch: int | None = None) -> list[AccumulationRow]:
    """Time every method at every accumulation count in ``accum`` at one global batch (``global_batch``,
    else the study's ``train.batch_size``), alternating the configurations over ``rounds`` rounds; one row
    per (method, count), in that order, with ratios to the method's smallest count."""
    accum = list(accum)
    batch = global_batch or cfg.train.batch_size
    check_splits(batch, accum)
    if steps < 1 or warmup < 0 or rounds < 1:
        raise ConfigError(f"mugbench bench accumulation needs --steps >= 1, --warmup >= 0 and --rounds >= 1, "
                          f"not {steps}, {warmup} and {rounds}.")
    for name in methods:  # an unknown or untrained method fails before anything is measured
        if not get_method(name).pretrains:
            raise ConfigError(f"mugbench bench accumulation times pre-training steps, and {name!r} has none "
                              f"(it is evaluated as initialised): leave it out of --methods.")
    tokenizer = synthetic_tokenizer(cfg)
    spec = text_spec(cfg, tokenizer)
    measured = {(name, k): ([], []) for name in methods for k in accum}
    for _ in range(rounds):
        for name in methods:
            whole = synthetic_batch(cfg, get_method(name), tokenizer, batch, device)
            for k in accum:
                ms, mb = accumulated_step(name, cfg, spec, split_rows(whole, k, tokenizer.pad_id), device,
                                          steps, warmup)
                measured[name, k][0].append(ms)
                measured[name, k][1].append(mb)
            del whole
    rows = []
    for name in methods:
        two_pass = get_method(name).couples_rows()
        mine = [AccumulationRow(method=name, global_batch=batch, accum_steps=k, micro_batch=batch // k,
                                step_ms=statistics.median(measured[name, k][0]),
                                peak_step_mb=statistics.median(measured[name, k][1]),
                                accumulation=NONE if k == 1 else TWO_PASS if two_pass else PLAIN,
                                steps=steps, warmup=warmup, rounds_ms=measured[name, k][0],
                                rounds_mb=measured[name, k][1]) for k in accum]
        base = min(mine, key=lambda r: r.accum_steps)
        for row in mine:
            row.time_ratio = row.step_ms / base.step_ms
            row.memory_ratio = row.peak_step_mb / base.peak_step_mb if base.peak_step_mb > 0 else None
        rows += mine
    return rows


def format_table(rows: list[AccumulationRow], device, preset: str) -> str:
    """Markdown table of a `run`, and a paragraph on what it measures and where."""
    base = min((r.accum_steps for r in rows), default=1)
    lines = [f"Exact gradient accumulation in the shared trainer, synthetic batches ({preset} preset, {device}):", "",
             (f"| method | global batch | accum_steps | micro-batch rows | ms/step | time vs accum {base} | "
              f"peak step MB | memory vs accum {base} | accumulation |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memory_ratio = f"{r.memory_ratio:.2f}x" if r.memory_ratio is not None else "-"
        lines.append(f"| {r.method} | {r.global_batch} | {r.accum_steps} | {r.micro_batch} | {r.step_ms:.1f} | "
                     f"{r.time_ratio:.2f}x | {r.peak_step_mb:.0f} | {memory_ratio} | {r.accumulation} |")
    steps, warmup = (rows[0].steps, rows[0].warmup) if rows else (0, 0)
    rounds = len(rows[0].rounds_ms) if rows else 0
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, {torch.get_num_threads()} torch CPU threads"
        memory = ("torch.cuda.max_memory_allocated over the timed steps minus the memory allocated when they "
                  "start")
    else:
        machine = f"cpu, {torch.get_num_threads()} torch threads"
        memory = ("the largest resident set sampled every millisecond during the timed steps minus the resident "
                  "set when they start (sampled: a lower bound on the true peak)")
    lines += ["", (
        f"Each row is one optimiser step of the shared trainer on the same global batch, fed as accum_steps "
        f"micro-batches of consecutive rows; ms/step is the median over {steps} timed steps (after {warmup} "
        f"warm-up steps) of the time between fetches of consecutive steps' first micro-batch, and the median "
        f"over {rounds} round(s) in which the configurations alternate. Two-pass accumulation (batch-coupled "
        f"losses) computes every micro-batch's features without gradients, the loss once over their "
        f"concatenation, then forwards each micro-batch again with its share of the gradient: about one extra "
        f"forward of the features per micro-batch, while memory holds one micro-batch's activations plus the "
        f"cached features of the global batch. Plain accumulation (per-sample losses) forwards and "
        f"backpropagates each micro-batch once. Peak step MB: {memory}; model, optimiser state and the batches "
        f"are in that baseline, gradients and activations are not. Machine: {machine}.")]
    return "\n".join(lines)
