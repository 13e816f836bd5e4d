"""Captioning on the embedded world: does a generated caption name what is in the image?

The toy world knows every image's main object, so a caption can be checked word by word: it
names the right shape when it contains one of that shape's words, the right colour when it
contains the colour's word. BLEU-4 and CIDEr-D against the reference captions (the COCO
caption scorers of ``pycocoevalcap``, pure Python) are the metrics that carry to real data.
"""
from __future__ import annotations

import re

import torch

from ..data.toy import SHAPE_WORDS
from .sharding import batch_seed, map_batches


def _names(caption: str, words) -> bool:
    """Whether ``caption`` contains any of ``words`` as whole words (case-insensitive)."""
    text = caption.lower()
    return any(re.search(rf"\b{re.escape(w)}\b", text) for w in words)


def caption_tokens_for_scoring(caption: str) -> str:
    """Lower-case words, punctuation dropped: what the COCO scorers expect after their (Java) PTB
    tokenizer, which is not used here. The same function is applied to candidates and references."""
    return " ".join(re.findall(r"[a-z0-9]+", caption.lower()))


def caption_scores(captions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of ``captions[i]`` against ``references[i]``, times 100.

    Uses pycocoevalcap's ``Bleu`` (closest-reference-length brevity penalty) and ``Cider``
    (CIDEr-D: document frequencies from the references, length penalty, clipping), the
    implementations the COCO caption leaderboard uses.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(captions) != len(references):
        raise ValueError(f"{len(captions)} captions but {len(references)} reference lists")
    refs = {i: [caption_tokens_for_scoring(r) for r in rs] for i, rs in enumerate(references) if rs}
    if not refs:
        raise ValueError("no image has a reference caption: BLEU and CIDEr need references")
    cands = {i: [caption_tokens_for_scoring(captions[i])] for i in refs}
    bleu, _ = Bleu(4).compute_score(refs, cands, verbose=0)
    cider, _ = Cider().compute_score(refs, cands)
    return {"bleu4": 100.0 * float(bleu[3]), "cider": 100.0 * float(cider)}


def naming_rates(captions: list[str], objects: list[list[dict]]) -> dict[str, float]:
    """Percent of captions naming the main object's shape, its colour, either, and both.

    ``objects[i]`` is image ``i``'s scene description (main object first), as the toy shards store it.
    """
    shape = [_names(c, SHAPE_WORDS[o[0]["shape"]]) for c, o in zip(captions, objects)]
    colour = [_names(c, (o[0]["colour"],)) for c, o in zip(captions, objects)]
    n = max(1, len(captions))
    return {
        "shape_named": 100.0 * sum(shape) / n,
        "colour_named": 100.0 * sum(colour) / n,
        "shape_or_colour_named": 100.0 * sum(a or b for a, b in zip(shape, colour)) / n,
        "shape_and_colour_named": 100.0 * sum(a and b for a, b in zip(shape, colour)) / n,
    }


@torch.no_grad()
def caption_images(method, images: torch.Tensor, tokenizer, *, beam: int, max_len: int, seed: int,
                   batch_size: int = 100, device="cpu") -> list[str]:
    """Generated captions for ``images``; a method that captions from a randomly masked latent
    (MUG) draws each batch's masks from ``seed`` and the batch's place (`sharding.batch_seed`), so the
    captions repeat run to run and whichever rank of a torchrun job captions the batch."""
    def batch(a: int, b: int) -> list[str]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed(seed, a))
            return method.caption(images[a:b].to(device), tokenizer, max_len=max_len, beam=beam)

    return map_batches(batch, len(images), batch_size, desc="captioning")
