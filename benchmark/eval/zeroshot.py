"""Zero-shot classification from text: no labelled training images.

Methods with a text tower compare image embeddings with the mean embedding of a class's prompts
(CLIP's prompt ensembling, Radford et al., 2021). Captioners score each class's prompts under the
caption decoder and pick the class whose prompts are most likely (generative zero-shot, as in
CapPa, Tschannen et al., 2023). The prompt templates and class words belong to the evaluation set
(`ClassificationSet.prompts`, ``class_names``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..method import evaluating
from .outcomes import percent, topk_outcomes


@torch.no_grad()
def embedding_scores(method, images: torch.Tensor, classes: list[str], templates, tokenizer, *,
                     batch_size: int = 256, device="cpu") -> torch.Tensor:
    """Cosine similarity ``[N, C]`` of each image with each class's ensembled prompt embedding."""
    with evaluating(method):
        weights = []
        for name in classes:
            z = method.encode_text(tokenizer([t.format(name) for t in templates]).to(device))
            weights.append(F.normalize(z.mean(0), dim=-1))
        weights = torch.stack(weights)
        feats = torch.cat([method.encode_image(images[i:i + batch_size].to(device))
                           for i in range(0, len(images), batch_size)])
    return feats.float().cpu() @ weights.float().cpu().T


@torch.no_grad()
def likelihood_scores(method, images: torch.Tensor, classes: list[str], templates, tokenizer, *,
                      seed: int, batch_size: int = 100, device="cpu") -> torch.Tensor:
    """Mean log-likelihood ``[N, C]`` of each class's prompts given each image (averaged over
    prompts). A method that captions from a randomly masked latent draws its masks from ``seed``."""
    prompts = tokenizer([t.format(name) for name in classes for t in templates]).to(device)
    n_prompts = len(templates)
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            b = len(x)
            # Every (image, prompt) pair in one call; the method encodes each image once.
            scores = method.score_text(x, prompts.repeat(b, 1))
            rows.append(scores.view(b, len(classes), n_prompts).mean(-1).cpu())
    return torch.cat(rows)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 (and, with more than 10 classes, top-5) accuracy in percent: the mean of `topk_outcomes`."""
    return percent(topk_outcomes(scores, labels))
