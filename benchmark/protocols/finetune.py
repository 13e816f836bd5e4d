"""End-to-end fine-tuning with MAE's recipe (`mugbench.eval.finetune`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import BELOW_ONE, COUNT, COUNT0, DECAY, FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, Range
from ..protocol import EvalContext, Protocol, ProtocolResult
from ..registry import register_protocol


HEAD_INITS = ("mae", "probe")


@register_protocol("finetune")
class FineTune(Protocol):
    """Fine-tune a copy of the encoder with a new linear head; best and last top-1."""

    reads, set_kind, label, headline, order = "encoder", "classification", "fine-tune", ("top1",), 30

    @dataclass
    class Options:
        """MAE's ViT-B recipe (He et al. 2022, Table 9), built from timm's utilities."""

        epochs: int = COUNT.field(100)
        batch_size: int = COUNT.field(1024)
        blr: float = POSITIVE.field(5.0e-4)  # lr = blr * batch / 256
        layer_decay: float = DECAY.field(0.65)
        weight_decay: float = NON_NEGATIVE.field(0.05)
        drop_path: float = BELOW_ONE.field(0.1)
        warmup_epochs: int = COUNT0.field(5)
        mixup: float = NON_NEGATIVE.field(0.8)  # Beta(alpha, alpha) mixing; 0 = off
        cutmix: float = NON_NEGATIVE.field(1.0)
        label_smoothing: float = BELOW_ONE.field(0.1)
        randaug: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm auto_augment string; null = none
        reprob: float = FRACTION.field(0.25)
        # RandomResizedCrop's area and aspect ranges (timm's and MAE's defaults); [1, 1] and [1, 1]: no crop.
        # Lists, as records (JSON) hold them, so a reread record's options compare equal.
        crop_scale: list = Range(0, 1, low_open=True, length=2, ordered=True).field(factory=lambda: [0.08, 1.0])
        crop_ratio: list = Range(0, low_open=True, length=2, ordered=True).field(factory=lambda: [3 / 4, 4 / 3])
        # mae: MAE's near-zero head (std 2e-5); probe: LP-FT (Kumar et al., ICLR 2022), the head starts as a
        # linear probe fitted on the frozen encoder's features of the train split.
        head_init: str = "mae"
        # Speed and memory only: each rank's share of the global batch_size runs in this many passes, their
        # gradients summed before one update (MAE's accum_iter: 1,024 = 8 GPUs x 4 passes x 32 images).
        accum_steps: int = COUNT.field(1)

        def __post_init__(self):
            if self.head_init not in HEAD_INITS:
                raise ConfigError(f"eval.finetune.head_init={self.head_init!r} is not one of {', '.join(HEAD_INITS)}.")

    @classmethod
    def world_problems(cls, options, world_size: int) -> list[str]:
        """The global batch must split into equal passes over the ranks and accumulation steps (even ones
        with Mixup/CutMix)."""
        from ..eval.finetune import split_batch

        try:
            split_batch(options.batch_size, world_size, options.accum_steps,
                        even=options.mixup > 0 or options.cutmix > 0)
        except ValueError as exc:
            return [str(exc)]
        return []

    def run(self, subject, data, options, ctx: EvalContext) -> ProtocolResult:
        """Fine-tune and score the val split after every epoch; the record keeps whether each val image
        was right after the best epoch (``top1``) and the last (``top1_last``)."""
        from ..eval.finetune import finetune

        metrics, opts, outcomes = finetune(subject, data, options, seed=ctx.seed, device=ctx.device, pool=ctx.pool,
                                           batch_size=ctx.batch_size)
        return ProtocolResult(metrics, opts, per_example=outcomes)
