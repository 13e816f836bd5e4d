"""Text towers from open_clip (the contrastive text encoder, the caption decoders) and the
caption machinery every captioning method shares: the teacher-forced loss, per-caption
log-likelihood (for ``score_text``) and batched greedy / beam-search generation.

A caption decoder here is any module called as ``decoder(image_tokens [B, T, D], tokens [B, L])``
that returns next-token logits ``[B, L, vocab]`` (position ``i`` predicts token ``i + 1``).
`CaptionDecoder` (MUG, CAP) and `CoCaTextDecoder` (CoCa) both are.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.transformer import MultimodalTransformer, TextTransformer
from torch import nn

from ..method import TextSpec, evaluating
from .global_batch import global_mean


class CausalTextEncoder(TextTransformer):
    """open_clip's ``TextTransformer`` that also takes captions shorter than its context.

    The pipeline trims a batch's trailing padding (`mugbench.data.tokenizer.trim_padding`): for a
    causal tower pooled at the end token that changes nothing but the cost. open_clip slices its
    causal mask only when it adds a padding mask, so it is sliced here for the plain case.
    """

    def _embeds(self, text: torch.Tensor):
        x, attn_mask = super()._embeds(text)
        if attn_mask is not None and attn_mask.ndim == 2:
            attn_mask = attn_mask[: x.shape[1], : x.shape[1]]
        return x, attn_mask


def full_context(text: torch.Tensor, spec: TextSpec) -> torch.Tensor:
    """``text`` padded back to the full context: for towers whose output depends on the padded
    length (CoCa appends its class token after the padding, at a position-embedding slot)."""
    return F.pad(text, (0, spec.context_length - text.shape[1]), value=spec.pad_id)


def build_text_encoder(text: TextSpec) -> TextTransformer:
    """open_clip's causal text transformer, pooled at the end token and projected to ``embed_dim``."""
    return CausalTextEncoder(
        context_length=text.context_length, vocab_size=text.vocab_size, width=text.width,
        heads=text.heads, layers=text.layers, output_dim=text.embed_dim,
        pool_type="eos", eos_id=text.eot_id, pad_id=text.pad_id,
    )


class CaptionDecoder(nn.Module):
    """Autoregressive caption decoder: per layer, causal self-attention over the caption, then
    cross-attention to image tokens (MUG's Algorithm 1; the layers are open_clip's
    ``MultimodalTransformer``, the CoCa decoder).

    ``mask_token=True`` adds a learned mask-token embedding for CapPa's parallel prediction
    (Tschannen et al., 2023): rows marked in ``forward``'s ``parallel`` read only mask tokens
    and attend to every position. Without it the decoder has exactly MUG's parameters.
    """

    def __init__(self, text: TextSpec, image_dim: int, width: int, layers: int, heads: int,
                 mask_token: bool = False):
        super().__init__()
        self.token_embedding = nn.Embedding(text.vocab_size, width)
        # CapPa's extra vocabulary entry, as its own parameter: the vocabulary stays the tokenizer's.
        self.mask_embedding = nn.Parameter(torch.empty(width)) if mask_token else None
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, width))
        self.image_proj = nn.Linear(image_dim, width) if image_dim != width else nn.Identity()
        self.decoder = MultimodalTransformer(width=width, layers=layers, heads=heads,
                                             context_length=text.context_length, output_dim=text.vocab_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.mask_embedding is not None:
            nn.init.normal_(self.mask_embedding, std=0.02)  # as the token embeddings
        # open_clip leaves the output projection uninitialised until its parent model inits it.
        nn.init.normal_(self.decoder.text_projection, std=width ** -0.5)

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor,
                parallel: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Next-token logits ``[B, L, vocab]`` for input ``tokens [B, L]`` given ``image_tokens [B, T, D]``.

        ``parallel`` (bool ``[B]``, needs ``mask_token``): those rows are CapPa's parallel
        prediction, every input a mask token and no causal mask, so position ``i`` predicts token
        ``i + 1`` from the image and the caption's length alone; the other rows decode as usual.
        """
        x = self.token_embedding(tokens)
        if parallel is not None:
            if self.mask_embedding is None:
                raise ValueError("parallel prediction needs a CaptionDecoder built with mask_token=True")
            # Both embeddings stay in the graph whichever rows are parallel: DDP expects every
            # parameter to receive a gradient on every rank at every step.
            x = torch.where(parallel[:, None, None], self.mask_embedding.to(x.dtype), x)
        x = x + self.positional_embedding[: tokens.shape[1]]
        memory = self.image_proj(image_tokens)
        if parallel is None:
            return self.decoder(memory, x)
        rows = (~parallel).nonzero()[:, 0], parallel.nonzero()[:, 0]
        logits = []
        for causal, idx in zip((True, False), rows):
            if len(idx):
                with contextlib.nullcontext() if causal else _bidirectional(self.decoder):
                    logits.append((idx, self.decoder(memory[idx], x[idx])))
        order = torch.cat([idx for idx, _ in logits])
        return torch.cat([out for _, out in logits])[order.argsort()]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings are exempt from weight decay."""
        return {"positional_embedding"}


@contextlib.contextmanager
def _bidirectional(transformer: MultimodalTransformer):
    """Run open_clip's ``MultimodalTransformer`` without its causal self-attention mask.

    Its forward always applies the buffer ``attn_mask`` (an additive ``-inf`` upper triangle);
    an all-zero mask of the same shape lets every position attend to every other. The causal
    buffer is restored on exit, also after an error.
    """
    causal = transformer.attn_mask
    transformer.attn_mask = torch.zeros_like(causal)
    try:
        yield transformer
    finally:
        transformer.attn_mask = causal


class CoCaTextDecoder(nn.Module):
    """CoCa's text side (Yu et al., 2022, "CoCa: Contrastive Captioners are Image-Text Foundation
    Models"): a unimodal causal text encoder whose appended class embedding is the contrastive
    text embedding, and a multimodal decoder that reads the unimodal token features and
    cross-attends to image tokens. The parts and their wiring are open_clip's (``TextTransformer``
    with ``embed_cls``, ``MultimodalTransformer``), as in its ``CoCa`` model.

    Called as a caption decoder, ``forward(image_tokens, tokens)`` runs both halves.
    """

    def __init__(self, text: TextSpec, image_dim: int, layers: int, heads: int):
        super().__init__()
        # correct_cls_mask: the appended class token may attend to every non-pad token; open_clip
        # keeps the older, misplaced mask only for its released CoCa weights.
        self.text = TextTransformer(
            context_length=text.context_length, vocab_size=text.vocab_size, width=text.width,
            heads=text.heads, layers=text.layers, output_dim=text.embed_dim, embed_cls=True,
            output_tokens=True, correct_cls_mask=True, pad_id=text.pad_id,
        )
        # The decoder consumes the text tower's token features directly, so it has its width.
        self.image_proj = nn.Linear(image_dim, text.width) if image_dim != text.width else nn.Identity()
        self.decoder = MultimodalTransformer(width=text.width, layers=layers, heads=heads,
                                             context_length=text.context_length, output_dim=text.vocab_size)
        nn.init.normal_(self.decoder.text_projection, std=text.width ** -0.5)

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text embedding [B, embed_dim] (unnormalised), token features [B, L, width])``."""
        return self.text(tokens)

    def decode(self, image_tokens: torch.Tensor, token_features: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, L, vocab]`` from the unimodal token features."""
        return self.decoder(self.image_proj(image_tokens), token_features)

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, L, vocab]`` for ``tokens [B, L]`` given ``image_tokens [B, T, D]``.

        The text tower is causal, so the features of ``tokens`` equal those of any longer text
        that starts with them: teacher forcing, scoring and generation see the same logits.
        """
        return self.decode(image_tokens, self.encode(tokens)[1])


def caption_targets(text: torch.Tensor, pad_id: int, eot_id: Optional[int] = None) -> torch.Tensor:
    """Teacher-forcing labels ``text[:, 1:]`` with every position not to be predicted set to ``pad_id``.

    Padding is never predicted; with ``eot_id`` neither is anything after a row's first end token,
    so whatever follows the end of a caption cannot change its loss or its score.
    """
    labels = text[:, 1:].clone()
    if eot_id is not None:
        is_end = (labels == eot_id).long()
        labels[(is_end.cumsum(1) - is_end) > 0] = pad_id  # strictly after the first end token
    return labels


def caption_nll(decoder: nn.Module, image_tokens: torch.Tensor, text: torch.Tensor, pad_id: int,
                eot_id: Optional[int] = None, parallel: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced captioning: per caption, the summed cross-entropy of predicting ``text[:, 1:]`` from
    ``text[:, :-1]`` over the positions `caption_targets` keeps, and how many positions that is (``[B]``
    each). Sums, not means, so a loss can divide by the token count of a whole global batch
    (`mugbench.models.global_batch.global_mean`).

    ``parallel`` (bool ``[B]``, for a `CaptionDecoder` with a mask token): those captions are
    predicted in parallel from mask tokens (CapPa).
    """
    logits = decoder(image_tokens, text[:, :-1]) if parallel is None else \
        decoder(image_tokens, text[:, :-1], parallel=parallel)
    return token_nll(logits, caption_targets(text, pad_id, eot_id), pad_id)


def token_nll(logits: torch.Tensor, labels: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits [B, L, V]``: the summed cross-entropy at ``labels [B, L]`` (positions holding
    ``pad_id`` ignored) and how many positions count, ``[B]`` each."""
    per_token = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=pad_id, reduction="none")
    return per_token.sum(1), (labels != pad_id).sum(1)


def caption_token_count(text: torch.Tensor, pad_id: int, eot_id: Optional[int] = None) -> torch.Tensor:
    """The number of positions `caption_nll` predicts in ``text`` (a 0-d tensor), from the tokens alone:
    what a captioning method declares in ``loss_counts`` so that its loss is a mean over the global batch."""
    return (caption_targets(text, pad_id, eot_id) != pad_id).sum()


def caption_loss(decoder: nn.Module, image_tokens: torch.Tensor, text: torch.Tensor, pad_id: int,
                 eot_id: Optional[int] = None, parallel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The mean of `caption_nll` over every kept token of the batch (padding ignored): within a training
    step, over the step's global batch (`global_mean` of the ``caption_tokens`` count)."""
    nll, count = caption_nll(decoder, image_tokens, text, pad_id, eot_id, parallel)
    return global_mean(nll.sum(), "caption_tokens", count.sum())


def caption_log_likelihood(decoder: nn.Module, image_tokens: torch.Tensor, text: torch.Tensor, pad_id: int,
                           eot_id: Optional[int] = None) -> torch.Tensor:
    """Mean per-token log-likelihood of each caption given its image, ``[B]``.

    The same positions as `caption_loss` count (the end token included, the start token and
    padding not), so for one sample ``-caption_log_likelihood`` is its caption loss. Mean rather
    than sum, so that captions of different lengths compare (generative zero-shot scoring).
    """
    labels = caption_targets(text, pad_id, eot_id)
    logits = decoder(image_tokens, text[:, :-1]).float()
    # log_softmax at the label, as the label's logit minus the log normaliser (logsumexp): no [B, L, V]
    # log-probabilities beside the logits, which dominate the memory of scoring many captions (generative
    # zero-shot). Without a gradient to keep, the normaliser is computed in the logits' own memory.
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if logits.requires_grad:
        norm = logits.logsumexp(-1)
    else:
        peak = logits.amax(-1, keepdim=True)
        norm = logits.sub_(peak).exp_().sum(-1).log_().add_(peak.squeeze(-1))
    picked = picked - norm
    valid = (labels != pad_id).to(picked.dtype)
    return (picked * valid).sum(1) / valid.sum(1).clamp(min=1)


@torch.no_grad()
def generate_captions(decoder: nn.Module, image_tokens: torch.Tensor, *, sot_id: int, eot_id: int, pad_id: int,
                      context_length: int, prefix: Optional[torch.Tensor] = None, max_len: Optional[int] = None,
                      beam: int = 1) -> torch.Tensor:
    """Generate one caption per image, batched, with the decoder in eval mode and no gradients.

    ``beam=1`` is greedy decoding; ``beam>1`` is beam search ranked by the length-normalised
    log-probability (the mean log-probability of the generated tokens, end token included), so
    longer captions are not penalised merely for having more terms. A caption stops at its end
    token. ``prefix`` (token ids in the tokenizer's layout, ``[P]`` for every image or ``[B, P]``;
    a leading start token and anything from the first end/pad token on are dropped) is forced
    before the model continues; forced tokens do not count in the score. ``max_len`` bounds the
    generated tokens after the prefix (default: up to ``context_length``, the position limit);
    a caption cut by it has no end token.

    Returns ids ``[B, L]`` in the tokenizer's layout: start token, prefix, generated tokens, end
    token, then ``pad_id``; ``L`` is the longest caption's length.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    b, device = image_tokens.shape[0], image_tokens.device
    forced, n_forced = _forced_prefix(prefix, b, sot_id, eot_id, pad_id, context_length - 1, device)
    room = context_length - 1 - n_forced  # positions left after the start token and the prefix
    if (room < 1).any():
        raise ValueError(f"a prefix of {int(n_forced.max())} tokens leaves no room in a context of {context_length}")
    budget = room if max_len is None else room.clamp(max=max_len)
    limit = 1 + n_forced + budget  # per caption: one past the last position it may fill
    with evaluating(decoder):
        if beam == 1:
            seq = _greedy(decoder, image_tokens, forced, n_forced, limit, sot_id, eot_id, pad_id)
        else:
            seq = _beam_search(decoder, image_tokens, forced, n_forced, limit, sot_id, eot_id, pad_id, beam)
    filled = (seq != pad_id).any(0).nonzero()
    return seq[:, : int(filled.max()) + 1]


def _forced_prefix(prefix, b: int, sot_id: int, eot_id: int, pad_id: int, width: int,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix ids as ``[B, width]`` (padded) and each row's prefix length ``[B]``."""
    forced = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    if prefix is None:
        return forced, lengths
    rows = torch.as_tensor(prefix, dtype=torch.long)
    rows = rows.unsqueeze(0) if rows.ndim == 1 else rows
    if rows.shape[0] == 1:
        rows = rows.expand(b, -1)
    if rows.ndim != 2 or rows.shape[0] != b:
        raise ValueError(f"prefix must be [P] or [{b}, P] token ids, got shape {tuple(rows.shape)}")
    for i, row in enumerate(rows.tolist()):
        row = row[1:] if row and row[0] == sot_id else row
        cut = [j for j, t in enumerate(row) if t in (eot_id, pad_id)]
        row = row[: cut[0]] if cut else row
        if len(row) >= width:
            raise ValueError(f"a prefix of {len(row)} tokens leaves no room in a context of {width + 1}")
        forced[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths[i] = len(row)
    return forced, lengths


def _never_generated(scores: torch.Tensor, sot_id: int, pad_id: int) -> torch.Tensor:
    """``scores [N, vocab]`` with the start and pad tokens ruled out: neither may follow the start
    of a caption (a generated pad would read as a premature end). The other tokens keep their
    log-probabilities unrenormalised, so beam scores stay the model's own."""
    scores = scores.clone()
    scores[:, [sot_id, pad_id]] = float("-inf")
    return scores


def _greedy(decoder, image_tokens, forced, n_forced, limit, sot_id, eot_id, pad_id) -> torch.Tensor:
    """Pick the most likely next token until every caption has ended or reached its limit."""
    b = image_tokens.shape[0]
    seq = torch.full((b, 1), sot_id, dtype=torch.long, device=image_tokens.device)
    done = torch.zeros(b, dtype=torch.bool, device=seq.device)
    for t in range(1, int(limit.max())):
        token = _never_generated(decoder(image_tokens, seq)[:, -1], sot_id, pad_id).argmax(-1)
        token = torch.where(t <= n_forced, forced[:, t - 1], token)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        seq = torch.cat([seq, token[:, None]], dim=1)
        done = done | (token == eot_id) | (t + 1 >= limit)
        if done.all():
            break
    return seq


def _beam_search(decoder, image_tokens, forced, n_forced, limit, sot_id, eot_id, pad_id, k: int) -> torch.Tensor:
    """Keep the ``k`` hypotheses with the best mean log-probability per image; return the best."""
    b, device = image_tokens.shape[0], image_tokens.device
    images = image_tokens.repeat_interleave(k, dim=0)
    seq = torch.full((b * k, 1), sot_id, dtype=torch.long, device=device)
    total = torch.zeros(b, k, device=device)  # summed log-probability of the free (non-forced) tokens
    total[:, 1:] = float("-inf")  # the k start copies are identical: let only one of them expand
    count = torch.zeros(b, k, device=device)  # free tokens so far (the end token included)
    done = torch.zeros(b, k, dtype=torch.bool, device=device)
    own = torch.arange(k, device=device).expand(b, k)
    for t in range(1, int(limit.max())):
        logp = _never_generated(decoder(images, seq)[:, -1].float().log_softmax(-1), sot_id, pad_id).view(b, k, -1)
        vocab = logp.shape[-1]
        cand_total = total[..., None] + logp
        cand_count = (count + 1)[..., None].expand(-1, -1, vocab)
        # A finished hypothesis has one continuation, padding, at its unchanged score.
        finished = torch.full_like(cand_total, float("-inf"))
        finished[..., pad_id] = total
        cand_total = torch.where(done[..., None], finished, cand_total)
        cand_count = torch.where(done[..., None], count[..., None].expand(-1, -1, vocab), cand_count)
        idx = (cand_total / cand_count.clamp(min=1)).view(b, -1).topk(k, dim=1).indices
        parent, token = idx // vocab, idx % vocab
        new_total, new_count = cand_total.view(b, -1).gather(1, idx), cand_count.reshape(b, -1).gather(1, idx)
        # Inside its prefix a caption is forced: every hypothesis takes the prefix token, unscored.
        now_forced = (t <= n_forced)[:, None]
        parent = torch.where(now_forced, own, parent)
        token = torch.where(now_forced, forced[:, t - 1 : t].expand(-1, k), token)
        total = torch.where(now_forced, total, new_total)
        count = torch.where(now_forced, count, new_count)
        seq = seq.view(b, k, -1).gather(1, parent[..., None].expand(-1, -1, seq.shape[1]))
        done = done.gather(1, parent)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        seq = torch.cat([seq, token[..., None]], dim=-1).view(b * k, -1)
        done = done | (token == eot_id) | (t + 1 >= limit)[:, None]
        if done.all():
            break
    best = (total / count.clamp(min=1)).argmax(1)
    return seq.view(b, k, -1)[torch.arange(b, device=device), best]
