"""Evaluation on every rank of a job: each rank computes whole inference batches of a set, and the
results are gathered on every rank in the set's order.

A set of ``n`` items read ``batch_size`` at a time has the batches a single process would run; `my_batches`
gives this rank a contiguous run of them (rank 0 the first run, and so on), so every batch holds exactly
the items it holds in one process, every item is computed once, and concatenating the ranks' rows in rank
order is the dataset order. Per-item results therefore equal a one-process run's bit for bit wherever a
batch's rows do not depend on how many batches came before (a method drawing random masks seeds each
batch from its first index: `batch_seed`).

Outside a process group (one process, or `torch.distributed` not initialised) every function is the
one-process case: rank 0 of 1, gathers return their input. At ImageNet's sizes the biggest gather is the
train split's features (1.28M x 768 float32, 3.9 GB), held once on every rank's host.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes records, figures and logs)."""
    return world()[0] == 0


def batch_spans(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every batch a single process reads ``n`` items in, ``batch_size`` at a time."""
    batch_size = max(1, int(batch_size))
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def rank_batches(n: int, batch_size: int, rank: int, size: int) -> list[tuple[int, int]]:
    """The batches (`batch_spans`) of rank ``rank`` of ``size``: a contiguous run, the runs as even as whole
    batches allow (the first ``len % size`` ranks take one more)."""
    spans = batch_spans(n, batch_size)
    per, extra = divmod(len(spans), size)
    start = rank * per + min(rank, extra)
    return spans[start:start + per + (rank < extra)]


def my_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """This rank's batches of ``n`` items (`rank_batches`)."""
    rank, size = world()
    return rank_batches(n, batch_size, rank, size)


def batch_seed(seed: int, start: int) -> int:
    """The seed of the batch that begins at item ``start``: the same on whichever rank computes it."""
    return (int(seed) * 1_000_003 + int(start)) % (2 ** 63)


def _rows_per_rank(n: int, batch_size: int, size: int) -> list[int]:
    return [sum(b - a for a, b in rank_batches(n, batch_size, r, size)) for r in range(size)]


def _collective_device() -> torch.device:
    """Where tensors must be for the process group's backend: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: torch.Tensor, n: int, batch_size: int) -> torch.Tensor:
    """Every rank's ``local`` rows (its `my_batches` of ``n`` items, concatenated) on every rank, in dataset
    order, on the CPU. A collective: every rank calls it with the same ``n`` and ``batch_size``."""
    rank, size = world()
    if size == 1:
        return local.cpu()
    counts = _rows_per_rank(n, batch_size, size)
    if local.shape[0] != counts[rank]:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows of its batches, not {counts[rank]}")
    is_bool = local.dtype == torch.bool  # not every backend reduces or gathers bool
    device = _collective_device()
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=torch.uint8 if is_bool else local.dtype,
                         device=device)
    padded[:counts[rank]] = local.to(device=device, dtype=padded.dtype)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    out = torch.cat([part[:count] for part, count in zip(parts, counts)]).cpu()
    return out.bool() if is_bool else out


def gather_objects(local: Sequence[Any]) -> list:
    """Every rank's list concatenated in rank order, on every rank (picklable items; captions, dicts)."""
    rank, size = world()
    if size == 1:
        return list(local)
    parts: list = [None] * size
    dist.all_gather_object(parts, list(local))
    return [item for part in parts for item in part]


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def map_batches(fn: Callable[[int, int], Any], n: int, batch_size: int, *, desc: str | None = None) -> Any:
    """``fn(start, stop)`` for this rank's batches of ``n`` items, gathered on every rank in dataset order.

    ``fn`` returns a tensor with one row per item (gathered into one ``[n, ...]`` CPU tensor), a list with
    one entry per item (one list), or a dict of such tensors (a dict). ``fn`` must not run collectives
    itself: ranks run different numbers of batches (a DDP-wrapped model: pass its ``.module``). With
    ``desc``, rank 0 shows its share as a progress bar (`mugbench.progress.progress_bar`).
    """
    from ..progress import progress_bar  # here: progress imports nothing of eval, but keep this module light

    spans = my_batches(n, batch_size)
    with progress_bar(len(spans), desc=desc or "", unit="batch", disable=desc is None or not is_main()) as bar:
        local = []
        for a, b in spans:
            local.append(fn(a, b))
            bar.update()
    if not local and n == 0:
        return []
    sample = local[0] if local else None
    kind = _kind_of(sample)
    kinds = gather_objects([kind]) if world()[1] > 1 else [kind]
    kind = next((k for k in kinds if k is not None), None)  # a rank without batches learns the kind
    if kind == "list":
        return gather_objects([item for part in local for item in part])
    if kind == "dict":
        keys = gather_objects([sorted(sample)] if sample is not None else [])[0]
        return {key: _gather_tensors([part[key] for part in local], n, batch_size) for key in keys}
    return _gather_tensors(local, n, batch_size)


def _kind_of(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, torch.Tensor):
        return "tensor"
    return "list"


def _gather_tensors(parts: list[torch.Tensor], n: int, batch_size: int) -> torch.Tensor:
    """This rank's tensors concatenated and gathered; a rank without batches learns shape and dtype from
    the others (a tensor's trailing shape and dtype are the same on every rank)."""
    if world()[1] == 1:
        return torch.cat([p.cpu() for p in parts]) if parts else torch.zeros(0)
    meta = gather_objects([(tuple(parts[0].shape[1:]), parts[0].dtype)] if parts else [])
    shape, dtype = meta[0]
    local = torch.cat(parts) if parts else torch.zeros((0, *shape), dtype=dtype)
    return gather_rows(local, n, batch_size)
