"""Captioning: loss fidelity of the caption, MUG and CoCa losses against derivations written out
here by hand (and CoCa against open_clip's own CoCa model), CoCa's attentional poolers, caption
generation (greedy and beam search), caption scoring, MAE/MUG
reconstructions and MUG's choice of latent. Everything runs on tiny tensors in seconds.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.coca_model import CoCa as OpenClipCoCa
from open_clip.loss import CoCaLoss
from torch import nn

from mugbench.method import MethodOptionError
from mugbench.models.text import (
    CaptionDecoder, caption_log_likelihood, caption_loss, caption_targets, full_context, generate_captions,
)
from mugbench.models.vit import build_encoder, masked_encode
from mugbench.registry import get_method

from conftest import make_batch


def _build(name: str, cfg, spec, **options):
    """``name`` on the smoke encoder with the smoke preset's options updated by ``options``."""
    encoder = build_encoder(cfg.encoder, seed=cfg.seed)
    torch.manual_seed(cfg.seed + 1)
    return get_method(name).build(encoder, spec, {**(cfg.methods.get(name) or {}), **options})


def _nll_by_hand(logits: torch.Tensor, text: torch.Tensor, pad_id: int, eot_id: int) -> tuple[torch.Tensor, list]:
    """Mean negative log-likelihood of token ``i + 1`` under the logits at position ``i``, over every
    target up to and including the first end token; also each caption's own mean."""
    total, count, per_caption = 0.0, 0, []
    for b in range(text.shape[0]):
        own, n = 0.0, 0
        for i in range(text.shape[1] - 1):
            target = int(text[b, i + 1])
            if target == pad_id:
                continue
            row = logits[b, i].double()
            own = own - (row[target] - torch.logsumexp(row, dim=0))
            n += 1
            if target == eot_id:
                break
        total, count = total + own, count + n
        per_caption.append(own / n)
    return total / count, per_caption


def _captions(spec, lengths: list[int], width: int, seed: int = 0) -> torch.Tensor:
    """Start token, ``n`` random word ids, end token, padding, for each ``n`` in ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    words = torch.tensor([w for w in range(spec.vocab_size) if w not in (spec.sot_id, spec.eot_id, spec.pad_id)])
    text = torch.full((len(lengths), width), spec.pad_id, dtype=torch.long)
    for b, n in enumerate(lengths):
        text[b, 0] = spec.sot_id
        text[b, 1 : 1 + n] = words[torch.randint(len(words), (n,), generator=g)]
        text[b, 1 + n] = spec.eot_id
    return text


# (a) the caption loss ---------------------------------------------------------------------------

def test_caption_loss_predicts_the_next_token_and_ignores_padding(spec):
    torch.manual_seed(0)
    decoder = CaptionDecoder(spec, image_dim=8, width=16, layers=1, heads=2).eval()
    image_tokens = torch.randn(3, 5, 8)
    text = _captions(spec, [2, 4, 6], width=10)
    pad, eot = spec.pad_id, spec.eot_id
    with torch.no_grad():
        logits = decoder(image_tokens, text[:, :-1])
        expected, per_caption = _nll_by_hand(logits, text, pad, eot)
        assert torch.allclose(caption_loss(decoder, image_tokens, text, pad, eot).double(), expected, atol=1e-6)
        # The score of a caption is its own mean log-likelihood (the same positions).
        scores = caption_log_likelihood(decoder, image_tokens, text, pad, eot).double()
        assert torch.allclose(scores, -torch.stack(per_caption), atol=1e-6)

        # Whatever follows a caption's end token cannot change its loss or score: the decoder is
        # causal, and positions after the end token are not predicted.
        noisy = text.clone()
        for b, n in enumerate([2, 4, 6]):
            noisy[b, 2 + n :] = _captions(spec, [7], width=10, seed=b + 1)[0, 1 : 9 - n]
        assert (noisy != text).any()
        assert torch.allclose(caption_loss(decoder, image_tokens, noisy, pad, eot),
                              caption_loss(decoder, image_tokens, text, pad, eot), atol=1e-6)
        assert torch.allclose(caption_log_likelihood(decoder, image_tokens, noisy, pad, eot), scores.float(), atol=1e-6)


# (b) MUG and (c) CoCa: the total is the weighted sum of the parts ------------------------------

def _patches_by_hand(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, N, p*p*3] by slicing, row-major over the patch grid, pixels (row, column, channel)."""
    b, _, h, w = images.shape
    out = []
    for r in range(h // p):
        for c in range(w // p):
            out.append(images[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p].permute(0, 2, 3, 1).reshape(b, -1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 2.0)])
def test_mug_loss_is_the_weighted_sum_of_reconstruction_and_caption(weights, smoke_cfg, spec, toy_samples, tokenizer):
    recon_w, cap_w = weights
    method = _build("mug", smoke_cfg, spec, recon_weight=recon_w, cap_weight=cap_w).eval()
    batch = make_batch(type(method), toy_samples[:4], tokenizer, smoke_cfg.encoder.img_size)
    images, text = batch["image"], batch["text"]
    with torch.no_grad():
        torch.manual_seed(7)
        out = method(batch)
        torch.manual_seed(7)  # the same mask again
        latent, mask, ids_restore = masked_encode(method.encoder, images, method.options.mask_ratio)
        pred = method.decoder(latent, ids_restore)
        target = _patches_by_hand(images, method.patch_size)
        errors = []
        for b in range(images.shape[0]):
            for n in range(target.shape[1]):
                if mask[b, n] == 1:  # only removed patches count, each normalised by its own statistics
                    t = target[b, n]
                    t = (t - t.mean()) / math.sqrt(t.var().item() + 1e-6)
                    errors.append(((pred[b, n] - t) ** 2).mean())
        recon = torch.stack(errors).mean()
        # The caption decoder reads the latent of the masked image (the paper's Algorithm 1).
        caption, _ = _nll_by_hand(method.caption_decoder(latent, text[:, :-1]), text, spec.pad_id, spec.eot_id)
    assert torch.allclose(out["recon"], recon, atol=1e-5)
    assert torch.allclose(out["caption"].double(), caption, atol=1e-5)
    assert torch.allclose(out["loss"].double(), recon_w * recon.double() + cap_w * caption, atol=1e-5)


@pytest.mark.parametrize("weights", [(2.0, 1.0), (0.5, 3.0)])
def test_coca_loss_is_the_weighted_sum_of_contrastive_and_caption(weights, smoke_cfg, spec, toy_samples, tokenizer):
    cap_w, clip_w = weights
    method = _build("coca", smoke_cfg, spec, caption_loss_weight=cap_w, clip_loss_weight=clip_w).eval()
    batch = make_batch(type(method), toy_samples[:4], tokenizer, smoke_cfg.encoder.img_size)
    images, text = batch["image"], batch["text"]
    with torch.no_grad():
        out = method(batch)
        img, txt = method.encode_image(images).double(), method.encode_text(text).double()
        scale = method.logit_scale.exp().double()
        # Symmetric InfoNCE: each image against every caption and each caption against every image.
        terms = []
        for i in range(len(img)):
            row = torch.stack([scale * img[i] @ txt[j] for j in range(len(txt))])
            col = torch.stack([scale * img[j] @ txt[i] for j in range(len(img))])
            terms.append((torch.logsumexp(row, 0) - row[i] + torch.logsumexp(col, 0) - col[i]) / 2)
        contrastive = torch.stack(terms).mean()
        logits = method.caption_decoder(method.caption_memory(images), text[:, :-1])
        caption, _ = _nll_by_hand(logits, text, spec.pad_id, spec.eot_id)
    assert torch.allclose(out["contrastive"].double(), contrastive, atol=1e-5)
    assert torch.allclose(out["caption"].double(), caption, atol=1e-5)
    assert torch.allclose(out["loss"].double(), clip_w * contrastive + cap_w * caption, atol=1e-5)


# (d) generation ---------------------------------------------------------------------------------

PAD, SOT, EOT, A, B, X = 0, 1, 2, 3, 4, 5  # a 10-token vocabulary: X..X+4 are five more words


class MarkovDecoder(nn.Module):
    """A 'decoder' whose next-token distribution depends only on the last token, so the best
    caption can be worked out by hand. ``transitions[a][b]`` is P(b | a); a row's remaining mass is
    spread evenly over the tokens it does not name."""

    def __init__(self, transitions: dict[int, dict[int, float]], vocab: int = 10):
        super().__init__()
        probs = torch.full((vocab, vocab), 1.0 / vocab)
        for a, row in transitions.items():
            rest = (1.0 - sum(row.values())) / (vocab - len(row))
            probs[a] = torch.tensor([row.get(b, rest) for b in range(vocab)])
        self.register_buffer("logp", probs.log())

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (valid logits) of the next token after each of ``tokens``."""
        return self.logp[tokens]


# Greedy takes the likelier first word A, but A's continuations are uncertain; B is followed by the
# end token almost surely.
GREEDY_TRAP = {SOT: {A: 0.55, B: 0.40}, A: {X: 0.3, **{x: 0.1625 for x in range(X + 1, X + 5)}},
               B: {EOT: 0.95}, **{x: {EOT: 0.9} for x in range(X, X + 5)}}
# B EOT has the higher total log-probability; A X X+1 X+2 EOT the higher mean per token.
LONG_BUT_SURE = {SOT: {B: 0.5, A: 0.45}, B: {EOT: 0.8}, A: {X: 0.8}, X: {X + 1: 0.8}, X + 1: {X + 2: 0.8},
                 X + 2: {EOT: 0.95}}


def _generate(decoder, image_tokens, **kw):
    """`generate_captions` with the Markov vocabulary's ids and a context of 8."""
    ids = dict(sot_id=SOT, eot_id=EOT, pad_id=PAD, context_length=8)
    return generate_captions(decoder, image_tokens, **ids, **kw)


def test_beam_search_finds_the_caption_greedy_misses():
    decoder, images = MarkovDecoder(GREEDY_TRAP), torch.zeros(2, 1, 4)
    greedy, beam = _generate(decoder, images), _generate(decoder, images, beam=2)
    assert greedy.tolist() == [[SOT, A, X, EOT]] * 2
    assert beam.tolist() == [[SOT, B, EOT]] * 2
    # Mean log-probability of the generated tokens, by hand, against the scorer used by score_text.
    by_hand = {"greedy": (math.log(0.55) + math.log(0.3) + math.log(0.9)) / 3,
               "beam": (math.log(0.40) + math.log(0.95)) / 2}
    scores = {"greedy": caption_log_likelihood(decoder, images, greedy, PAD, EOT),
              "beam": caption_log_likelihood(decoder, images, beam, PAD, EOT)}
    for k in by_hand:
        assert torch.allclose(scores[k], torch.tensor(by_hand[k]), atol=1e-5)
    assert (scores["beam"] >= scores["greedy"]).all()


def test_beam_search_ranks_by_length_normalised_log_probability():
    decoder, images = MarkovDecoder(LONG_BUT_SURE), torch.zeros(1, 1, 4)
    greedy, beam = _generate(decoder, images), _generate(decoder, images, beam=2)
    assert greedy.tolist() == [[SOT, B, EOT]]
    assert beam.tolist() == [[SOT, A, X, X + 1, X + 2, EOT]]
    total = {"greedy": math.log(0.5) + math.log(0.8), "beam": math.log(0.45) + 3 * math.log(0.8) + math.log(0.95)}
    assert total["beam"] < total["greedy"] and total["beam"] / 5 > total["greedy"] / 2
    score = {k: caption_log_likelihood(decoder, images, ids, PAD, EOT) for k, ids in (("greedy", greedy), ("beam", beam))}
    assert score["beam"] > score["greedy"]


def test_decoding_stops_at_the_end_token_pads_after_and_continues_prefixes():
    decoder, images = MarkovDecoder(GREEDY_TRAP), torch.zeros(3, 1, 4)
    # Per-image prefixes in the tokenizer's layout (start token, words, end token, padding).
    prefix = torch.tensor([[SOT, EOT, PAD], [SOT, B, EOT], [SOT, A, X + 1]])
    unprompted = {1: [SOT, A, X, EOT], 3: [SOT, B, EOT, PAD]}
    for beam in (1, 3):
        out = _generate(decoder, images, prefix=prefix, beam=beam)
        assert out.tolist() == [unprompted[beam], [SOT, B, EOT, PAD], [SOT, A, X + 1, EOT]]
    # Start and pad tokens are never generated, however likely: a pad would read as an early end.
    for beam in (1, 2):
        row = _generate(MarkovDecoder({SOT: {PAD: 0.9, SOT: 0.05}}), images[:1], beam=beam)[0].tolist()
        words = row[1 : row.index(EOT)] if EOT in row else row[1:]
        assert row[0] == SOT and {SOT, PAD}.isdisjoint(words)
    # A caption cut by max_len has no end token.
    assert _generate(decoder, images[:1], max_len=1).tolist() == [[SOT, A]]
    assert _generate(decoder, images[:1], max_len=1, beam=2).tolist() == [[SOT, A]]


def test_greedy_equals_beam_search_with_one_beam(spec, monkeypatch):
    import mugbench.models.text as text_module

    torch.manual_seed(0)
    decoder = CaptionDecoder(spec, image_dim=8, width=16, layers=1, heads=2).train()
    image_tokens = torch.randn(4, 5, 8)
    ids = dict(sot_id=spec.sot_id, eot_id=spec.eot_id, pad_id=spec.pad_id, context_length=12)
    prefix = _captions(spec, [1, 3, 0, 2], width=6)
    settings = ({}, {"prefix": prefix}, {"max_len": 4})
    greedy = [generate_captions(decoder, image_tokens, **ids, **kw) for kw in settings]
    # beam=1 normally takes the plain greedy loop; route it through the beam search with one beam.
    monkeypatch.setattr(text_module, "_greedy", lambda *args: text_module._beam_search(*args, 1))
    for kw, reference in zip(settings, greedy):
        assert torch.equal(generate_captions(decoder, image_tokens, **ids, **kw), reference)
        assert (reference[:, 0] == spec.sot_id).all() and not reference.requires_grad
        for row in reference.tolist():  # nothing but padding after an end token
            if spec.eot_id in row:
                assert set(row[row.index(spec.eot_id) + 1 :]) <= {spec.pad_id}
    assert decoder.training  # generation used eval mode and gave the module back as it was


# (e) caption scoring after over-fitting -------------------------------------------------------

def test_score_text_prefers_the_trained_caption(smoke_cfg, spec, toy_samples, tokenizer):
    method = _build("cap", smoke_cfg, spec)
    batch = make_batch(type(method), toy_samples[:8], tokenizer, smoke_cfg.encoder.img_size)
    before = method.score_text(batch["image"], batch["text"])
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    for _ in range(10):
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    lengths = (batch["text"] != spec.pad_id).sum(1) - 2  # words between the start and end tokens
    random = _captions(spec, lengths.tolist(), width=batch["text"].shape[1], seed=3)
    trained, other = method.score_text(batch["image"], batch["text"]), method.score_text(batch["image"], random)
    assert trained.shape == (8,) and (trained > other).all() and (trained > before).all()
    assert method.training  # scoring ran in eval mode and restored the mode

    words = tokenizer.decode(batch["text"][0]).split()
    captions = method.caption(batch["image"][:2], tokenizer, prefix=words[0], max_len=6, beam=2)
    assert len(captions) == 2 and all(c.split()[0] == words[0] for c in captions)


@pytest.mark.parametrize("name", ["cap", "coca", "mug"])
def test_captioners_generate_and_score(name, smoke_cfg, spec, toy_samples, tokenizer):
    method = _build(name, smoke_cfg, spec)
    images = make_batch(type(method), toy_samples[:3], tokenizer, smoke_cfg.encoder.img_size)["image"]
    ids = method.caption_tokens(images, max_len=5)
    assert ids.shape[0] == 3 and 2 <= ids.shape[1] <= 6 and (ids[:, 0] == spec.sot_id).all()
    texts = method.caption(images, tokenizer, max_len=5)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    scores = method.score_text(images, tokenizer(["a red circle"] * 3))
    assert scores.shape == (3,) and (scores < 0).all()


# (f) reconstructions ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mae", "mug"])
def test_reconstruct_keeps_visible_patches(name, smoke_cfg, spec):
    method = _build(name, smoke_cfg, spec)
    size = smoke_cfg.encoder.img_size
    images = torch.randn(3, 3, size, size)
    out = method.reconstruct(images)
    assert method.training
    for key in ("masked", "reconstruction", "pasted"):
        assert out[key].shape == images.shape and torch.isfinite(out[key]).all()
    n = (size // method.patch_size) ** 2
    assert out["mask"].shape == (3, n) and (out["mask"].sum(1) == n - round(n * 0.25)).all()
    visible = out["pixel_mask"].expand_as(images) == 0
    assert torch.equal(out["pasted"][visible], images[visible])
    assert torch.equal(out["masked"][visible], images[visible]) and (out["masked"][~visible] == 0).all()
    assert torch.equal(out["pasted"][~visible], out["reconstruction"][~visible])


# (g) MUG's caption latent -------------------------------------------------------------------------

@pytest.mark.parametrize("cap_latent", ["visible", "full"])
def test_mug_captions_from_the_chosen_latent(cap_latent, smoke_cfg, spec, toy_samples, tokenizer):
    method = _build("mug", smoke_cfg, spec, cap_latent=cap_latent)
    seen = []
    method.caption_decoder.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    method(make_batch(type(method), toy_samples[:2], tokenizer, smoke_cfg.encoder.img_size))
    n = (smoke_cfg.encoder.img_size // method.patch_size) ** 2
    visible = round(n * (1 - method.options.mask_ratio))
    assert seen == [1 + (n if cap_latent == "full" else visible)]  # class token + patch tokens


def test_invalid_cap_latent_names_mug_and_the_option():
    with pytest.raises(MethodOptionError) as err:
        get_method("mug").parse_options({"cap_latent": "both"})
    assert "mug" in str(err.value) and "cap_latent" in str(err.value)


def test_cap_can_caption_from_a_masked_latent(smoke_cfg, spec):
    method = _build("cap", smoke_cfg, spec, mask_ratio=0.75)
    size = smoke_cfg.encoder.img_size
    n = (size // smoke_cfg.encoder.patch_size) ** 2
    assert method.caption_memory(torch.randn(2, 3, size, size)).shape[1] == 1 + round(n * 0.25)
    assert method.caption_memory(torch.randn(2, 3, size, size), mask_ratio=0.0).shape[1] == 1 + n


def test_coca_options(smoke_cfg, spec, toy_samples, tokenizer):
    """The default pools with CoCa's attentional poolers (their queries exempt from weight decay);
    ``image_pool="token"`` is the raw-tokens approximation, with no poolers at all."""
    pooled = _build("coca", smoke_cfg, spec)
    assert pooled.options.image_pool == "coca" and get_method("coca").option_defaults()["attn_queries"] == 256
    assert {"attn_pool.query", "attn_pool_contrastive.query"} <= pooled.no_weight_decay()
    raw = _build("coca", smoke_cfg, spec, image_pool="token")
    out = raw(make_batch(type(raw), toy_samples[:4], tokenizer, smoke_cfg.encoder.img_size))
    assert torch.isfinite(out["loss"]) and raw.attn_pool is None and raw.attn_pool_contrastive is None
    assert not any("attn_pool" in name for name, _ in raw.named_parameters())
    images = torch.randn(2, 3, smoke_cfg.encoder.img_size, smoke_cfg.encoder.img_size)
    n = (smoke_cfg.encoder.img_size // smoke_cfg.encoder.patch_size) ** 2
    assert raw.caption_memory(images).shape == (2, 1 + n, smoke_cfg.encoder.embed_dim)  # every encoder token
    for bad in ({"image_pool": "mean"}, {"image_pool": "attn"}, {"attn_queries": 0},
                {"caption_loss_weight": 0, "clip_loss_weight": 0}, {"init_temperature": 1e-3}):
        with pytest.raises(MethodOptionError, match="coca"):
            get_method("coca").parse_options(bad)


@pytest.mark.parametrize("queries", [5, 16])
def test_coca_poolers_give_the_contrastive_embedding_and_the_decoder_memory(queries, smoke_cfg, spec, tokenizer):
    """CoCa's two poolers on the encoder's tokens: one query -> the joint-space embedding
    ``[B, embed_dim]``; ``attn_queries`` queries -> the decoder's memory ``[B, N, text width]``, which
    generation and scoring read too (a masked latent is pooled to the same N)."""
    method = _build("coca", smoke_cfg, spec, attn_queries=queries).eval()
    images = torch.randn(3, 3, smoke_cfg.encoder.img_size, smoke_cfg.encoder.img_size)
    assert method.encode_image(images).shape == (3, spec.embed_dim)
    assert method.caption_memory(images).shape == (3, queries, spec.width)
    assert method.caption_memory(images, mask_ratio=0.5).shape == (3, queries, spec.width)
    seen = []
    method.caption_decoder.decoder.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    method.caption_tokens(images, max_len=2)
    method.score_text(images, tokenizer(["a red circle"] * 3))
    assert seen and all(shape[1:] == (queries, spec.width) for shape in seen)


# (d) CapPa's parallel prediction in cap ----------------------------------------------------------

def test_parallel_prediction_reads_no_caption_and_attends_to_later_positions(spec):
    torch.manual_seed(0)
    decoder = CaptionDecoder(spec, image_dim=8, width=16, layers=2, heads=2, mask_token=True).eval()
    image_tokens = torch.randn(2, 5, 8)
    a, b = _captions(spec, [6, 6], width=9, seed=1), _captions(spec, [6, 6], width=9, seed=2)
    assert (a != b).any()
    every, none = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        # Parallel rows read mask tokens only: two different captions of one length, the same logits.
        assert torch.equal(decoder(image_tokens, a[:, :-1], parallel=every),
                           decoder(image_tokens, b[:, :-1], parallel=every))
        # Teacher forcing reads the caption; parallel=False is the plain autoregressive decoder.
        ar_a = decoder(image_tokens, a[:, :-1])
        assert not torch.allclose(ar_a, decoder(image_tokens, b[:, :-1]))
        assert torch.equal(decoder(image_tokens, a[:, :-1], parallel=none), ar_a)
        # No causal mask: position 0 sees how many mask tokens follow it; the causal decoder does not.
        assert not torch.allclose(decoder(image_tokens, a[:, :4], parallel=every)[:, 0],
                                  decoder(image_tokens, a[:, :8], parallel=every)[:, 0])
        assert torch.allclose(decoder(image_tokens, a[:, :4])[:, 0], decoder(image_tokens, a[:, :8])[:, 0], atol=1e-6)
        # A mixed batch decodes each row in its own mode and keeps the row order.
        mixed = decoder(image_tokens, a[:, :-1], parallel=torch.tensor([True, False]))
        assert torch.allclose(mixed[0], decoder(image_tokens, a[:, :-1], parallel=every)[0], atol=1e-6)
        assert torch.allclose(mixed[1], ar_a[1], atol=1e-6)
    with pytest.raises(ValueError, match="mask_token"):
        CaptionDecoder(spec, image_dim=8, width=16, layers=1, heads=2)(image_tokens, a[:, :-1], parallel=every)


def test_cap_parallel_fraction_is_drawn_per_caption_and_reproducible(smoke_cfg, spec):
    method = _build("cap", smoke_cfg, spec, parallel_fraction=0.75)
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(method.parallel_rows(400))
    assert draws[0].dtype == torch.bool and draws[0].shape == (400,)
    assert 0.70 <= draws[0].float().mean().item() <= 0.80  # CapPa's 75 %
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    for fraction, share in ((1.0, 1.0), (0.25, None)):
        torch.manual_seed(0)
        rows = _build("cap", smoke_cfg, spec, parallel_fraction=fraction).parallel_rows(400).float().mean().item()
        assert rows == share if share is not None else 0.20 <= rows <= 0.30
    with pytest.raises(MethodOptionError, match="parallel_fraction"):
        get_method("cap").parse_options({"parallel_fraction": 1.5})


def test_cap_loss_with_parallel_prediction(smoke_cfg, spec, toy_samples, tokenizer):
    size = smoke_cfg.encoder.img_size
    images, text = torch.randn(16, 3, size, size), tokenizer([s.captions[0] for s in toy_samples[:16]])
    pad, eot = spec.pad_id, spec.eot_id

    # The default is the autoregressive captioner: no mask token, no random draw, MUG's caption loss.
    plain = _build("cap", smoke_cfg, spec).train()
    assert plain.options.parallel_fraction == 0 and plain.caption_decoder.mask_embedding is None
    torch.manual_seed(3)
    state = torch.get_rng_state()
    loss = plain({"image": images, "text": text})["loss"]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.allclose(loss, caption_loss(plain.caption_decoder, plain.caption_memory(images), text, pad, eot))

    # With CapPa's 0.75 the training loss mixes both modes over the rows parallel_rows draws.
    method = _build("cap", smoke_cfg, spec, parallel_fraction=0.75).train()
    torch.manual_seed(3)
    loss = method({"image": images, "text": text})["loss"]
    torch.manual_seed(3)
    rows = method.parallel_rows(16)
    assert 0 < rows.sum() < 16
    memory = method.caption_memory(images)
    assert torch.allclose(loss, caption_loss(method.caption_decoder, memory, text, pad, eot, parallel=rows), atol=1e-6)
    assert not torch.allclose(loss, caption_loss(method.caption_decoder, memory, text, pad, eot), atol=1e-4)
    loss.backward()  # both embeddings learn in a mixed step
    assert method.caption_decoder.mask_embedding.grad.abs().sum() > 0
    assert method.caption_decoder.token_embedding.weight.grad.abs().sum() > 0
    # Evaluation-mode losses and scores stay autoregressive.
    method.eval()
    with torch.no_grad():
        assert torch.allclose(method({"image": images, "text": text})["loss"],
                              caption_loss(method.caption_decoder, memory, text, pad, eot), atol=1e-6)


def test_coca_losses_equal_open_clips_coca_on_the_same_encoder_tokens(smoke_cfg, spec, toy_samples, tokenizer):
    """Our ``coca`` against open_clip's own ``CoCa`` model (``open_clip.coca_model.CoCa`` with the
    paper's pooling, ``attentional_pool="parallel"``) at a tiny size.

    What is compared: the weighted contrastive and caption losses (open_clip's ``CoCaLoss`` with
    weights 1 and 2 applied to open_clip's model outputs) and their sum, to 1e-5. What is shared:
    the encoder's token sequence before its final norm (open_clip's vision trunk is bypassed and
    fed exactly these tokens; its ``ln_post`` is a copy of our encoder's final norm, which holds the
    same place), and copies of the weights of every part that corresponds: the two attentional
    poolers, the image projection, the unimodal text tower, the multimodal decoder and the logit
    scale. The encoder is 48 wide and the text 32, so a swapped key/query width would not fit.
    open_clip's "parallel" pooler leaves the single contrastive query's axis in its image features
    (``[B, 1, E]``); it is squeezed before the loss.
    """
    width, queries, heads = 48, 6, spec.heads
    encoder = build_encoder(dataclasses.replace(smoke_cfg.encoder, embed_dim=width), seed=0)
    torch.manual_seed(1)
    ours = get_method("coca").build(encoder, spec, {"attn_queries": queries}).eval()
    theirs = OpenClipCoCa(
        embed_dim=spec.embed_dim, pad_id=spec.pad_id,
        multimodal_cfg=dict(context_length=spec.context_length, vocab_size=spec.vocab_size, width=spec.width,
                            heads=spec.heads, layers=spec.layers),
        text_cfg=dict(context_length=spec.context_length, vocab_size=spec.vocab_size, width=spec.width,
                      heads=spec.heads, layers=spec.layers, embed_cls=True, output_tokens=True, pad_id=spec.pad_id),
        vision_cfg=dict(image_size=smoke_cfg.encoder.img_size, patch_size=smoke_cfg.encoder.patch_size, width=width,
                        layers=1, head_width=width // 2, attentional_pool="parallel", attn_pooler_queries=queries,
                        attn_pooler_heads=heads, output_tokens=True)).eval()
    theirs.text.correct_cls_mask = True  # our tower's mask (open_clip keeps the old one for released weights)
    with torch.no_grad():
        theirs.text.load_state_dict(ours.caption_decoder.text.state_dict())
        theirs.text_decoder.load_state_dict(ours.caption_decoder.decoder.state_dict())
        theirs.visual.attn_pool.load_state_dict(ours.attn_pool.state_dict())
        theirs.visual.attn_pool_contrastive.load_state_dict(ours.attn_pool_contrastive.state_dict())
        theirs.visual.proj.copy_(ours.image_proj.weight.T)  # open_clip: pooled @ proj
        theirs.logit_scale.copy_(ours.logit_scale)
    theirs.visual.ln_post = copy.deepcopy(ours.encoder.norm)
    # Bypass open_clip's vision trunk: its input is already the trunk's output.
    theirs.visual._embeds = lambda x: x
    theirs.visual.transformer = nn.Identity()

    batch = make_batch(type(ours), toy_samples[:6], tokenizer, smoke_cfg.encoder.img_size)
    text = full_context(batch["text"], spec)
    assert torch.equal(caption_targets(text, spec.pad_id, spec.eot_id), text[:, 1:])  # same labels both sides
    trunk = []
    ours.encoder.norm.register_forward_pre_hook(lambda mod, args: trunk.append(args[0].detach().clone()))
    with torch.no_grad():
        out = ours(batch)
        latent, memory = theirs._encode_image(trunk[0])
        assert latent.shape == (6, 1, spec.embed_dim) and memory.shape == (6, queries, spec.width)
        ref = theirs(None, text, image_latent=latent.squeeze(1), image_embs=memory)
        contrastive, caption = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=spec.pad_id)(
            ref["image_features"], ref["text_features"], ref["logits"], ref["labels"], ref["logit_scale"])
        assert torch.allclose(F.normalize(latent.squeeze(1), dim=-1), ours.encode_image(batch["image"]), atol=1e-6)
    assert out["contrastive"].item() == pytest.approx(contrastive.item(), abs=1e-5)
    assert 2.0 * out["caption"].item() == pytest.approx(caption.item(), abs=1e-5)
    assert out["loss"].item() == pytest.approx((contrastive + caption).item(), abs=1e-5)
