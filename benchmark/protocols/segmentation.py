"""Semantic segmentation: UperNet from mmsegmentation on four ViT blocks (`mugbench.eval.segmentation`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import COUNT, COUNT0, DECAY, NON_NEGATIVE, POSITIVE, Range
from ..protocol import EvalContext, Protocol, ProtocolResult
from ..registry import register_protocol


@register_protocol("segmentation")
class Segmentation(Protocol):
    """UperNet + auxiliary FCN head on a copy of the encoder; mIoU by mmseg's IoUMetric."""

    reads, set_kind, label, headline, order = "encoder", "segmentation", "segmentation", ("mIoU",), 40

    @dataclass
    class Options:
        """BEiT / MAE's ADE20K setting (160k iterations of 16 crops of 512 px), mmseg's defaults."""

        iters: int = COUNT.field(160000)
        batch_size: int = COUNT.field(16)
        crop: int = COUNT.field(512)
        lr: float = POSITIVE.field(1.0e-4)
        weight_decay: float = NON_NEGATIVE.field(0.05)
        layer_decay: float = DECAY.field(0.65)
        warmup_iters: int = COUNT0.field(1500)
        channels: int = COUNT.field(512)  # UPerHead width
        aux_weight: float = NON_NEGATIVE.field(0.4)  # auxiliary FCNHead loss weight
        # RandomResize's ratio range; a list, as records and the resume signature (JSON) hold it.
        scale_range: list = Range(0, low_open=True, length=2, ordered=True).field(factory=lambda: [0.5, 2.0])

    def run(self, subject, data, options, ctx: EvalContext) -> ProtocolResult:
        """Train (resumably, in ``ctx.workdir``) and score the val split."""
        from ..eval.segmentation import segment  # mmseg is a heavy import: only when used

        metrics, opts = segment(subject, data, options, seed=ctx.seed, device=ctx.device, workdir=ctx.workdir,
                                batch_size=ctx.batch_size)
        return ProtocolResult(metrics, opts)
