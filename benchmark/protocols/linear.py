"""Linear probe on frozen features (MAE's protocol: BatchNorm without affine, then a linear head)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import COUNT, COUNT0, NON_NEGATIVE, POSITIVE
from ..protocol import EvalContext, Features, Protocol, ProtocolResult
from ..registry import register_protocol


SOLVERS = ("sgd", "lars")  # momentum SGD (the fast path) | timm's LARS (MAE's paper protocol)


@register_protocol("linear")
class LinearProbe(Protocol):
    """A linear head per learning rate of a grid, trained in one pass on cached frozen features."""

    reads, set_kind, label, headline, order = "features", "classification", "linear probe", ("top1",), 20

    @dataclass
    class Options:
        """MAE's probe runs 90 epochs with LARS (He et al. 2022); ``sgd`` is the fast path for small sets."""

        epochs: int = COUNT.field(100)
        lr: float = POSITIVE.field(0.1)  # base lr (peak = lr x batch / 256) when lrs is empty
        lrs: list = POSITIVE.field(factory=list)  # base-lr grid trained in one pass; empty = [lr]
        batch_size: int = COUNT.field(256)
        weight_decay: float = NON_NEGATIVE.field(0.0)
        warmup_epochs: int = COUNT0.field(0)  # MAE's probe: 10 of 90 epochs
        solver: str = "sgd"  # sgd (momentum) | lars (MAE's paper protocol)

        def __post_init__(self):
            if self.solver not in SOLVERS:
                raise ValueError(f"eval.linear.solver={self.solver!r} is not one of {', '.join(SOLVERS)}")

    def run(self, subject: Features, data, options, ctx: EvalContext) -> ProtocolResult:
        """Best top-1 over the grid; the record keeps every rate's top-1, the best rate, and whether
        the best rate's head classified each val image right."""
        from ..eval.linear import evaluate_linear  # torch: imported when run, not when the registry is read
        lrs = list(options.lrs or [options.lr])
        opts = {"epochs": options.epochs, "lrs": lrs, "batch_size": options.batch_size,
                "weight_decay": options.weight_decay, "warmup_epochs": options.warmup_epochs,
                "solver": options.solver, "schedule": "warmup-cosine"}
        metrics, grid, outcomes = evaluate_linear(subject.train, data.train.label, subject.val, data.val.label,
                                                  data.num_classes, epochs=options.epochs, lrs=lrs,
                                                  batch_size=options.batch_size, weight_decay=options.weight_decay,
                                                  warmup_epochs=options.warmup_epochs, solver=options.solver,
                                                  seed=ctx.seed, device=ctx.device)
        return ProtocolResult(metrics, dict(opts, **grid), per_example=outcomes)
