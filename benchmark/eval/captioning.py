"""Captioning on the embedded world: does a generated caption name what is in the image?

The toy world knows every image's main object, so a caption can be checked word by word: it
names the right shape when it contains one of that shape's words, the right colour when it
contains the colour's word. BLEU/CIDEr against reference captions is the real-data metric.
"""
from __future__ import annotations

import re

import torch

from ..data.toy import SHAPE_WORDS


def _names(caption: str, words) -> bool:
    """Whether ``caption`` contains any of ``words`` as whole words (case-insensitive)."""
    text = caption.lower()
    return any(re.search(rf"\b{re.escape(w)}\b", text) for w in words)


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
    (MUG) draws its masks from ``seed``, so the captions repeat run to run."""
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(images), batch_size):
            out += method.caption(images[i:i + batch_size].to(device), tokenizer, max_len=max_len, beam=beam)
    return out
