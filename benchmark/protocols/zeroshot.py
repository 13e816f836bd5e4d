"""Zero-shot classification from text (`mugbench.eval.zeroshot`): no labelled training images."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import COUNT, COUNT0
from ..protocol import EvalContext, Protocol, ProtocolResult
from ..registry import register_protocol


@register_protocol("zeroshot")
class ZeroShot(Protocol):
    """Top-1 from prompt embeddings (a text tower) or from caption likelihood of the prompts (a captioner)."""

    reads, set_kind, label, headline, order = "method", "classification", "zero-shot", ("top1",), 50
    transfer, needs = False, ("encode_text", "score_text")

    @dataclass
    class Options:
        """How many validation images are scored; the memory one likelihood-scoring call may take."""

        images: int = COUNT0.field(0)  # 0 = all; likelihood scoring costs classes x prompts per image
        # MB one decoder call of likelihood scoring (captioners) may use: it sets how many (image, prompt)
        # sequences a call scores (`mugbench.eval.zeroshot.sequences_per_call`), so any class count fits. The scores
        # do not depend on it while it holds one prompt for each image of an eval.batch_size batch.
        max_memory_mb: int = COUNT.field(1024)

    def run(self, subject, data, options, ctx: EvalContext) -> ProtocolResult:
        """Score every class's prompts (the set's own templates) for the first ``images`` val images;
        the record keeps whether each scored image was right."""
        from ..eval.outcomes import percent, topk_outcomes  # torch: imported when run, not when the registry is read
        from ..eval.zeroshot import embedding_scores, likelihood_scores  # torch: imported when run, not when the registry is read
        val, templates = data.val, data.prompts
        n = min(options.images or len(val.image), len(val.image))
        # A lazy ImageFolder split stays lazy when whole (slicing it would load every image at once).
        images = val.image if n == len(val.image) else val.image[:n]
        words = data.prompt_words()
        if callable(getattr(subject, "encode_text", None)):
            mode = "embedding"
            scores = embedding_scores(subject, images, words, templates, ctx.tokenizer, batch_size=ctx.batch_size,
                                      device=ctx.device)
        else:
            mode = "likelihood"
            scores = likelihood_scores(subject, images, words, templates, ctx.tokenizer, seed=ctx.seed,
                                       batch_size=ctx.batch_size, max_memory_mb=options.max_memory_mb,
                                       device=ctx.device)
        outcomes = topk_outcomes(scores, val.label[:n])  # per scored image, in the val split's order
        kept = {"mode": mode, "prompts": list(templates), "images": len(images)}
        if mode == "likelihood":  # it sets the image batch, and with it a masking method's masks, when it is small
            kept["max_memory_mb"] = options.max_memory_mb
        return ProtocolResult(percent(outcomes), kept, per_example=outcomes)
