"""The one training loop every method shares (DESIGN.md "Trainer").

AdamW without weight decay on norms, biases and tokens; warmup then cosine (timm's scheduler);
gradient clipping and accumulation; bf16 autocast on CUDA; DDP under torchrun; JSONL metrics;
atomic checkpoints every N steps and at the end, resumed automatically by a rerun.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import random_seed
from tqdm.auto import tqdm

from ..config import ConfigError, TrainConfig
from ..data.catalog import BadDataError
from ..results import atomic_write_text
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


def _tally(state: dict, batch: dict) -> None:
    """Add a batch's skipped and repaired counts to the run's totals."""
    for tally in ("skipped", "repaired"):
        for kind, n in batch.pop(tally, {}).items():
            state[tally][kind] = state[tally].get(kind, 0) + int(n)


def _image_batches(batches: Iterable[dict], state: dict, resume_at: int) -> Iterator[dict]:
    """Yield the batches that hold images; tally the image-less ones (a worker's last skip counts)
    here, unless they came before ``resume_at`` real batches, which the checkpoint already counted.
    Filtered before the ranks agree on having data, so every rank steps in lockstep."""
    real = 0
    for batch in batches:
        if "image" in batch:
            real += 1
            yield batch
        elif real >= resume_at:
            _tally(state, batch)


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


def _while_every_rank_has_data(batches: Iterable[dict], info: DistInfo) -> Iterator[dict]:
    """Yield batches while every rank still has one. Shards rarely hold equal sample counts, and
    a rank that ran dry would leave the others waiting forever in the gradient all-reduce."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if info.world_size > 1:
            more = torch.tensor([float(batch is not None)], device=info.device)
            dist.all_reduce(more, op=dist.ReduceOp.MIN)
            if not more.item():
                return
        if batch is None:
            return
        yield batch


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


def _timed_fetches(batches: Iterable[dict], state: dict) -> Iterator[dict]:
    """``batches``, adding the time spent waiting for each one to ``state["data_s"]``."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        state["data_s"] = state.get("data_s", 0.0) + time.perf_counter() - start
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


def _check_bad_fraction(state: dict, limit: float, info: DistInfo, desc: str, step: int) -> None:
    """Raise `BadDataError` on every rank together when the skipped fraction exceeds ``limit``."""
    bad = torch.tensor([float(sum(state["skipped"].values()))], device=info.device)
    if info.world_size > 1:  # skips are counted per rank; the decision must be the same everywhere
        dist.all_reduce(bad)
    bad, good = int(bad.item()), state["images"]
    if bad + good < MIN_SAMPLES_FOR_BAD_FRACTION or bad <= limit * (bad + good):
        return
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(state["skipped"].items()))
    raise BadDataError(
        f"Training of {desc} stopped at step {step}: {bad} of the {bad + good} samples read so far were bad "
        f"({100 * bad / (bad + good):.1f}%), more than data.max_bad_fraction={limit}. By kind (rank {info.rank}): "
        f"{kinds}. List the bad keys with `mugbench data check DATA --fix-list`, rebuild the broken shards, or "
        f"accept more with --set data.max_bad_fraction=X; rerunning resumes from the last checkpoint.")


def train(method: torch.nn.Module, batches: Callable[[int], Iterable[dict]], cfg: TrainConfig, *,
          steps_per_epoch: int, workdir: Path, info: DistInfo, seed: int, desc: str = "train",
          max_bad_fraction: float = 1.0) -> TrainSummary:
    """Pre-train ``method`` on ``batches(epoch)`` for ``cfg.epochs`` epochs, resuming from ``workdir``.

    ``steps_per_epoch`` counts optimiser updates per epoch for the global batch. The run's
    checkpoints are ``workdir/checkpoint-<step>.pt`` (the last ``cfg.keep_checkpoints``; ``checkpoint.pt``
    links to the newest, and an unreadable newest one falls back to the one before); metrics go to
    ``workdir/metrics.jsonl``, cut back to the resumed step (0 without a checkpoint) so a rerun never
    repeats rows; checkpoint files of which none loads stop it (`UnreadableCheckpointError`). Skipped
    and repaired samples are summed from the batches; once more than ``max_bad_fraction`` of
    the samples read are skipped, training stops with `BadDataError`.
    """
    if cfg.strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"train.strategy must be 'ddp' or 'fsdp', not {cfg.strategy!r}.")
    fsdp = cfg.strategy == "fsdp" and info.world_size > 1
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = workdir / CHECKPOINT_LINK, workdir / "metrics.jsonl"
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    device = info.device
    method.to(device)
    if info.world_size > 1 and device.type == "cuda":
        # Batch statistics of projection heads over the global batch (SimCLR's "global BN": per-device
        # statistics leak which views belong together). torch synchronises BatchNorm only on GPUs;
        # the modules are swapped in place, keeping their parameters, so the method object stays.
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    identity = {"method": desc, "params": _shapes(method)}  # before sharding: the full shapes
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(method)
    model = method
    if fsdp:
        shard_with_fsdp(method)  # before the optimizer, which must see the sharded parameters
    elif info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[info.local_rank] if device.type == "cuda" else None)
    optimizer = build_optimizer(method, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, total, steps_per_epoch)
    step_fn = CompiledOrEager(model, cfg.compile_backend, warn=lambda m: print(m, file=sys.stderr)) \
        if cfg.compile else model

    state = {"step": 0, "seconds": 0.0, "images": 0, "skipped": {}, "repaired": {}, "loss": float("nan"),
             "peak_memory_mb": 0.0, "data_s": 0.0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # One seed on every rank: masks are drawn for the global batch and sliced per rank (random_masking),
    # so a run does not depend on the number of processes that share its batch. Python's and numpy's
    # RNGs too, so a method plugin that draws from them is not moved by whatever ran before in the process.
    random_seed(seed)
    found = load_newest_checkpoint(workdir, warn=(lambda msg: print(f"warning: {msg}", file=sys.stderr))
                                   if info.is_main else (lambda msg: None))
    if found:
        ckpt, path = found
        _check_identity(identity, ckpt, path)
        if fsdp:
            load_full_state(method, optimizer, ckpt["model"], ckpt["optimizer"])
        else:
            method.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        state.update(ckpt["state"])
        rng = ckpt["rng"][min(info.rank, len(ckpt["rng"]) - 1)]
        torch.set_rng_state(rng["cpu"] if isinstance(rng, dict) else rng)
        if isinstance(rng, dict) and rng.get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    if info.is_main:  # with or without a checkpoint: a run killed before its first one logged rows too
        _truncate_log(log_path, state["step"])
    resumed_from = state["step"]

    def checkpoint():
        # Masks and dropout draw from the CPU generator, or the device's on CUDA: both are saved per rank.
        rngs = [{"cpu": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}]
        if info.world_size > 1:
            gathered = [None] * info.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        model_state, optimizer_state = (gather_full_state(method, optimizer) if fsdp else
                                        (method.state_dict(), optimizer.state_dict()))
        if info.is_main:
            save_run_checkpoint(workdir, {"model": model_state, "optimizer": optimizer_state, "state": dict(state),
                                          "rng": rngs, "identity": identity}, step, keep=cfg.keep_checkpoints)

    step = state["step"]
    watch = _NonFiniteWatch(device)
    scheduler.step_update(step)
    bar = tqdm(total=total, initial=step, desc=desc, disable=not info.is_main, dynamic_ncols=True, leave=False)
    log = open(log_path, "a") if info.is_main else None
    model.train()
    window_t, window_images = time.perf_counter(), 0
    try:
        while step < total:
            epoch, skip = divmod(step, steps_per_epoch)
            skip = skip * cfg.accum_steps
            micro = 0
            epoch_batches = _image_batches(_timed_fetches(batches(epoch), state), state, skip)
            for i, batch in enumerate(_while_every_rank_has_data(epoch_batches, info)):
                if i < skip:  # resuming mid-epoch: the pipeline is deterministic, so skip what was seen
                    continue
                _tally(state, batch)
                batch = _to_device(batch, device)
                sync = (micro + 1) % cfg.accum_steps == 0
                # DDP skips the gradient all-reduce on accumulation micro-steps; FSDP reduces every one.
                with (contextlib.nullcontext() if sync or info.world_size == 1 or fsdp else model.no_sync()):
                    with autocast(cfg, device):
                        out = step_fn(batch)
                    watch.observe(out, step)
                    (out["loss"] / cfg.accum_steps).backward()
                micro += 1
                n_img = batch["image"].shape[0] * info.world_size
                state["images"] += n_img
                window_images += n_img
                if not sync:
                    continue
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.grad_clip)
                optimizer.step()
                run_after_step(method)  # the method itself, not its DDP / compiled wrapper
                optimizer.zero_grad(set_to_none=True)
                step += 1
                state["step"] = step
                scheduler.step_update(step)
                if step % cfg.log_every == 0 or step == total:
                    watch.check(info, desc, ckpt_path)
                    now = time.perf_counter()
                    ips = window_images / max(now - window_t, 1e-9)
                    state["seconds"] += now - window_t
                    window_t, window_images = now, 0
                    row = {"step": step, "epoch": step / steps_per_epoch, "lr": optimizer.param_groups[0]["lr"],
                           **_mean_over_ranks(out, info), "images_per_s": ips}
                    state["loss"] = row["loss"]
                    state["peak_memory_mb"] = max(state.get("peak_memory_mb", 0.0), memory_in_use_mb(device))
                    if log:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{ips:.0f}",
                                    bad=sum(state["skipped"].values()), fixed=sum(state["repaired"].values()))
                    _check_bad_fraction(state, max_bad_fraction, info, desc, step)
                bar.update(1)
                if step % cfg.ckpt_every == 0 or step == total:
                    watch.check(info, desc, ckpt_path)
                    state["seconds"] += time.perf_counter() - window_t
                    window_t = time.perf_counter()
                    checkpoint()
                if step >= total or step % steps_per_epoch == 0:
                    break
            else:
                if micro == 0:
                    raise BadDataError(f"The data pipeline yielded no batch for epoch {epoch} of {desc}: every "
                                       f"sample was skipped (by kind: {dict(state['skipped']) or 'none'}) or the "
                                       f"shards hold none. Run `mugbench data check SHARDS` to see what is wrong "
                                       f"with them, sample by sample.")
                # A short epoch (samples were skipped): drop a partial accumulation and count the epoch
                # as complete, so the schedule and the resume position stay aligned with the epochs.
                optimizer.zero_grad(set_to_none=True)
                step = state["step"] = min(total, max(step, (epoch + 1) * steps_per_epoch))
                scheduler.step_update(step)
    finally:
        bar.close()
        if log:
            log.close()
    seconds = state["seconds"]
    return TrainSummary(steps=step, epochs=step / steps_per_epoch, seconds=seconds,
                        images_per_s=state["images"] / max(seconds, 1e-9), final_loss=state["loss"],
                        skipped=dict(state["skipped"]), repaired=dict(state.get("repaired", {})),
                        resumed_from=resumed_from, peak_memory_mb=state.get("peak_memory_mb", 0.0),
                        data_share=min(1.0, state.get("data_s", 0.0) / max(seconds, 1e-9)),
                        loss_curve=read_loss_curve(log_path) if info.is_main else {})
