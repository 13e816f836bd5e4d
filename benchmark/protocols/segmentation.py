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
        # Speed only: loader processes per rank. ADE20K's decode, 2048 x 512 resize and colour jitter take
        # about as long as a GPU's step on 2 crops, so in the training process they leave it idle half the time.
        workers: int = COUNT0.field(0)

    @classmethod
    def world_problems(cls, options, world_size: int) -> list[str]:
        """The global batch must split evenly over the ranks (`check_batch_split`), at least two crops per
        rank where BatchNorm is per rank: a job of several ranks syncs it on CUDA, which the study uses
        whenever a GPU exists; `segment` checks again on the device it is given."""
        import torch

        from ..eval.segmentation import check_batch_split

        try:
            check_batch_split(options.batch_size, world_size,
                              synced_bn=world_size > 1 and torch.cuda.is_available())
        except ValueError as exc:
            return [str(exc)]
        return []

    def run(self, subject, data, options, ctx: EvalContext) -> ProtocolResult:
        """Train (resumably, in ``ctx.workdir``; under DDP over every rank of a torchrun job, each rank
        calling it) and score the val split."""
        from ..eval.segmentation import segment  # mmseg is a heavy import: only when used

        metrics, opts = segment(subject, data, options, seed=ctx.seed, device=ctx.device, workdir=ctx.workdir,
                                batch_size=ctx.batch_size)
        return ProtocolResult(metrics, opts)
