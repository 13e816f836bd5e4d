"""Image-text retrieval (`mugbench.eval.retrieval`)."""
from __future__ import annotations

from ..protocol import EvalContext, Protocol, ProtocolResult
from ..registry import register_protocol


@register_protocol("retrieval")
class Retrieval(Protocol):
    """Image<->text Recall@1/5/10 over the val images and all their captions."""

    reads, set_kind, label, headline, order = "method", "captions", "retrieval", ("i2t_r1", "t2i_r1"), 60
    transfer, needs = False, ("encode_text",)

    def run(self, subject, data, options, ctx: EvalContext) -> ProtocolResult:
        """Embed every image and caption, rank by cosine similarity."""
        from ..eval.retrieval import embed_pairs, recall_at_k  # torch: imported when run, not when the registry is read
        image_emb, text_emb, owner = embed_pairs(subject, data.val.image, data.val.captions, ctx.tokenizer,
                                                 device=ctx.device)
        return ProtocolResult(recall_at_k(image_emb, text_emb, owner),
                              {"images": len(image_emb), "texts": len(text_emb)})
