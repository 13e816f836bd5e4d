"""What a method computes over the global batch of a training step, whatever the number of ranks and
accumulation micro-batches it is split into (DESIGN.md "Trainer"; issue: exact accumulation).

The trainer runs every forward pass of a step inside `training_step`, with a `StepContext` that says
where the micro-batch sits in the step's global batch. Two things a method needs from it:

- **Randomness keyed by global row** (`global_batch_rand`): masks and other per-sample draws are cut
  from one draw for the whole global batch, made from a generator seeded by (seed, step, call), so a
  sample gets the same mask on 1 or 64 GPUs, in one batch or four micro-batches, and in both passes of
  an exact accumulation (`Method.features` is forwarded twice). Outside a training step (evaluation,
  tests) the draw is the process's own, from torch's generator, as before.
- **Means over the global batch** (`global_mean`): a loss normalised by a count that varies from
  micro-batch to micro-batch (caption tokens) must divide by the step's total, not the micro-batch's.
  The method declares the count (`Method.loss_counts(batch)`, computed from the batch alone); the
  trainer sums it over the step's micro-batches and ranks before the first forward, and `global_mean`
  scales the micro-batch's sum so that the trainer's averaging (over ``share`` = ranks x micro-batches)
  gives exactly the global mean.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..data.transforms import sample_seed

__all__ = ["StepContext", "global_batch_rand", "global_mean", "loss_stage", "training_step"]


@dataclass
class StepContext:
    """Where the rows being forwarded sit in the global batch of optimiser step ``step``.

    ``offset``: the global index of the micro-batch's first row; ``rows``: the global batch size;
    ``totals``: the step's counts (`Method.loss_counts`) summed over every micro-batch and rank;
    ``share``: how many pieces the trainer averages the losses of (ranks x micro-batches for plain
    accumulation, ranks for the loss stage of an exact one).
    """

    seed: int
    step: int
    offset: int
    rows: int
    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    share: int = 1
    stage: str = "features"
    calls: int = 0  # draws so far in this forward pass: the i-th draw of a pass is the same in every pass


_STEP: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("mugbench_training_step", default=None)


@contextlib.contextmanager
def training_step(ctx: StepContext) -> Iterator[StepContext]:
    """Run the block (one forward pass of the trainer) as part of the step ``ctx`` describes."""
    token = _STEP.set(ctx)
    try:
        yield ctx
    finally:
        _STEP.reset(token)


@contextlib.contextmanager
def loss_stage() -> Iterator[None]:
    """Within the block, draws are counted apart from the features' (``Method.forward`` of a method with
    a features / loss split wraps its ``loss`` in it), so that a loss computed in the same pass as its
    features or in a pass of its own (exact accumulation) draws the same numbers."""
    ctx = _STEP.get()
    if ctx is None:
        yield
        return
    saved = ctx.stage, ctx.calls
    ctx.stage, ctx.calls = "loss", 0
    try:
        yield
    finally:
        ctx.stage, ctx.calls = saved


def _call_seed(ctx: StepContext) -> int:
    """The seed of the pass's next draw: a hash of (seed, step, stage, draw number)."""
    ctx.calls += 1
    return sample_seed(ctx.seed, ctx.step, f"rand/{ctx.stage}/{ctx.calls}")


def global_batch_rand(rows: int, *shape: int, device=None) -> torch.Tensor:
    """Uniform noise ``[rows, *shape]`` for the rows being forwarded.

    In a training step: rows ``offset .. offset + rows`` of one draw ``[global rows, *shape]`` from a
    generator seeded by (seed, step, i) for the pass's i-th draw, on ``device`` (at ViT-B on 4,096 images a
    mask draw is 4,096 x 196 numbers, nothing beside the step). Elsewhere: ``torch.rand`` from the global
    generator, the process's own batch.
    """
    ctx = _STEP.get()
    if ctx is None:
        return torch.rand(rows, *shape, device=device)
    if ctx.offset + rows > ctx.rows:
        raise ValueError(f"rows {ctx.offset}..{ctx.offset + rows} lie outside the step's global batch of {ctx.rows}")
    generator = torch.Generator(device=device or "cpu").manual_seed(_call_seed(ctx))
    return torch.rand(ctx.rows, *shape, generator=generator, device=device)[ctx.offset:ctx.offset + rows]


def global_mean(total: torch.Tensor, count: str, local_count: torch.Tensor) -> torch.Tensor:
    """``total`` (a sum over the micro-batch's rows) divided by the step's ``count`` over the global batch.

    In a training step the trainer averages a loss over ``share`` micro-batches and ranks, so the
    micro-batch's part is ``total * share / global count``: its average is the global batch's mean, on
    any number of ranks and micro-batches. ``count`` must be one of the method's `Method.loss_counts`.
    Outside the trainer: ``total / local_count``, the batch's own mean.
    """
    ctx = _STEP.get()
    if ctx is None:
        return total / local_count.clamp(min=1)
    if count not in ctx.totals:
        raise KeyError(f"global_mean over {count!r}, which the method's loss_counts(batch) does not declare "
                       f"(it declares {sorted(ctx.totals) or 'none'}): the trainer sums only declared counts")
    return total * ctx.share / ctx.totals[count].clamp(min=1)
