"""SLIP (Mu et al., 2022, "SLIP: Self-supervision meets Language-Image Pre-training"): CLIP's
image-caption contrast plus SimCLR on two further views of the same images, one shared encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mugbench.method import check_range
from mugbench.methods.clip import CLIP
from mugbench.methods.simclr import (SIMCLR_VIEW, ProjectionMLP, check_simclr_options, simclr_features,
                                    simclr_head_loss, two_views)
from mugbench.registry import register_method


@register_method("slip")
class SLIP(CLIP):
    """CLIP on the study's base view plus ssl_scale x SimCLR on two SimCLR-augmented views.

    Everything CLIP has (projection, text tower, learnable temperature, ``encode_image`` /
    ``encode_text`` for zero-shot and retrieval) is inherited; SLIP adds the SimCLR head.
    """

    @dataclass
    class Options:
        """SLIP's defaults: SimCLR loss weight 1.0 at temperature 0.1; CLIP's temperature init 0.07.

        The SimCLR head is 4096 -> 256 in SLIP's ViT-B runs; the defaults (512, 128) match
        `simclr`'s so the two methods' SimCLR branches are identical in a study.
        """

        init_temperature: float = 0.07
        ssl_scale: float = 1.0
        temperature: float = 0.1
        mlp_dim: int = 512
        out_dim: int = 128

        def __post_init__(self):
            check_range("slip", "init_temperature", self.init_temperature, 1e-2, 1.0)  # as clip's
            check_range("slip", "ssl_scale", self.ssl_scale, 0.0, 100.0)
            check_simclr_options("slip", self)

    # View 0 (batch["image"]) is the study's base view, so CLIP and SLIP see the same caption-paired
    # crops; views 1 and 2 are SimCLR's pair, as in SLIP's data loader (image, caption, aug1, aug2).
    extra_views = (SIMCLR_VIEW, SIMCLR_VIEW)

    def __init__(self, encoder, text, options):
        super().__init__(encoder, text, options)
        self.image_mlp = ProjectionMLP(encoder.embed_dim, options.mlp_dim, options.out_dim)

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """CLIP's embeddings of the base view and caption, and the class tokens of the two SimCLR views."""
        return {**super().features(batch), **simclr_features(self.encoder, *two_views(batch, first=1))}

    def loss(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``contrastive + ssl_scale * ssl`` with both parts reported unweighted."""
        out = super().loss(features)
        ssl = simclr_head_loss(self.image_mlp, features["view_a"], features["view_b"], self.options.temperature)
        loss = out["contrastive"] + self.options.ssl_scale * ssl
        return {"loss": loss, "contrastive": out["contrastive"], "ssl": ssl, "logit_scale": out["logit_scale"]}
