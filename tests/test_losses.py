"""Loss fidelity: each method's loss on tiny tensors against an independent re-derivation.

The references below are written from the papers' formulas with explicit Python loops over
plain floats (``math``), never by calling the code under test, so a shared mistake cannot
make both sides agree.
"""
from __future__ import annotations

import math

import pytest
import torch

from mugbench.models.mae_decoder import masked_patch_loss
from mugbench.methods.simclr import nt_xent_loss
from mugbench.runs import build_method
from mugbench.train.loop import build_optimizer

from conftest import make_batch


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _nt_xent_reference(za: list[list[float]], zb: list[list[float]], t: float) -> float:
    """SimCLR's NT-Xent: 2N anchors; anchor i's positive is its other view, the denominator
    runs over every k != i; mean of -log(exp(s(i,i')/t) / sum_{k != i} exp(s(i,k)/t))."""
    n = len(za)
    z = za + zb  # rows 0..n-1 are view a, rows n..2n-1 view b
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(_cos(z[i], z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(_cos(z[i], z[pos]) / t) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_loop_formula(t):
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    ours = nt_xent_loss(za, zb, t, rank=0, world_size=1).item()
    assert ours == pytest.approx(_nt_xent_reference(za.tolist(), zb.tolist(), t), rel=1e-5)
    # Cosine similarity: rescaling an embedding must not change the loss.
    assert nt_xent_loss(3.0 * za, zb, t, rank=0, world_size=1).item() == pytest.approx(ours, rel=1e-5)


def test_nt_xent_perfect_pairs_beat_random_pairs():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 8, generator=g)
    assert nt_xent_loss(z, z, 0.1, rank=0, world_size=1) < nt_xent_loss(z, torch.randn(4, 8, generator=g), 0.1, rank=0, world_size=1)


def test_clip_forward_is_symmetric_infonce(smoke_cfg, spec, toy_samples, tokenizer):
    method = build_method("clip", smoke_cfg, spec)
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)
    # Controlled embeddings through the method's own forward (its temperature and loss wiring).
    method.encode_image = lambda images, normalize=True: img
    method.encode_text = lambda text, normalize=True: txt
    batch = make_batch(type(method), toy_samples[:4], tokenizer, smoke_cfg.encoder.img_size)
    ours = method(batch)["loss"].item()

    scale = 1.0 / 0.07  # CLIP's initial temperature 0.07 (the method's default)
    a, b = img.tolist(), txt.tolist()
    logits = [[scale * sum(x * y for x, y in zip(a[i], b[j])) for j in range(4)] for i in range(4)]
    i2t = sum(-logits[i][i] + math.log(sum(math.exp(logits[i][j]) for j in range(4))) for i in range(4)) / 4
    t2i = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(4))) for j in range(4)) / 4
    assert ours == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def _mae_reference(pred, target, mask, norm_pix: bool) -> float:
    """MAE: per-patch MSE averaged over removed patches only; with norm_pix the target patch is
    normalised by its own mean and (unbiased, as in MAE's code) variance, eps 1e-6."""
    total, count = 0.0, 0
    for b in range(len(pred)):
        for n in range(len(pred[b])):
            if mask[b][n] != 1:
                continue
            t = target[b][n]
            if norm_pix:
                mu = sum(t) / len(t)
                var = sum((v - mu) ** 2 for v in t) / (len(t) - 1)
                t = [(v - mu) / math.sqrt(var + 1e-6) for v in t]
            total += sum((p - v) ** 2 for p, v in zip(pred[b][n], t)) / len(t)
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_only_on_masked_patches(norm_pix):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.float32)
    ours = masked_patch_loss(pred, target, mask, norm_pix).item()
    assert ours == pytest.approx(_mae_reference(pred.tolist(), target.tolist(), mask.tolist(), norm_pix), rel=1e-5)

    visible = (mask == 0).unsqueeze(-1)
    moved_visible = pred + 10.0 * visible * torch.randn(pred.shape, generator=g)
    assert masked_patch_loss(moved_visible, target, mask, norm_pix).item() == pytest.approx(ours, rel=1e-6)
    moved_masked = pred + 10.0 * (~visible) * torch.randn(pred.shape, generator=g)
    assert masked_patch_loss(moved_masked, target, mask, norm_pix).item() != pytest.approx(ours, rel=1e-3)


def test_slip_total_is_contrastive_plus_scaled_ssl(smoke_cfg, spec, toy_samples, tokenizer):
    method = build_method("slip", smoke_cfg, spec)
    assert method.options.ssl_scale == 1.0  # SLIP's default weight
    batch = make_batch(type(method), toy_samples[:8], tokenizer, smoke_cfg.encoder.img_size)
    outs = {}
    for scale in (0.0, 2.0):
        method.options.ssl_scale = scale
        torch.manual_seed(0)
        outs[scale] = {k: v.item() for k, v in method(batch).items()}
    zero, two = outs[0.0], outs[2.0]
    assert zero["contrastive"] == two["contrastive"] and zero["ssl"] == two["ssl"] > 0
    assert zero["loss"] == pytest.approx(zero["contrastive"], rel=1e-6)
    assert two["loss"] == pytest.approx(two["contrastive"] + 2.0 * two["ssl"], rel=1e-6)
    # The SSL part is NT-Xent over the two SimCLR views (views 1 and 2), not the CLIP view.
    v = batch["image_views"]
    with torch.no_grad():
        torch.manual_seed(0)
        feats = [method.encoder.forward_features(x)[:, 0] for x in (v[1], v[2])]
        ssl = nt_xent_loss(method.image_mlp(feats[0]), method.image_mlp(feats[1]), 0.1, rank=0, world_size=1)
    assert ssl.item() == pytest.approx(two["ssl"], rel=1e-4)


def _tokens_seen(encoder, fn) -> list[int]:
    """Sequence lengths entering the encoder's first block while ``fn()`` runs."""
    seen = []
    handle = encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        fn()
    finally:
        handle.remove()
    return seen


def test_flip_without_masking_equals_clip_and_masks_tokens(smoke_cfg, spec, toy_samples, tokenizer):
    clip = build_method("clip", smoke_cfg, spec)
    flip = build_method("flip", smoke_cfg, spec)
    flip.load_state_dict(clip.state_dict())  # same weights (build_method makes them equal anyway)
    batch = make_batch(type(clip), toy_samples[:8], tokenizer, smoke_cfg.encoder.img_size)

    flip.options.mask_ratio = 0.0
    torch.manual_seed(0)
    ref = clip(batch)["loss"]
    torch.manual_seed(0)
    assert flip(batch)["loss"].item() == pytest.approx(ref.item(), abs=1e-5)

    flip.options.mask_ratio = 0.5
    patches = flip.encoder.patch_embed.num_patches
    prefix = flip.encoder.num_prefix_tokens
    assert _tokens_seen(flip.encoder, lambda: flip(batch)) == [prefix + patches // 2]
    assert _tokens_seen(clip.encoder, lambda: clip(batch)) == [prefix + patches]
    # At evaluation FLIP encodes the whole image, like CLIP.
    with torch.no_grad():
        assert _tokens_seen(flip.encoder, lambda: flip.encode_image(batch["image"])) == [prefix + patches]
        assert torch.allclose(flip.encode_image(batch["image"]), clip.encode_image(batch["image"]))


def _nt_xent_rank(za, zb) -> tuple:
    """On one gloo rank: its loss on its half of the pairs and the gradients of its rows."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    n = za.shape[0] // world
    a = za[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    b = zb[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = nt_xent_loss(a, b, 0.1)  # rank and world from the process group
    loss.backward()
    # The gather's backward already sums every rank's loss gradient into this rank's rows;
    # DDP then divides by the world size when it averages the parameter gradients.
    return rank, loss.item(), (a.grad / world).tolist(), (b.grad / world).tolist()


@pytest.mark.slow
def test_nt_xent_under_ddp_equals_single_process_on_the_global_batch():
    """Two gloo ranks with 3 pairs each: mean loss and averaged gradients equal one process on 6 pairs."""
    from gloo import run_on_ranks

    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    a, b = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    full = nt_xent_loss(a, b, 0.1, rank=0, world_size=1)
    full.backward()
    results = run_on_ranks(_nt_xent_rank, 2, za, zb, timeout=120)
    assert sum(r[1] for r in results) / 2 == pytest.approx(full.item(), rel=1e-5)
    # Each rank's gradient for its own rows, over the world size, is the single-process gradient
    # of the global mean for those rows: negatives from the other rank receive gradient too.
    for rank, _, ga, gb in results:
        rows = slice(rank * 3, rank * 3 + 3)
        assert torch.allclose(torch.tensor(ga), a.grad[rows], atol=1e-6)
        assert torch.allclose(torch.tensor(gb), b.grad[rows], atol=1e-6)


@pytest.mark.parametrize("name", ["clip", "flip", "slip", "coca"])
def test_logit_scale_past_its_cap_keeps_its_gradient_and_is_clamped_after_the_step(
        name, smoke_cfg, spec, toy_samples, tokenizer):
    """open_clip's rule for CLIP's cap on the logit scale: the parameter (log scale) is clamped to
    [0, ln 100] after the optimizer step, and forward uses its exp unclamped, so a parameter that
    went past ln 100 still gets a gradient (a clamp of the value in forward would give it exactly 0)
    and the step brings it back to ln 100 exactly."""
    method = build_method(name, smoke_cfg, spec)
    batch = make_batch(type(method), toy_samples[:4], tokenizer, smoke_cfg.encoder.img_size)
    with torch.no_grad():
        method.logit_scale.fill_(math.log(100.0) + 0.5)
    out = method(batch)
    assert out["logit_scale"].item() == pytest.approx(100.0 * math.exp(0.5), rel=1e-5)  # not clamped in forward
    out["loss"].backward()
    assert method.logit_scale.grad is not None and method.logit_scale.grad.abs().item() > 0
    # One trainer-like step: the update moves the parameter by about lr, far less than the 0.5 excess.
    optimizer = build_optimizer(method, smoke_cfg.train)
    optimizer.step()
    assert method.logit_scale.item() > math.log(100.0)
    method.after_step()
    assert method.logit_scale.item() == torch.tensor(math.log(100.0)).item()
    with torch.no_grad():
        method.logit_scale.fill_(-0.25)  # below 0: a scale under 1 is clamped up to ln 1 = 0
    method.after_step()
    assert method.logit_scale.item() == 0.0
