"""The one training loop every method shares (DESIGN.md "Trainer").

AdamW without weight decay on norms, biases and tokens; warmup then cosine (timm's scheduler);
gradient clipping; exact accumulation; bf16 autocast on CUDA; DDP under torchrun; JSONL metrics;
atomic checkpoints every N steps and at the end, resumed automatically by a rerun.

A step trains on one global batch, whatever the number of ranks and micro-batches it arrives in: each
rank gets its rows (`data.streams`), every forward pass runs in a `StepContext` that places its rows in
the global batch (masks and means over the global batch, `models.global_batch`), and accumulation is
exact (`Method` says how: plain for per-sample losses, two passes for batch-coupled ones). So 1 or N
ranks, 0..W loader workers and any ``accum_steps`` train the same weights, up to float rounding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import random_seed

from ..config import ConfigError, TrainConfig
from ..data.catalog import BadDataError
from ..files import atomic_write_text
from ..models.global_batch import StepContext, training_step
from ..progress import progress_bar
from .checkpoint import CHECKPOINT_LINK, load_newest_checkpoint, save_run_checkpoint
from .distributed import DistInfo, gather_full_state, load_full_state, shard_with_fsdp


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


class CheckpointMismatchError(RuntimeError):
    """The run directory's checkpoint belongs to another method or another architecture."""


@dataclass
class TrainSummary:
    """What a finished pre-training run reports to the harness and the result records."""

    steps: int
    epochs: float
    seconds: float
    images_per_s: float
    final_loss: float
    skipped: dict = field(default_factory=dict)
    repaired: dict = field(default_factory=dict)
    resumed_from: int = 0
    peak_memory_mb: float = 0.0  # CUDA: max allocated; CPU: the largest resident set seen at a log step
    data_share: float = 0.0  # fraction of the training time spent waiting for the next batch
    loss_curve: dict = field(default_factory=dict)  # {"step": [...], "loss": [...]}, thinned (`read_loss_curve`)


@dataclass
class TrainState:
    """A run's progress, summed over every session that trained it: what a checkpoint stores
    under ``"state"`` (as `to_dict`, plain data, so checkpoints load with ``weights_only=True``)
    and what a rerun resumes from (`from_dict`). The field order is the checkpoint's key order."""

    # Position: optimiser updates done (the epoch is ``step / steps_per_epoch``, the resume point
    # within it follows from the deterministic pipeline, so neither is stored).
    step: int = 0
    # Timing: training seconds, checkpoint writes excluded.
    seconds: float = 0.0
    # Data: images trained on, and samples the pipeline skipped or repaired, by kind (all ranks: merged at
    # log steps and checkpoints, `_merge_counts`).
    images: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)
    # Last log step: its loss (rank mean; NaN before the first) and the peak memory seen at log steps (MB).
    loss: float = float("nan")
    peak_memory_mb: float = 0.0
    # Timing: seconds spent waiting for the next batch (the data share of `TrainSummary`).
    data_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``"state"`` entry: plain Python data only."""
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> TrainState:
        """The state a checkpoint's ``"state"`` entry holds; keys that older checkpoints lack
        (``repaired``, ``peak_memory_mb``, ``data_s``) keep their defaults, unknown keys are ignored."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")


def build_optimizer(method: torch.nn.Module, cfg: TrainConfig, device: torch.device | None = None
                    ) -> torch.optim.Optimizer:
    """AdamW over the method's parameters; 1-D params and ``no_weight_decay()`` names are exempt.

    ``cfg.optimizer_impl``: ``fused`` (one kernel for all parameters; CUDA), ``foreach`` (a few
    multi-tensor kernels), ``loop`` (a kernel per parameter: the slow reference), or ``auto`` =
    fused on CUDA, foreach elsewhere. The update is the same up to rounding.
    """
    impl = cfg.optimizer_impl
    if impl not in OPTIMIZER_IMPLS:
        raise ConfigError(f"train.optimizer_impl must be one of {', '.join(OPTIMIZER_IMPLS)}, not {impl!r}.")
    if impl == "auto":
        impl = "fused" if device is not None and device.type == "cuda" else "foreach"
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]
    return create_optimizer_v2(method, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                               **kwargs)


def enable_grad_checkpointing(method: torch.nn.Module) -> int:
    """Switch on activation checkpointing in every sub-module that supports it (timm's ViT and
    blocks, open_clip's transformers, the MAE decoder); returns how many were switched."""
    switched = 0
    for module in method.modules():
        if module is method:
            continue
        if callable(getattr(module, "set_grad_checkpointing", None)):
            module.set_grad_checkpointing(True)
            switched += 1
        elif isinstance(getattr(module, "grad_checkpointing", None), bool):
            module.grad_checkpointing = True
            switched += 1
    return switched


class CompiledOrEager:
    """``torch.compile(module)`` that falls back to the eager module, with one warning, the first
    time compiling fails (an unsupported op, a missing compiler): a speed option never stops a run.

    Compilation happens on the first call, before anything is backpropagated, so retrying that
    call eagerly is safe.
    """

    def __init__(self, module: torch.nn.Module, backend: str = "inductor", warn=print):
        self.module, self.warn = module, warn
        try:
            self.compiled = torch.compile(module, backend=backend)
        except Exception as exc:  # noqa: BLE001 (any failure to set up compilation means eager)
            self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        self.compiled = None
        self.warn(f"warning: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''});"
                  " training continues in eager mode")

    def __call__(self, batch):
        if self.compiled is not None:
            try:
                return self.compiled(batch)
            except Exception as exc:  # noqa: BLE001
                self._fall_back(exc)
        return self.module(batch)


def run_after_step(method: torch.nn.Module) -> None:
    """The method's ``after_step`` hook (`Method.after_step`: parameter constraints such as CLIP's
    logit-scale cap), run after each optimizer step; a plain module without one is left alone."""
    hook = getattr(method, "after_step", None)
    if callable(hook):
        hook()


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> CosineLRScheduler:
    """Linear warmup then cosine decay to ``min_lr``, stepped per optimiser update."""
    warmup = min(total_steps - 1, max(0, round(cfg.warmup_epochs * steps_per_epoch)))
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup), lr_min=cfg.min_lr,
                             warmup_t=warmup, warmup_lr_init=cfg.lr * 1e-3, warmup_prefix=True, t_in_epochs=False)


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA (or when asked for), nothing on the CPU: the step's precision policy."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else
                [t.to(device, non_blocking=True) for t in v] if k == "image_views" else v)
            for k, v in batch.items()}


class _NonFiniteWatch:
    """Remembers, on the device, the first step whose loss was not finite and that step's loss
    parts, so the train step never waits for the device; `check` (at log steps and before every
    checkpoint, so no checkpoint ever holds the damage) is the one place that synchronises."""

    def __init__(self, device):
        self.first = torch.full((), -1.0, device=device)
        self.parts: torch.Tensor | None = None

    def observe(self, out: dict, step: int) -> None:
        """Note this micro-step's loss parts (no synchronisation)."""
        values = _loss_parts(out)
        new = (self.first < 0) & ~torch.isfinite(values[list(out).index("loss")])
        self.first = torch.where(new, torch.full_like(self.first, step), self.first)
        self.parts = values if self.parts is None else torch.where(new, values, self.parts)
        self.names = list(out)

    def check(self, info: DistInfo, desc: str, checkpoint_path: Path) -> None:
        """Raise `NonFiniteLossError` on every rank together if any rank saw a non-finite loss."""
        flag = (self.first >= 0).float()
        if info.world_size > 1:  # every rank must stop together, or the others hang in all-reduce
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return
        where = (f"at step {int(self.first.item())} (parts: {dict(zip(self.names, self.parts.tolist()))})"
                 if self.first.item() >= 0 else f"on another rank (rank {info.rank} saw finite losses)")
        raise NonFiniteLossError(
            f"Training of {desc} stopped: the loss became non-finite {where}. The last good checkpoint is kept "
            f"at {checkpoint_path if checkpoint_path.exists() else '(none yet)'}. Lower train.blr, set "
            f"train.grad_clip, or check the data; rerunning resumes from that checkpoint.")


@dataclass
class _Counts:
    """This rank's skipped and repaired samples since the last merge (`_merge_counts`)."""

    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)

    def tally(self, batch: dict) -> None:
        """Add a batch's counts (and take them off the batch)."""
        self.skipped.update({k: int(n) for k, n in batch.pop("skipped", {}).items()})
        self.repaired.update({k: int(n) for k, n in batch.pop("repaired", {}).items()})


def _merge_counts(state: TrainState, counts: _Counts, info: DistInfo) -> None:
    """Add every rank's pending counts to the run's totals, the same on every rank (a collective: every
    rank calls it at the same step), so records and checkpoints count all ranks' samples."""
    mine = {"skipped": dict(counts.skipped), "repaired": dict(counts.repaired)}
    counts.skipped.clear()
    counts.repaired.clear()
    every = [mine]
    if info.world_size > 1:
        every = [None] * info.world_size
        dist.all_gather_object(every, mine)
    for rank_counts in every:
        for total, key in ((state.skipped, "skipped"), (state.repaired, "repaired")):
            for kind, n in rank_counts[key].items():
                total[kind] = total.get(kind, 0) + n


def _image_batches(batches: Iterable[dict], counts: _Counts, resume_at: int) -> Iterator[dict]:
    """Yield the batches that hold images; tally the image-less ones (the counts of an epoch's last,
    unfilled step) here, unless they came before ``resume_at`` real batches, which the checkpoint already
    counted. Filtered before the ranks agree on having data, so every rank steps in lockstep."""
    real = 0
    for batch in batches:
        if "image" in batch:
            real += 1
            yield batch
        elif real >= resume_at:
            counts.tally(batch)


def _loss_parts(out: dict) -> torch.Tensor:
    """The step's loss parts as one float tensor (order of ``out``), still on the device."""
    return torch.stack([v.detach().float().reshape(()) for v in out.values()])


def _mean_over_ranks(out: dict, info: DistInfo) -> dict[str, float]:
    """The step's loss parts averaged over ranks (each rank's are means over its own rows), so
    the log shows the global batch's loss, not rank 0's half of it."""
    values = _loss_parts(out)
    if info.world_size > 1:
        dist.all_reduce(values)
        values /= info.world_size
    return dict(zip(out, values.tolist()))


def _while_every_rank_has_data(steps: Iterable[list[dict]], info: DistInfo, counts: _Counts) -> Iterator[list[dict]]:
    """Yield steps (their micro-batches) while every rank still has one: one small all-reduce, and the
    wait for the device it implies, per step. An epoch ends at the first step some stream cannot fill
    (`data.streams`), which only the rank holding that stream sees; a rank that ran dry would leave the
    others waiting forever in the gradient all-reduce. A step a rank holds when the others stop is not
    trained, but its counts are tallied: one process reading every stream would count them too."""
    it = iter(steps)
    while True:
        step = next(it, None)
        if info.world_size > 1:
            more = torch.tensor([float(step is not None)], device=info.device)
            dist.all_reduce(more, op=dist.ReduceOp.MIN)
            if not more.item():
                for batch in step or ():
                    counts.tally(batch)
                return
        if step is None:
            return
        yield step


def _steps(batches: Iterable[dict], accum_steps: int, counts: _Counts) -> Iterator[list[dict]]:
    """Group micro-batches into the ``accum_steps`` of one optimiser step; a last incomplete group is
    dropped (its counts tallied)."""
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == accum_steps:
            yield group
            group = []
    for batch in group:
        counts.tally(batch)


def _shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Parameter name -> shape: what a checkpoint must match to be this run's."""
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _check_identity(mine: dict, ckpt: dict, path: Path) -> None:
    """Say plainly whose checkpoint it is when it is not this run's (method or architecture)."""
    theirs = ckpt.get("identity") or {"method": mine["method"],
                                      "params": {k: list(v.shape) for k, v in ckpt["model"].items()}}
    if theirs != mine:
        differ = sorted(k for k in set(mine["params"]) | set(theirs["params"])
                        if mine["params"].get(k) != theirs["params"].get(k))
        raise CheckpointMismatchError(
            f"{path} is a checkpoint of method '{theirs['method']}' with {len(theirs['params'])} tensors, but this run "
            f"trains '{mine['method']}' with {len(mine['params'])}; {len(differ)} differ in name or shape (e.g. "
            f"{', '.join(differ[:3]) or '-'}). The run directory belongs to another method or architecture: use "
            f"another --workdir, or remove {path.parent} to start over.")


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop metric rows after ``step`` (steps past the checkpoint will be trained and logged again)
    and a last row cut off by the kill."""
    if not log_path.exists():
        return
    rows = log_path.read_text().splitlines(keepends=True)
    kept = [row for row in rows if _logged_step(row) <= step]
    if len(kept) != len(rows):
        atomic_write_text(log_path, "".join(kept))


def _timed_fetches(batches: Iterable[dict], state: TrainState) -> Iterator[dict]:
    """``batches``, adding the time spent waiting for each one to ``state.data_s``."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        state.data_s += time.perf_counter() - start
        yield batch


def memory_in_use_mb(device: torch.device) -> float:
    """Peak memory so far on CUDA (max allocated since the last reset); on CPU the process's resident
    set now, from ``/proc`` (0 where there is none). The CPU figure is sampled because the kernel's
    own peak (``ru_maxrss``) never goes down, so it would credit a method with its predecessor's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def read_loss_curve(log_path: Path, max_points: int = 200) -> dict[str, list[float]]:
    """The logged loss against the step, from ``metrics.jsonl``, thinned evenly to at most
    ``max_points`` rows (the last row always kept) so that a result record stays small."""
    rows = []
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            try:
                row = json.loads(line)
                rows.append((int(row["step"]), float(row["loss"])))
            except (ValueError, KeyError, TypeError):
                continue
    if len(rows) > max_points:
        stride = math.ceil(len(rows) / max_points)
        rows = rows[::-1][::stride][::-1]
    return {"step": [r[0] for r in rows], "loss": [r[1] for r in rows]}


def _logged_step(row: str) -> float:
    """The step of a metrics row; infinity for a row that is not whole JSON."""
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


# Samples read before the bad fraction is judged: the first shard alone may be unlucky.
MIN_SAMPLES_FOR_BAD_FRACTION = 1000


def _check_bad_fraction(state: TrainState, limit: float, desc: str, step: int) -> None:
    """Raise `BadDataError` when the skipped fraction exceeds ``limit``: on every rank together, as the
    counts are merged over ranks (`_merge_counts`) before this is asked."""
    bad, good = sum(state.skipped.values()), state.images
    if bad + good < MIN_SAMPLES_FOR_BAD_FRACTION or bad <= limit * (bad + good):
        return
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(state.skipped.items()))
    raise BadDataError(
        f"Training of {desc} stopped at step {step}: {bad} of the {bad + good} samples read so far were bad "
        f"({100 * bad / (bad + good):.1f}%), more than data.max_bad_fraction={limit}. By kind: "
        f"{kinds}. List the bad keys with `mugbench data check DATA --fix-list`, rebuild the broken shards, or "
        f"accept more with --set data.max_bad_fraction=X; rerunning resumes from the last checkpoint.")


@dataclass
class _Run:
    """What one session of training works with and never saves: the method and its wrappers,
    the optimiser and schedule, the budget, and where checkpoints and metrics go."""

    cfg: TrainConfig
    info: DistInfo
    method: torch.nn.Module  # the method itself: its parameters, state dict and ``after_step``
    model: torch.nn.Module  # the method, or its DDP wrapper (``no_sync``, ``train()``)
    step_fn: Callable[[dict], dict]  # the model, or its compiled form: what a step calls
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    fsdp: bool  # sharded: state dicts are gathered to save and scattered to load
    identity: dict  # method name and full parameter shapes: whose checkpoints are this run's
    total: int  # optimiser updates in the whole run
    steps_per_epoch: int
    workdir: Path
    desc: str
    max_bad_fraction: float
    seed: int  # the study's: masks of step t are drawn from (seed, t) (`models.global_batch`)

    @property
    def device(self) -> torch.device:
        """The device this rank trains on."""
        return self.info.device

    @property
    def ckpt_path(self) -> Path:
        """The link to the newest checkpoint."""
        return self.workdir / CHECKPOINT_LINK

    @property
    def log_path(self) -> Path:
        """The run's metrics log, one JSON row per log step."""
        return self.workdir / "metrics.jsonl"


@dataclass
class _Session:
    """This session's progress reporting: the non-finite watch, the progress bar, the open
    metrics log and the hook each of its rows goes to (rank 0 only), and the throughput window
    since the last log step."""

    watch: _NonFiniteWatch
    counts: _Counts
    bar: Any  # `progress.progress_bar`: a tqdm bar on a terminal, plain lines in a log
    log: TextIO | None  # rank 0 only
    on_log: Callable[[dict], None] | None = None  # rank 0 only
    window_t: float = field(default_factory=time.perf_counter)
    window_images: int = 0

    def lap(self) -> tuple[float, int]:
        """Close the throughput window: its seconds and images; the next one opens now."""
        images, self.window_images = self.window_images, 0
        return self.restart_clock(), images

    def restart_clock(self) -> float:
        """Seconds since the window opened; its clock restarts (so a checkpoint write is not
        counted as training time), its image count does not."""
        now = time.perf_counter()
        elapsed, self.window_t = now - self.window_t, now
        return elapsed


def _wrap_for_ranks(method: torch.nn.Module, info: DistInfo, fsdp: bool) -> torch.nn.Module:
    """Shard ``method`` in place under FSDP, wrap it in DDP with several ranks; the model to call."""
    if fsdp:
        shard_with_fsdp(method)  # before the optimizer, which must see the sharded parameters
        return method
    if info.world_size > 1:
        return torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    return method


def _prepare(method: torch.nn.Module, cfg: TrainConfig, *, steps_per_epoch: int, workdir: Path, info: DistInfo,
             desc: str, max_bad_fraction: float, seed: int) -> _Run:
    """Check the strategy, move and wrap the method (activation checkpointing, DDP / FSDP, compile), build
    the optimiser and schedule: everything a session trains with."""
    if cfg.strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"train.strategy must be 'ddp' or 'fsdp', not {cfg.strategy!r}.")
    fsdp = cfg.strategy == "fsdp" and info.world_size > 1
    if fsdp and cfg.accum_steps > 1 and _couples_rows(method):
        raise ConfigError(
            f"{desc} has a batch-coupled loss, which accumulates in two passes (features without gradients, "
            f"then each micro-batch again with its share of the gradient); those passes call the method's "
            f"features and loss outside FSDP's sharded forward, so train.strategy=fsdp cannot run them. Use "
            f"train.strategy=ddp, or train.accum_steps=1 with a smaller per-GPU batch on more GPUs.")
    workdir.mkdir(parents=True, exist_ok=True)
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    # No SyncBatchNorm: batch statistics couple rows, so a method computes them in its loss over the gathered
    # global batch (SimCLR's head, `simclr_head_loss`), the same on any device and number of ranks.
    method.to(info.device)
    identity = {"method": desc, "params": _shapes(method)}  # before sharding: the full shapes
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(method)
    model = _wrap_for_ranks(method, info, fsdp)
    optimizer = build_optimizer(method, cfg, info.device)
    scheduler = build_scheduler(optimizer, cfg, total, steps_per_epoch)
    step_fn = CompiledOrEager(model, cfg.compile_backend, warn=lambda m: print(m, file=sys.stderr)) \
        if cfg.compile else model
    return _Run(cfg=cfg, info=info, method=method, model=model, step_fn=step_fn, optimizer=optimizer,
                scheduler=scheduler, fsdp=fsdp, identity=identity, total=total, steps_per_epoch=steps_per_epoch,
                workdir=workdir, desc=desc, max_bad_fraction=max_bad_fraction, seed=seed)


def _restore(run: _Run, ckpt: dict, path: Path) -> TrainState:
    """Load a checkpoint of this run (weights, optimiser, this rank's RNGs); its saved state."""
    _check_identity(run.identity, ckpt, path)
    if run.fsdp:
        load_full_state(run.method, run.optimizer, ckpt["model"], ckpt["optimizer"])
    else:
        run.method.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
    rng = ckpt["rng"][min(run.info.rank, len(ckpt["rng"]) - 1)]
    torch.set_rng_state(rng["cpu"] if isinstance(rng, dict) else rng)
    if isinstance(rng, dict) and rng.get("cuda") is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    return TrainState.from_dict(ckpt["state"])


def _resume(run: _Run, seed: int) -> TrainState:
    """Seed every RNG, then take up the newest readable checkpoint if there is one; cut the
    metrics log back to the step reached and put the schedule there."""
    state = TrainState()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    # One seed on every rank: masks are drawn for the global batch and sliced per rank (random_masking),
    # so a run does not depend on the number of processes that share its batch. Python's and numpy's
    # RNGs too, so a method plugin that draws from them is not moved by whatever ran before in the process.
    random_seed(seed)
    found = load_newest_checkpoint(run.workdir, warn=(lambda msg: print(f"warning: {msg}", file=sys.stderr))
                                   if run.info.is_main else (lambda msg: None))
    if found:
        state = _restore(run, *found)
    if run.info.is_main:  # with or without a checkpoint: a run killed before its first one logged rows too
        _truncate_log(run.log_path, state.step)
    run.scheduler.step_update(state.step)
    return state


@contextlib.contextmanager
def _session(run: _Run, state: TrainState, on_log: Callable[[dict], None] | None) -> Iterator[_Session]:
    """Put the model in training mode and open the progress bar and (rank 0) the metrics log
    for appending; both are closed however the session ends."""
    watch = _NonFiniteWatch(run.device)
    with progress_bar(run.total, initial=state.step, desc=run.desc, unit="step",
                      disable=not run.info.is_main) as bar, \
            (open(run.log_path, "a") if run.info.is_main else contextlib.nullcontext()) as log:
        run.model.train()
        yield _Session(watch, _Counts(), bar, log, on_log if run.info.is_main else None)


def _couples_rows(method: torch.nn.Module) -> bool:
    """Whether ``method`` declares a batch-coupled loss (`Method.couples_rows`); a plain module does not."""
    couples = getattr(type(method), "couples_rows", None)
    return bool(couples()) if callable(couples) else False


def _step_totals(run: _Run, micro: list[dict]) -> dict[str, torch.Tensor]:
    """The method's `Method.loss_counts` summed over the step's micro-batches and every rank (one small
    all-reduce): what `global_mean` divides by."""
    counts_of = getattr(run.method, "loss_counts", None)
    counts = [counts_of(batch) for batch in micro] if callable(counts_of) else [{}]
    names = sorted(counts[0])
    if not names:
        return {}
    values = torch.stack([sum(c[name] for c in counts).to(run.device, torch.float64) for name in names])
    if run.info.world_size > 1:
        dist.all_reduce(values)
    return dict(zip(names, values))


def _train_step(run: _Run, state: TrainState, session: _Session, micro: list[dict]) -> dict[str, torch.Tensor]:
    """Forward and backward one global batch, this rank's rows of it in ``micro`` (``accum_steps``
    micro-batches of equal size, in row order); the gradients are then the global batch's. Returns the
    step's loss parts (means over this rank's rows, `_log_step` averages them over ranks)."""
    for batch in micro:
        session.counts.tally(batch)
    micro = [_to_device(batch, run.device) for batch in micro]
    k, world = len(micro), run.info.world_size
    rows = micro[0]["image"].shape[0]
    totals = _step_totals(run, micro)

    def contexts(share: int) -> list[StepContext]:
        # Rank r holds rows [r * k * rows, (r + 1) * k * rows) of the global batch, micro-batch i the i-th run of them.
        first = run.info.rank * k * rows
        return [StepContext(run.seed, state.step, first + i * rows, world * k * rows, totals, share) for i in range(k)]

    if k > 1 and _couples_rows(run.method):
        out = _two_pass_accumulation(run, state, session, micro, contexts)
    else:
        out = _plain_accumulation(run, state, session, micro, contexts(world * k))
    state.images += world * k * rows
    session.window_images += world * k * rows
    return out


def _plain_accumulation(run: _Run, state: TrainState, session: _Session, micro: list[dict],
                        contexts: list[StepContext]) -> dict[str, torch.Tensor]:
    """Per-sample losses: forward and backward each micro-batch, its loss divided by their number; the
    parts are averaged over the micro-batches (a mean over rows of equal-sized micro-batches, or a
    `global_mean` already scaled for it)."""
    k, info = len(micro), run.info
    total = None
    for i, (batch, ctx) in enumerate(zip(micro, contexts)):
        # DDP skips the gradient all-reduce on accumulation micro-steps; FSDP reduces every one.
        last = i == k - 1
        with (contextlib.nullcontext() if last or info.world_size == 1 or run.fsdp else run.model.no_sync()):
            with autocast(run.cfg, run.device), training_step(ctx):
                out = run.step_fn(batch)
            session.watch.observe(out, state.step)
            (out["loss"] / k).backward()
        parts = _loss_parts(out)
        total = parts if total is None else total + parts
    return dict(zip(out, total / k))


def _two_pass_accumulation(run: _Run, state: TrainState, session: _Session, micro: list[dict],
                           contexts: Callable[[int], list[StepContext]]) -> dict[str, torch.Tensor]:
    """Batch-coupled losses, exactly (GradCache; open_clip's ``--accum-freq``): every micro-batch's
    `Method.features` without gradients; the `Method.loss` of their concatenation (with the other ranks'
    rows where the loss gathers them) and its backward, which leaves the loss's own parameters their
    gradient and each feature row its share; then each micro-batch forwarded again, with the random
    state of its first pass, and backpropagated from that share. Costs one more forward of the features
    per micro-batch. Gradients are averaged over ranks by hand, after the last backward (no overlap with
    it, unlike DDP's buckets): these passes call the method itself, outside DDP's (and a compiled) forward."""
    method, cfg, device = run.method, run.cfg, run.device
    rows = micro[0]["image"].shape[0]
    first_pass, replays = contexts(run.info.world_size), contexts(run.info.world_size)
    rng_before, features = [], []
    with torch.no_grad():
        for batch, ctx in zip(micro, first_pass):
            rng_before.append(_rng_state(device))
            with autocast(cfg, device), training_step(ctx):
                features.append(method.features(batch))
    rng_after = _rng_state(device)
    cached = {name: torch.cat([f[name] for f in features]).detach() for name in features[0]}
    for tensor in cached.values():
        tensor.requires_grad_(tensor.is_floating_point())
    loss_ctx = dataclasses.replace(first_pass[0], stage="loss", calls=0)
    with autocast(cfg, device), training_step(loss_ctx):
        out = method.loss(cached)
    session.watch.observe(out, state.step)
    out["loss"].backward()
    shares = {name: t.grad for name, t in cached.items() if t.grad is not None}
    for i, (batch, ctx) in enumerate(zip(micro, replays)):
        _set_rng_state(rng_before[i], device)
        with autocast(cfg, device), training_step(ctx):
            again = method.features(batch)
        names = [name for name in shares if again[name].requires_grad]
        if names:
            torch.autograd.backward([again[n] for n in names], [shares[n][i * rows:(i + 1) * rows] for n in names])
    _set_rng_state(rng_after, device)
    if run.info.world_size > 1:
        _average_gradients(method, run.info.world_size)
    return {name: value.detach() for name, value in out.items()}


def _rng_state(device: torch.device) -> dict:
    """torch's generator states a forward pass draws from (dropout, drop path): the CPU's and the device's."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


# Gradients are averaged over ranks in buckets of about this many bytes (DDP's default bucket is 25 MB).
GRAD_BUCKET_BYTES = 25 * 2**20


def _average_gradients(method: torch.nn.Module, world_size: int) -> None:
    """Average every parameter's gradient over the ranks, as DDP's reducer does, in flat buckets."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in method.parameters() if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for i, grad in enumerate(grads):
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
        if size >= GRAD_BUCKET_BYTES or i == len(grads) - 1 or grads[i + 1].dtype != grad.dtype:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world_size
            for g, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(averaged)
            bucket, size = [], 0


def _optimizer_step(run: _Run, state: TrainState) -> None:
    """Clip, update, apply the method's constraints, clear the gradients, advance the schedule."""
    if run.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.method.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run_after_step(run.method)  # the method itself, not its DDP / compiled wrapper
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    run.scheduler.step_update(state.step)


def _due(step: int, every: int, total: int) -> bool:
    """Whether ``step`` is one of every ``every`` steps, or the last."""
    return step % every == 0 or step == total


def _log_step(run: _Run, state: TrainState, session: _Session, out: dict) -> None:
    """Stop on a non-finite loss; write the metrics row (loss parts averaged over ranks, learning
    rate, throughput), update the progress bar; stop when too many samples were bad."""
    info, step = run.info, state.step
    session.watch.check(info, run.desc, run.ckpt_path)
    _merge_counts(state, session.counts, info)
    elapsed, images = session.lap()
    ips = images / max(elapsed, 1e-9)
    state.seconds += elapsed
    row = {"step": step, "epoch": step / run.steps_per_epoch, "lr": run.optimizer.param_groups[0]["lr"],
           **_mean_over_ranks(out, info), "images_per_s": ips}
    state.loss = row["loss"]
    state.peak_memory_mb = max(state.peak_memory_mb, memory_in_use_mb(run.device))
    if session.log:
        session.log.write(json.dumps(row) + "\n")
        session.log.flush()
    if session.on_log:
        session.on_log(row)
    session.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{ips:.0f}",
                            bad=sum(state.skipped.values()), fixed=sum(state.repaired.values()))
    _check_bad_fraction(state, run.max_bad_fraction, run.desc, step)


def _rng_states(info: DistInfo) -> list[dict]:
    """Every rank's generator states (masks and dropout draw from the CPU generator, or the
    device's on CUDA), gathered in rank order."""
    device = info.device
    rngs = [{"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}]
    if info.world_size > 1:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    return rngs


def _checkpoint(run: _Run, state: TrainState, session: _Session) -> None:
    """Stop on a non-finite loss (no checkpoint holds the damage), book the training time, and
    write the checkpoint (rank 0; every rank takes part in gathering it)."""
    session.watch.check(run.info, run.desc, run.ckpt_path)
    _merge_counts(state, session.counts, run.info)
    state.seconds += session.restart_clock()
    rngs = _rng_states(run.info)
    model_state, optimizer_state = (gather_full_state(run.method, run.optimizer) if run.fsdp else
                                    (run.method.state_dict(), run.optimizer.state_dict()))
    if run.info.is_main:
        save_run_checkpoint(run.workdir, {"model": model_state, "optimizer": optimizer_state,
                                          "state": state.to_dict(), "rng": rngs, "identity": run.identity},
                            state.step, keep=run.cfg.keep_checkpoints)


def _end_short_epoch(run: _Run, state: TrainState, session: _Session, epoch: int, steps: int) -> None:
    """The epoch's batches ran out before its updates did (a stream ran short: samples were skipped, or
    streams hold unequal counts): count the epoch as complete, so the schedule and the resume position
    stay aligned with the epochs. An epoch without a single step stops the run (`BadDataError`)."""
    if steps == 0:
        _merge_counts(state, session.counts, run.info)  # the message names every rank's skips
        raise BadDataError(f"The data pipeline yielded no batch for epoch {epoch} of {run.desc}: every "
                           f"sample was skipped (by kind: {state.skipped or 'none'}) or the "
                           f"shards hold none. Run `mugbench data check SHARDS` to see what is wrong "
                           f"with them, sample by sample.")
    run.optimizer.zero_grad(set_to_none=True)
    state.step = min(run.total, max(state.step, (epoch + 1) * run.steps_per_epoch))
    run.scheduler.step_update(state.step)


def _run_epoch(run: _Run, state: TrainState, session: _Session, batches: Callable[[int], Iterable[dict]]) -> None:
    """Train the epoch ``state.step`` is in, from where it stands, until the epoch's last update
    or the run's; log and checkpoint at their steps."""
    k = run.cfg.accum_steps
    epoch, done = divmod(state.step, run.steps_per_epoch)
    counts = session.counts
    epoch_batches = _image_batches(_timed_fetches(batches(epoch), state), counts, done * k)
    seen = 0
    for seen, micro in enumerate(_while_every_rank_has_data(_steps(epoch_batches, k, counts), run.info, counts), 1):
        if seen <= done:  # resuming mid-epoch: the pipeline is deterministic, so skip what was trained
            continue
        out = _train_step(run, state, session, micro)
        _optimizer_step(run, state)
        if _due(state.step, run.cfg.log_every, run.total):
            _log_step(run, state, session, out)
        session.bar.update(1)
        if _due(state.step, run.cfg.ckpt_every, run.total):
            _checkpoint(run, state, session)
        if state.step >= run.total or state.step % run.steps_per_epoch == 0:
            return
    _end_short_epoch(run, state, session, epoch, seen)


def _summarize(run: _Run, state: TrainState, resumed_from: int) -> TrainSummary:
    """The finished run's `TrainSummary` (the loss curve read back from the log on rank 0)."""
    seconds = state.seconds
    return TrainSummary(steps=state.step, epochs=state.step / run.steps_per_epoch, seconds=seconds,
                        images_per_s=state.images / max(seconds, 1e-9), final_loss=state.loss,
                        skipped=dict(state.skipped), repaired=dict(state.repaired), resumed_from=resumed_from,
                        peak_memory_mb=state.peak_memory_mb,
                        data_share=min(1.0, state.data_s / max(seconds, 1e-9)),
                        loss_curve=read_loss_curve(run.log_path) if run.info.is_main else {})


def train(method: torch.nn.Module, batches: Callable[[int], Iterable[dict]], cfg: TrainConfig, *,
          steps_per_epoch: int, workdir: Path, info: DistInfo, seed: int, desc: str = "train",
          max_bad_fraction: float = 1.0, on_log: Callable[[dict], None] | None = None) -> TrainSummary:
    """Pre-train ``method`` on ``batches(epoch)`` for ``cfg.epochs`` epochs, resuming from ``workdir``.

    ``steps_per_epoch`` counts optimiser updates per epoch for the global batch. The run's
    checkpoints are ``workdir/checkpoint-<step>.pt`` (the last ``cfg.keep_checkpoints``; ``checkpoint.pt``
    links to the newest, and an unreadable newest one falls back to the one before); metrics go to
    ``workdir/metrics.jsonl``, cut back to the resumed step (0 without a checkpoint) so a rerun never
    repeats rows; checkpoint files of which none loads stop it (`UnreadableCheckpointError`). Skipped
    and repaired samples are summed from the batches; once more than ``max_bad_fraction`` of
    the samples read are skipped, training stops with `BadDataError`. ``on_log`` (rank 0) gets each
    metrics row as it is written (an experiment tracker's hook, `trackers.Tracker.log_train`).
    """
    run = _prepare(method, cfg, steps_per_epoch=steps_per_epoch, workdir=workdir, info=info, desc=desc,
                   max_bad_fraction=max_bad_fraction, seed=seed)
    state = _resume(run, seed)
    resumed_from = state.step
    with _session(run, state, on_log) as session:
        while state.step < run.total:
            _run_epoch(run, state, session, batches)
        _merge_counts(state, session.counts, info)
    return _summarize(run, state, resumed_from)
