"""Captioning (`mugbench.eval.captioning`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import COUNT
from ..protocol import EvalContext, Protocol, ProtocolResult
from ..registry import register_protocol


@register_protocol("captioning")
class Captioning(Protocol):
    """Generated captions of the val images: CIDEr-D and BLEU against the references, and, for generated
    scenes, how often they name the main object."""

    reads, set_kind, label, headline, order = "method", "captions", "captioning", ("cider",), 70
    transfer, needs = False, ("caption",)

    @dataclass
    class Options:
        """Decoding."""

        beam: int = COUNT.field(1)  # 1 = greedy
        max_len: int = COUNT.field(24)

    def run(self, subject, data, options, ctx: EvalContext) -> ProtocolResult:
        """Caption every val image; the first eight captions go into the record as examples."""
        from ..eval.captioning import caption_images, caption_scores, naming_rates  # torch: imported when run, not when the registry is read
        val = data.val
        captions = caption_images(subject, val.image, ctx.tokenizer, beam=options.beam, max_len=options.max_len,
                                  seed=ctx.seed, device=ctx.device)
        examples = [{"key": k, "generated": c, "reference": r[0] if r else ""}
                    for k, c, r in list(zip(val.key, captions, val.captions))[:8]]
        metrics = caption_scores(captions, val.captions)
        if val.objects and all(val.objects):  # generated scenes know their objects: check the words too
            metrics.update(naming_rates(captions, val.objects))
        return ProtocolResult(metrics, {"beam": options.beam, "max_len": options.max_len, "images": len(val.image)},
                              examples)
