"""Method tests beyond the contract kit: training dynamics, determinism, export, options.

The contract itself (registered, options, paradigm, views, a finite loss reaching the encoder,
after_step, capabilities, what protocols need) is `mugbench.testing.check_method`, run over every
registered method in test_contracts.py. Parametrised over the registry, so a new method is tested by
adding its file.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch

from mugbench.data.tokenizer import trim_padding
from mugbench.method import PARADIGMS, MethodOptionError
from mugbench.models.vit import build_encoder
from mugbench.registry import UnknownMethodError, get_method, registered_methods
from mugbench.runs import build_method
from mugbench.sources import load_source
from mugbench.train.checkpoint import export_encoder
from mugbench.train.loop import build_optimizer, enable_grad_checkpointing

from conftest import make_batch

METHODS = sorted(registered_methods())
TRAINED = [m for m in METHODS if get_method(m).pretrains]  # the ones with an objective (not `random`)


def _steps(method, batch, opt, n: int) -> list[float]:
    """``n`` optimiser steps on one fixed batch; the losses before each step."""
    losses = []
    for _ in range(n):
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_registry_has_the_foundation_methods():
    assert {"mae", "clip", "mug"} <= set(METHODS)


def test_unknown_method_lists_registered_ones():
    with pytest.raises(UnknownMethodError) as err:
        get_method("mea")
    assert "mae" in str(err.value) and "clip" in str(err.value)


def test_paradigms_follow_the_paper():
    # The paper's four representatives, one per family.
    assert [get_method(m).paradigm for m in ("simclr", "mae", "clip", "mug")] == list(PARADIGMS)


@pytest.mark.parametrize("name", METHODS)
def test_after_step_exists_and_runs(name, smoke_cfg, spec):
    """The trainer calls ``after_step()`` after every optimizer step: every method has one, it runs
    on a freshly built method, and it leaves every parameter inside its constraints unchanged."""
    method = build_method(name, smoke_cfg, spec)
    assert callable(getattr(method, "after_step", None))
    before = {k: v.clone() for k, v in method.state_dict().items()}
    assert method.after_step() is None
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # initial values are within the clamps


@pytest.mark.parametrize("name", [m for m in METHODS if get_method(m).needs_text])
def test_trimmed_captions_give_the_full_context_loss(name, smoke_cfg, spec, toy_samples, tokenizer):
    # The loader trims a batch's trailing padding (a speed-up); the loss must not notice.
    method = build_method(name, smoke_cfg, spec).eval()
    batch = make_batch(type(method), toy_samples[:8], tokenizer, smoke_cfg.encoder.img_size)
    batch["text"] = tokenizer([" ".join(c.split()[:6]) for c in batch["caption"]])  # web-length captions
    short = trim_padding(batch["text"], tokenizer.pad_id)
    assert short.shape[1] < batch["text"].shape[1]
    losses = []
    for text in (batch["text"], short):
        torch.manual_seed(3)  # the same masks for masked methods
        losses.append(method(dict(batch, text=text))["loss"].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("name", TRAINED)
def test_grad_checkpointing_changes_memory_not_gradients(name, smoke_cfg, spec, toy_samples, tokenizer):
    batch = make_batch(get_method(name), toy_samples[:8], tokenizer, smoke_cfg.encoder.img_size)
    grads = []
    for checkpointing in (False, True):
        method = build_method(name, smoke_cfg, spec)
        if checkpointing:
            assert enable_grad_checkpointing(method) >= 1
            assert method.encoder.grad_checkpointing
        torch.manual_seed(5)
        method(batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", TRAINED)
def test_loss_falls_when_overfitting_one_batch(name, smoke_cfg, spec, toy_samples, tokenizer):
    method = build_method(name, smoke_cfg, spec)
    batch = make_batch(type(method), toy_samples[:16], tokenizer, smoke_cfg.encoder.img_size)
    torch.manual_seed(0)
    losses = _steps(method, batch, torch.optim.AdamW(method.parameters(), lr=2e-3), 40)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"{name}: loss {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("name", METHODS)
def test_encoder_export_loads_into_timm(name, smoke_cfg, spec, tmp_path):
    method = build_method(name, smoke_cfg, spec).eval()
    with torch.no_grad():  # move the weights away from init so the check is not trivially true
        for p in method.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    enc = smoke_cfg.encoder
    fresh = timm.create_model(enc.timm_name, pretrained=False, **enc.timm_kwargs()).eval()
    fresh.load_state_dict(method.encoder.state_dict(), strict=True)  # no key renaming
    reloaded = load_source(export_encoder(tmp_path / "enc.safetensors", method.encoder, enc)).encoder.eval()
    x = torch.randn(4, 3, enc.img_size, enc.img_size)
    with torch.no_grad():
        ref = method.encoder.forward_features(x)
        assert torch.equal(fresh.forward_features(x), ref)
        assert torch.equal(reloaded.forward_features(x), ref)


@pytest.mark.parametrize("name", TRAINED)
def test_same_seed_same_losses(name, smoke_cfg, spec, toy_samples, tokenizer):
    def run():
        method = build_method(name, smoke_cfg, spec)
        batch = make_batch(type(method), toy_samples[:8], tokenizer, smoke_cfg.encoder.img_size)
        torch.manual_seed(123)
        return _steps(method, batch, build_optimizer(method, smoke_cfg.train), 3)

    a, b = run(), run()
    assert a == b and all(math.isfinite(x) for x in a)


def test_every_method_starts_from_the_same_encoder(smoke_cfg, spec):
    ref = build_encoder(smoke_cfg.encoder, seed=smoke_cfg.seed).state_dict()
    for name in METHODS:
        enc = build_method(name, smoke_cfg, spec).encoder.state_dict()
        assert all(torch.equal(enc[k], ref[k]) for k in ref), name


@pytest.mark.parametrize("name", METHODS)
def test_unknown_option_names_method_and_option(name):
    with pytest.raises(MethodOptionError) as err:
        get_method(name).parse_options({"no_such_option": 1})
    assert name in str(err.value) and "no_such_option" in str(err.value)


def test_out_of_range_option_is_rejected():
    with pytest.raises(MethodOptionError, match="mask_ratio"):
        get_method("mae").parse_options({"mask_ratio": 1.5})


def test_weight_decay_exempts_norms_biases_and_tokens(smoke_cfg, spec):
    method = build_method("mug", smoke_cfg, spec)
    opt = build_optimizer(method, smoke_cfg.train)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    names = {n for n, p in method.named_parameters() if id(p) in no_decay}
    assert "encoder.cls_token" in names and "decoder.mask_token" in names
    assert "encoder.norm.weight" in names and "encoder.blocks.0.attn.qkv.bias" in names
    assert "encoder.blocks.0.attn.qkv.weight" not in names
    assert not method.encoder.pos_embed.requires_grad  # fixed sin-cos, as in MAE
