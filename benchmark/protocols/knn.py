"""k-NN on frozen features: the cheapest read of what the encoder learnt, no training at all."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import COUNT, POSITIVE
from ..protocol import EvalContext, Features, Protocol, ProtocolResult
from ..registry import register_protocol


@register_protocol("knn")
class KNN(Protocol):
    """Weighted k-NN top-1 (top-5 beyond 10 classes) on frozen features (Wu et al., 2018)."""

    reads, set_kind, label, headline, order = "features", "classification", "k-NN", ("top1",), 10

    @dataclass
    class Options:
        """DINO's k-NN setting: k = 20, temperature 0.07."""

        k: int = COUNT.field(20)
        temperature: float = POSITIVE.field(0.07)
        standardize: bool = False  # DINO's k-NN uses raw L2-normalised features

    def run(self, subject: Features, data, options, ctx: EvalContext) -> ProtocolResult:
        """Vote with the ``k`` nearest training features of each validation image; the record keeps
        whether each one was right."""
        from ..eval.knn import knn_outcomes  # torch: imported when run, not when the registry is read
        from ..eval.outcomes import percent
        opts = {"k": options.k, "temperature": options.temperature, "standardize_features": options.standardize}
        outcomes = knn_outcomes(subject.train, data.train.label, subject.val, data.val.label, data.num_classes,
                                device=ctx.device, **opts)
        return ProtocolResult(percent(outcomes), opts, per_example=outcomes)
