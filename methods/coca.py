"""CoCa (Yu et al., 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models"):
a CLIP-style contrastive loss between image and text embeddings plus a captioning loss from a
multimodal decoder that reads the unimodal text features and cross-attends to the image.

CoCa's task-specific attentional poolers sit on the encoder's tokens (the paper's "attentional
poolers": ``n_query = 1`` for the contrastive embedding, 256 for the decoder's memory), laid out as
open_clip's ``VisionTransformer(attentional_pool="parallel")``: the final norm, then both
``AttentionalPooler``s read the same tokens, and the single pooled query is projected. (open_clip's
released CoCa configs use one 256-query pooler whose first output is the contrastive token, which
its code notes does not match the paper.) The
poolers, the text side, its wiring and the contrastive loss are open_clip's (``AttentionalPooler``,
``TextTransformer`` with ``embed_cls``, ``MultimodalTransformer``, ``ClipLoss`` with its distributed
gather); the caption term is ``CoCaLoss``'s token-mean cross-entropy, taken over the global batch's
tokens. The image tower is the shared ViT, as for every method of a study.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.transformer import AttentionalPooler
from torch import nn

from mugbench.method import Method, check_range
from mugbench.methods.cap import CaptioningMixin, encode_tokens
from mugbench.methods.clip import clamp_logit_scale
from mugbench.models.global_batch import global_mean
from mugbench.models.text import CoCaTextDecoder, caption_targets, full_context, token_nll
from mugbench.registry import register_method
from mugbench.train.distributed import rank_and_world

# "coca": CoCa's two attentional poolers (the default); "token": the raw-tokens approximation
# (the class token as the contrastive embedding, the decoder on every encoder token), kept only to
# measure what the poolers change.
IMAGE_POOLS = ("coca", "token")


@register_method("coca")
class CoCa(CaptioningMixin, Method):
    """Contrastive captioner: CLIP's contrastive loss plus captions decoded from the pooled image.

    With ``image_pool="coca"``: image embedding = the projected output of a one-query attentional
    pooler; the multimodal decoder attends to the ``attn_queries`` outputs of a second pooler (text
    width). Text embedding = the unimodal text tower's appended class token. With
    ``image_pool="token"``: the projected class token, and the decoder reads the raw tokens."""

    @dataclass
    class Options:
        """CoCa's loss weights (caption 2.0, contrastive 1.0, the paper's), CLIP's initial
        temperature 0.07, the image pooling (``coca``: CoCa's attentional poolers, ``attn_queries``
        queries for the decoder (256 in the paper and open_clip's CoCa configs) and one for the
        contrastive embedding; ``token``: no poolers, the raw-tokens approximation) and the
        multimodal decoder's depth/heads (``None`` = the study's text-tower size; its width is the
        text tower's, whose token features it reads)."""

        caption_loss_weight: float = 2.0
        clip_loss_weight: float = 1.0
        init_temperature: float = 0.07
        image_pool: str = "coca"
        attn_queries: int = 256
        cap_layers: Optional[int] = None
        cap_heads: Optional[int] = None

        def __post_init__(self):
            check_range("coca", "caption_loss_weight", self.caption_loss_weight, 0.0, 100.0)
            check_range("coca", "clip_loss_weight", self.clip_loss_weight, 0.0, 100.0)
            check_range("coca", "init_temperature", self.init_temperature, 1e-2, 1.0)  # as clip's
            check_range("coca", "attn_queries", self.attn_queries, 1, 4096)
            if self.caption_loss_weight == 0 and self.clip_loss_weight == 0:
                raise ValueError("coca: caption_loss_weight and clip_loss_weight cannot both be 0")
            if self.image_pool not in IMAGE_POOLS:
                raise ValueError(f"coca.image_pool={self.image_pool!r} is not one of {', '.join(IMAGE_POOLS)}")

    needs_text = True
    paradigm = "multi-modal generative"

    def __init__(self, encoder, text, options):
        super().__init__(encoder, text, options)
        d = encoder.embed_dim
        pooled = options.image_pool == "coca"
        # open_clip's poolers output the decoder's width (its CoCa: embed_dim = multimodal width), so
        # the decoder reads them as they are; their keys and values are the encoder's tokens.
        self.attn_pool = AttentionalPooler(text.width, d, n_head=text.heads, n_queries=options.attn_queries) \
            if pooled else None
        self.attn_pool_contrastive = AttentionalPooler(text.width, d, n_head=text.heads, n_queries=1) \
            if pooled else None
        pooled_dim = text.width if pooled else d
        self.image_proj = nn.Linear(pooled_dim, text.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=pooled_dim ** -0.5)
        self.caption_decoder = CoCaTextDecoder(text, pooled_dim, layers=options.cap_layers or text.layers,
                                               heads=options.cap_heads or text.heads)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / options.init_temperature)))
        rank, world = rank_and_world()
        # local_loss + gather_with_grad: the memory-lean exact gradient under DDP (open_clip's advice).
        self.contrastive_loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)

    def _image_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised joint-space embedding ``[B, embed_dim]`` from the encoder's tokens ``[B, T, D]``."""
        pooled = tokens[:, 0] if self.attn_pool_contrastive is None else self.attn_pool_contrastive(tokens)[:, 0]
        return self.image_proj(pooled)

    def _decoder_memory(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the multimodal decoder attends to: ``[B, attn_queries, text width]`` pooled from the
        encoder's tokens ``[B, T, D]``, or the tokens themselves with ``image_pool="token"``."""
        return tokens if self.attn_pool is None else self.attn_pool(tokens)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings in the joint space."""
        z = self._image_embedding(self.encoder.forward_features(images))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Caption embeddings in the joint space (the unimodal tower's class token)."""
        z = self.caption_decoder.encode(text)[0]
        return F.normalize(z, dim=-1) if normalize else z

    def caption_memory(self, images: torch.Tensor, mask_ratio: Optional[float] = None) -> torch.Tensor:
        """The decoder's memory (`_decoder_memory`) from every token of the whole image unless asked
        to mask (``mask_ratio``)."""
        return self._decoder_memory(encode_tokens(self.encoder, images, mask_ratio or 0.0))

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per row: the normalised image and caption embeddings, and the caption's summed token
        cross-entropy from the multimodal decoder with its token count (`caption_nll`)."""
        images, t = batch["image"], self.text_spec
        text = full_context(batch["text"], t)  # the class token's slot follows the padding: keep it fixed
        tokens = self.encoder.forward_features(images)
        text_emb, text_features = self.caption_decoder.encode(text)
        # The tower is causal: the features of text[:, :-1] are the first L-1 of text's (open_clip's CoCa).
        logits = self.caption_decoder.decode(self._decoder_memory(tokens), text_features[:, :-1])
        nll, count = token_nll(logits, caption_targets(text, t.pad_id, t.eot_id), t.pad_id)
        return {"image": F.normalize(self._image_embedding(tokens), dim=-1), "text": F.normalize(text_emb, dim=-1),
                "caption_nll": nll, "caption_tokens": count}

    def loss(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``loss`` = clip_loss_weight * ``contrastive`` + caption_loss_weight * ``caption`` (CoCa's
        weighting, as open_clip's ``CoCaLoss``): CLIP's InfoNCE over every rank's rows, and the mean token
        cross-entropy over the global batch's caption tokens."""
        o = self.options
        scale = self.logit_scale.exp()  # at most 100: after_step clamps the parameter
        caption = global_mean(features["caption_nll"].sum(), "caption_tokens", features["caption_tokens"].sum())
        # A part with weight 0 is not computed (as CoCaLoss skips it) and is logged as 0; parts are logged
        # unweighted, comparable with clip's and mug's.
        contrastive = self.contrastive_loss(features["image"], features["text"], scale) if o.clip_loss_weight \
            else scale.new_zeros(())
        return {"loss": o.clip_loss_weight * contrastive + o.caption_loss_weight * caption,
                "contrastive": contrastive, "caption": caption, "logit_scale": scale.detach()}

    def after_step(self) -> None:
        """Keep the logit scale in [1, 100] (open_clip's clamp of the parameter after each step)."""
        clamp_logit_scale(self.logit_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The base set plus the temperature and the attentional poolers' queries (learned tokens)."""
        extra = {"attn_pool.query", "attn_pool_contrastive.query"} if self.attn_pool is not None else set()
        return super().no_weight_decay() | {"logit_scale"} | extra
