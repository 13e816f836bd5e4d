"""CLIP (Radford et al., 2021): contrast image and caption embeddings with a symmetric InfoNCE."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from mugbench.method import Method, check_range
from mugbench.models.text import build_text_encoder
from mugbench.models.vit import pooled_features
from mugbench.registry import register_method
from mugbench.train.distributed import rank_and_world

# CLIP caps the logit scale at 100 (a temperature of at least 0.01); open_clip clamps the parameter
# (its logarithm) to [0, ln 100] after every optimizer step.
MAX_LOG_LOGIT_SCALE = math.log(100.0)


def clamp_logit_scale(logit_scale: nn.Parameter) -> None:
    """Clamp a log logit-scale parameter in place to [0, ln 100], without recording gradients.

    Called after the optimizer step (open_clip's training loop does the same), never in forward:
    a clamp of the value in forward has a zero gradient once the parameter passes ln 100, and the
    parameter could then never come back.
    """
    with torch.no_grad():
        logit_scale.clamp_(0.0, MAX_LOG_LOGIT_SCALE)


@register_method("clip")
class CLIP(Method):
    """Image tower = the shared ViT's class token + a linear projection; text tower = open_clip's."""

    @dataclass
    class Options:
        """CLIP's learnable temperature starts at 0.07 and is capped at 1/100 (`after_step`)."""

        init_temperature: float = 0.07

        def __post_init__(self):
            # 0.01 .. 1: the initial logit scale lies inside the clamp's range [0, ln 100].
            check_range("clip", "init_temperature", self.init_temperature, 1e-2, 1.0)

    needs_text = True
    paradigm = "multi-modal discriminative"

    def __init__(self, encoder, text, options):
        super().__init__(encoder, text, options)
        self.image_proj = nn.Linear(encoder.embed_dim, text.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=encoder.embed_dim ** -0.5)
        self.text = build_text_encoder(text)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / options.init_temperature)))
        rank, world = rank_and_world()
        # local_loss + gather_with_grad: the memory-lean exact gradient under DDP (open_clip's advice).
        self.contrastive_loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings in the joint space."""
        z = self.image_proj(pooled_features(self.encoder, images, "token"))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Caption embeddings in the joint space."""
        z = self.text(text)
        return F.normalize(z, dim=-1) if normalize else z

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """Normalised image and caption embeddings ``[B, embed_dim]``: each row its own sample's."""
        return {"image": self.encode_image(batch["image"]), "text": self.encode_text(batch["text"])}

    def loss(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CLIP's symmetric InfoNCE at the learned scale (kept at most 100 by `after_step`), every rank's
        rows the negatives of every other's."""
        scale = self.logit_scale.exp()
        loss = self.contrastive_loss(features["image"], features["text"], scale)
        return {"loss": loss, "contrastive": loss, "logit_scale": scale.detach()}

    def after_step(self) -> None:
        """Keep the logit scale in [1, 100] (open_clip's clamp of the parameter after each step)."""
        clamp_logit_scale(self.logit_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"logit_scale"}
