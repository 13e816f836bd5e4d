"""CAP: captioning as the only pre-training signal (VirTex, Desai & Johnson, 2021; CapPa,
Tschannen et al., 2023, "Image Captioners Are Scalable Vision Learners"). It is MUG's caption
branch without the reconstruction branch: the encoder sees the whole image (``mask_ratio=0``) and
a caption decoder cross-attends to all of its tokens. CapPa's parallel prediction is the option
``parallel_fraction`` (see `CAP`).

This module also holds `CaptioningMixin`, the ``caption`` / ``score_text`` capabilities shared by
every captioning method (``cap``, ``mug``, ``coca``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from mugbench.method import Method, check_range, evaluating
from mugbench.models.global_batch import global_batch_rand
from mugbench.models.text import (CaptionDecoder, caption_log_likelihood, caption_loss, caption_token_count,
                                  generate_captions)
from mugbench.models.vit import masked_encode
from mugbench.registry import register_method

Prefix = Union[str, Sequence[str], torch.Tensor, None]


def encode_tokens(encoder, images: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The encoder's final-norm tokens ``[B, P + K, D]``: every patch when ``mask_ratio`` is 0,
    else the prefix tokens and a random ``1 - mask_ratio`` of the patches (MAE masking)."""
    if mask_ratio == 0:
        # Unshuffled and without drawing random numbers, unlike masked_encode at ratio 0.
        return encoder.forward_features(images)
    return masked_encode(encoder, images, mask_ratio)[0]


def caption_decoder_for(encoder, text, options, mask_token: bool = False) -> CaptionDecoder:
    """A caption decoder over ``encoder``'s tokens sized by the options ``cap_width``, ``cap_layers``
    and ``cap_heads`` (``None`` = the study's text-tower size), as cap and mug declare them;
    ``mask_token`` adds CapPa's mask token for parallel prediction."""
    return CaptionDecoder(text, encoder.embed_dim, width=options.cap_width or text.width,
                          layers=options.cap_layers or text.layers, heads=options.cap_heads or text.heads,
                          mask_token=mask_token)


class CaptioningMixin:
    """``caption`` and ``score_text`` for a method with a caption decoder.

    The method provides ``caption_decoder`` (called as ``decoder(image_tokens, tokens) -> logits``)
    and ``caption_memory(images, mask_ratio=None)`` (the image tokens the decoder attends to;
    ``None`` = the method's own training choice). Methods hold only token ids (their `TextSpec`),
    so text comes in and goes out through the study's tokenizer: ``caption_tokens`` returns ids and
    ``caption`` decodes them with the tokenizer it is given. All three run in eval mode without
    gradients and restore the module's mode afterwards.
    """

    def loss_counts(self, batch: dict) -> dict[str, torch.Tensor]:
        """``caption_tokens``: the tokens the captioning loss averages over (`caption_token_count`), so
        that it is a mean over the global batch's tokens however the batch is split."""
        t = self.text_spec
        return {"caption_tokens": caption_token_count(batch["text"], t.pad_id, t.eot_id)}

    def caption_tokens(self, images: torch.Tensor, prefix: Optional[torch.Tensor] = None,
                       max_len: Optional[int] = None, beam: int = 1,
                       mask_ratio: Optional[float] = None) -> torch.Tensor:
        """Generated caption ids ``[B, L]`` (start token, prefix, continuation, end token, padding);
        ``beam=1`` is greedy. See `generate_captions` for ``prefix`` and ``max_len``."""
        t = self.text_spec
        with evaluating(self), torch.no_grad():
            memory = self.caption_memory(images, mask_ratio)
            return generate_captions(self.caption_decoder, memory, sot_id=t.sot_id, eot_id=t.eot_id,
                                     pad_id=t.pad_id, context_length=t.context_length, prefix=prefix,
                                     max_len=max_len, beam=beam)

    def caption(self, images: torch.Tensor, tokenizer, prefix: Prefix = None, max_len: Optional[int] = None,
                beam: int = 1, mask_ratio: Optional[float] = None) -> list[str]:
        """One generated caption per image, decoded with ``tokenizer`` (the study's `TextTokenizer`).

        ``prefix``: a text every caption continues (or one per image, or token ids); the returned
        strings include it.
        """
        if isinstance(prefix, str):
            prefix = tokenizer([prefix])
        elif prefix is not None and not isinstance(prefix, torch.Tensor):
            prefix = tokenizer(list(prefix))
        ids = self.caption_tokens(images, prefix=prefix, max_len=max_len, beam=beam, mask_ratio=mask_ratio)
        return [tokenizer.decode(row) for row in ids]

    def score_text(self, images: torch.Tensor, text: torch.Tensor, mask_ratio: Optional[float] = None) -> torch.Tensor:
        """Mean per-token log-likelihood of each caption in ``text`` (tokenizer ids) given its image.

        ``text`` holds K captions per image (``K = len(text) / len(images)``, rows ``i*K .. i*K+K-1``
        belong to image ``i``), so scoring many texts encodes each image once; returns ``[B*K]``.
        With a masked latent (``mask_ratio`` > 0) the score depends on the random mask, shared by
        an image's K captions: seed torch for repeatable scores.
        """
        return self.score_text_with_memory(self.scoring_memory(images, mask_ratio), text)

    def scoring_memory(self, images: torch.Tensor, mask_ratio: Optional[float] = None) -> torch.Tensor:
        """The image tokens ``[B, T, D]`` that `score_text_with_memory` scores captions against (a masking
        method draws its masks here): encode a batch once, then score its captions in as many calls as
        memory asks for (generative zero-shot: 7,000 ImageNet prompts per image)."""
        with evaluating(self), torch.no_grad():
            return self.caption_memory(images, mask_ratio)

    def score_text_with_memory(self, memory: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """`score_text` of ``text`` (K captions per row of ``memory``) against image tokens from
        `scoring_memory`; ``[B*K]``."""
        t = self.text_spec
        if len(text) % len(memory):
            raise ValueError(f"{len(text)} captions do not split evenly over {len(memory)} images")
        with evaluating(self), torch.no_grad():
            memory = memory.repeat_interleave(len(text) // len(memory), 0)
            return caption_log_likelihood(self.caption_decoder, memory, text.to(memory.device), t.pad_id, t.eot_id)


@register_method("cap")
class CAP(CaptioningMixin, Method):
    """Captioner: the shared ViT encodes the image, a caption decoder generates its caption.

    ``parallel_fraction`` is CapPa's parallel prediction (Tschannen et al., NeurIPS 2023, "Image
    Captioners Are Scalable Vision Learners Too", Sec. 3): that share of the training captions is
    decoded from mask tokens only, with no causal mask, so every token is predicted at once from
    the image (and the caption's padded length) rather than from the words before it; the rest are
    teacher-forced as usual. The choice is made per caption, as the authors' released code does
    (big_vision ``proj/cappa``: ``masked_pred_prob=0.75``, one draw per example, every input token
    masked); like MAE's masks, draws cover the global batch and each rank keeps its rows
    (`global_batch_rand`), so the choice depends on the seed and step alone, not on the number of
    processes or micro-batches. Generation and scoring
    (``caption``, ``score_text``) and evaluation-mode losses stay autoregressive.

    Default ``parallel_fraction=0``: the MUG paper (Zhao et al., TMLR 2024) has no captioning-only
    baseline; here ``cap`` is MUG's caption branch alone (Algorithm 1's causal, teacher-forced
    decoder) so that ``cap`` against ``mug`` isolates what the reconstruction branch adds, like
    for like. CapPa's recipe is ``--set methods.cap.parallel_fraction=0.75``. At 0 the decoder
    has no mask token and nothing extra is drawn, so runs match those made before the option.
    """

    @dataclass
    class Options:
        """``mask_ratio`` > 0 captions from a masked latent (as MUG does, without reconstruction);
        ``parallel_fraction``: the share of training captions predicted in parallel (CapPa: 0.75);
        the decoder's size (``None`` = the study's text-tower size), as in MUG."""

        mask_ratio: float = 0.0
        parallel_fraction: float = 0.0
        cap_width: Optional[int] = None
        cap_layers: Optional[int] = None
        cap_heads: Optional[int] = None

        def __post_init__(self):
            check_range("cap", "mask_ratio", self.mask_ratio, 0.0, 0.99)
            check_range("cap", "parallel_fraction", self.parallel_fraction, 0.0, 1.0)

    # Text-supervised methods take SLIP's milder crop (as clip does): a tight crop can cut away
    # what the caption describes.
    needs_text = True
    paradigm = "multi-modal generative"

    def __init__(self, encoder, text, options):
        super().__init__(encoder, text, options)
        self.caption_decoder = caption_decoder_for(encoder, text, options, mask_token=options.parallel_fraction > 0)

    def caption_memory(self, images: torch.Tensor, mask_ratio: Optional[float] = None) -> torch.Tensor:
        """Encoder tokens the decoder attends to (``mask_ratio`` default: the training option)."""
        return encode_tokens(self.encoder, images, self.options.mask_ratio if mask_ratio is None else mask_ratio)

    def parallel_rows(self, batch_size: int, device=None) -> torch.Tensor:
        """Which of this rank's ``batch_size`` captions CapPa predicts in parallel, bool ``[B]``:
        each with probability ``parallel_fraction``, cut from one draw for the global batch of the training
        step (`global_batch_rand`), so the choice does not depend on the process count or accumulation."""
        return global_batch_rand(batch_size, device=device) < self.options.parallel_fraction

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """``loss`` = ``caption``, the captioning loss: teacher-forced, or in training a
        ``parallel_fraction`` of the captions predicted in parallel (CapPa)."""
        t, text = self.text_spec, batch["text"]
        memory = self.caption_memory(batch["image"])
        parallel = self.parallel_rows(len(text), memory.device) \
            if self.training and self.options.parallel_fraction > 0 else None
        cap = caption_loss(self.caption_decoder, memory, text, t.pad_id, t.eot_id, parallel=parallel)
        return {"loss": cap, "caption": cap}
