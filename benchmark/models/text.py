"""Text towers from open_clip: the contrastive text encoder and the captioning decoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import MultimodalTransformer, TextTransformer
from torch import nn

from ..method import TextSpec


def build_text_encoder(text: TextSpec) -> TextTransformer:
    """open_clip's causal text transformer, pooled at the end token and projected to ``embed_dim``."""
    return TextTransformer(
        context_length=text.context_length, vocab_size=text.vocab_size, width=text.width,
        heads=text.heads, layers=text.layers, output_dim=text.embed_dim,
        pool_type="eos", eos_id=text.eot_id, pad_id=text.pad_id,
    )


class CaptionDecoder(nn.Module):
    """Autoregressive caption decoder: per layer, causal self-attention over the caption, then
    cross-attention to image tokens (MUG's Algorithm 1; the layers are open_clip's
    ``MultimodalTransformer``, the CoCa decoder)."""

    def __init__(self, text: TextSpec, image_dim: int, width: int, layers: int, heads: int):
        super().__init__()
        self.token_embedding = nn.Embedding(text.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, width))
        self.image_proj = nn.Linear(image_dim, width) if image_dim != width else nn.Identity()
        self.decoder = MultimodalTransformer(width=width, layers=layers, heads=heads,
                                             context_length=text.context_length, output_dim=text.vocab_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        # open_clip leaves the output projection uninitialised until its parent model inits it.
        nn.init.normal_(self.decoder.text_projection, std=width ** -0.5)

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, L, vocab]`` for input ``tokens [B, L]`` given ``image_tokens [B, T, D]``."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        return self.decoder(self.image_proj(image_tokens), x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings are exempt from weight decay."""
        return {"positional_embedding"}


def caption_loss(decoder: CaptionDecoder, image_tokens: torch.Tensor, text: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Teacher-forced captioning loss: predict ``text[:, 1:]`` from ``text[:, :-1]``, padding ignored."""
    logits = decoder(image_tokens, text[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), text[:, 1:], ignore_index=pad_id)
