"""CLIP (Radford et al., 2021): contrast image and caption embeddings with a symmetric InfoNCE."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from mugbench.data.transforms import ViewSpec
from mugbench.method import Method, check_range
from mugbench.models.text import build_text_encoder
from mugbench.models.vit import pooled_features
from mugbench.registry import register_method
from mugbench.train.distributed import rank_and_world


@register_method("clip")
class CLIP(Method):
    """Image tower = the shared ViT's class token + a linear projection; text tower = open_clip's."""

    @dataclass
    class Options:
        """CLIP's learnable temperature starts at 0.07 and is capped at 1/100."""

        init_temperature: float = 0.07

        def __post_init__(self):
            check_range("clip", "init_temperature", self.init_temperature, 1e-3, 1.0)

    # SLIP's CLIP crop for ViTs on web image-text data, and no flip: captions say "left" and "right".
    views = (ViewSpec(scale=(0.5, 1.0), hflip=False),)
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

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        scale = self.logit_scale.exp().clamp(max=100.0)
        loss = self.contrastive_loss(self.encode_image(batch["image"]), self.encode_text(batch["text"]), scale)
        return {"loss": loss, "contrastive": loss, "logit_scale": scale.detach()}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"logit_scale"}
