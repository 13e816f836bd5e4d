"""The two reference rows of every study (paradigm ``baseline``): what a protocol gives an encoder for
free, and what the pre-training data teaches it when its class labels are used.

- ``random``: the shared encoder exactly as initialised by the study's seed, never trained. Every
  protocol's score on it is the floor a pre-training method has to clear.
- ``supervised``: the same encoder trained with cross-entropy on the pre-training samples' class labels,
  with the study's budget, optimiser, schedule and base view, like every method. Only where the
  pre-training set has labels (the toy world); elsewhere the study skips it as not applicable.

Both are ordinary registered methods, so the trainer, the harness and the reports treat them like the
others; they differ only in the two declarations `Method.pretrains` and `Method.needs_labels`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mugbench.method import BASELINE, Method, check_range
from mugbench.models.vit import pooled_features
from mugbench.registry import register_method

__all__ = ["RandomInit", "Supervised"]


@register_method("random")
class RandomInit(Method):
    """The shared encoder, not pre-trained: the trainer runs no step, and the study exports and evaluates
    the encoder exactly as `mugbench.models.vit.build_encoder` initialised it for the seed."""

    paradigm = BASELINE
    pretrains = False

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Never called: the ``random`` baseline has no objective (``pretrains`` is False)."""
        raise RuntimeError("The 'random' baseline is never trained (pretrains=False): the study evaluates its "
                           "encoder as initialised, so nothing should call its forward().")


@register_method("supervised")
class Supervised(Method):
    """Cross-entropy on the pre-training labels through a linear head on the pooled encoder output.

    The supervised ViT recipe (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"; Touvron et al.,
    2021, "Training data-efficient image transformers", DeiT) reduced to what the study lets a method
    choose, its objective: a linear classifier on the encoder's pooled features, trained end to end with
    softmax cross-entropy. Everything else is the study's, identical for every method (the like-for-like
    rule): optimiser, schedule, budget and base view. So DeiT's regularisers for 300 ImageNet epochs
    (RandAugment, Mixup / CutMix, random erasing, repeated augmentation, stochastic depth) and its
    distillation token are not kept; label smoothing, part of the loss, is an option, off by default for
    the same reason (DeiT's 0.1 regularises a long, heavily augmented run).
    """

    @dataclass
    class Options:
        """The read-out the head classifies and the loss's label smoothing.

        ``pool="avg"``: the mean of the patch tokens, what the toy study's probes read (``eval.pool``) and
        the global average pooling MAE fine-tunes with; the ViT paper (appendix "Head type and class token")
        finds it as good as the class token given a suitable learning rate. ``token``: the class token,
        ViT's and DeiT's own head input (and what the ``paper`` preset's probes read).
        """

        pool: str = "avg"
        label_smoothing: float = 0.0

        def __post_init__(self):
            if self.pool not in ("avg", "token"):
                raise ValueError(f"supervised.pool={self.pool!r} is not one of 'avg', 'token'")
            check_range("supervised", "label_smoothing", self.label_smoothing, 0.0, 0.5)

    paradigm = BASELINE
    needs_labels = True

    def __init__(self, encoder, text, options):
        super().__init__(encoder, text, options)
        if text.num_classes < 2:
            raise ValueError(f"The 'supervised' baseline needs the pre-training labels' class count, but it was "
                             f"built with num_classes={text.num_classes} (a pre-training set without class "
                             f"labels): the study skips it on such data.")
        self.head = nn.Linear(encoder.embed_dim, text.num_classes)
        # timm's ViT initialisation of its head (used by DeiT): truncated normal, std 0.02, zero bias.
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Cross-entropy of the head's logits on the base view against ``batch["label"]``."""
        labels = batch.get("label")
        if labels is None:
            raise KeyError("the 'supervised' baseline needs batch['label'] (pre-training batches carry it for "
                           "methods that declare needs_labels)")
        logits = self.head(pooled_features(self.encoder, batch["image"], self.options.pool))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.options.label_smoothing)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy}
