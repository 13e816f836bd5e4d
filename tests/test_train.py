"""The shared trainer: schedule, checkpoints, resume, non-finite loss."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mugbench.config import TrainConfig
from mugbench.runs import build_method
from mugbench.train.checkpoint import load_checkpoint
from mugbench.train.distributed import DistInfo
from mugbench.train.loop import NonFiniteLossError, build_optimizer, build_scheduler, train

from conftest import make_batch


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, blr=4e-3 * 256 / 8 / 4, warmup_epochs=0.5, grad_clip=1.0,
                ckpt_every=2, log_every=1)
    return TrainConfig(**{**base, **kw})


def _batches(method, samples, tokenizer, size):
    fixed = [make_batch(type(method), samples[i:i + 8], tokenizer, size, seed=i) for i in range(0, 24, 8)]
    return lambda epoch: iter([dict(b) for b in (fixed if epoch % 2 == 0 else fixed[::-1])])


class _Crash(Exception):
    """Stands in for a killed job."""


def _crashing(feed, at_epoch: int, at_batch: int):
    """``feed`` that raises `_Crash` instead of yielding batch ``at_batch`` of epoch ``at_epoch``."""
    def batches(epoch):
        for i, b in enumerate(feed(epoch)):
            if epoch == at_epoch and i == at_batch:
                raise _Crash
            yield b
    return batches


def _losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_warmup_then_cosine_schedule():
    cfg = _cfg(warmup_epochs=1, min_lr=0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=20, steps_per_epoch=5)
    lrs = []
    for step in range(21):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] < 0.01 * cfg.lr and lrs[5] == pytest.approx(cfg.lr)
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:6]))  # rising warmup
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # falling cosine
    assert lrs[20] == pytest.approx(0.0, abs=1e-12)


def test_trains_checkpoints_and_resumes_exactly(smoke_cfg, spec, toy_samples, tokenizer, tmp_path):
    size = smoke_cfg.encoder.img_size
    info = DistInfo()
    # uninterrupted: 2 epochs x 3 steps
    m1 = build_method("mug", smoke_cfg, spec)
    s1 = train(m1, _batches(m1, toy_samples, tokenizer, size), _cfg(), steps_per_epoch=3,
               workdir=tmp_path / "a", info=info, seed=0)
    assert s1.steps == 6 and (tmp_path / "a" / "checkpoint.pt").exists()
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoint.pt")  # weights_only=True works
    assert ckpt["state"]["step"] == 6
    # interrupted by a crash during step 5 (the checkpoint of step 4 survives), then rerun
    m2 = build_method("mug", smoke_cfg, spec)
    feed = _batches(m2, toy_samples, tokenizer, size)

    def crashing(epoch):
        for i, b in enumerate(feed(epoch)):
            if epoch == 1 and i == 1:
                raise _Crash
            yield b

    with pytest.raises(_Crash):
        train(m2, crashing, _cfg(), steps_per_epoch=3, workdir=tmp_path / "b", info=info, seed=0)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["state"]["step"] == 4
    m3 = build_method("mug", smoke_cfg, spec)
    s3 = train(m3, _batches(m3, toy_samples, tokenizer, size), _cfg(), steps_per_epoch=3,
               workdir=tmp_path / "b", info=info, seed=0)
    assert s3.resumed_from == 4 and s3.steps == 6
    assert _losses(tmp_path / "b" / "metrics.jsonl") == pytest.approx(_losses(tmp_path / "a" / "metrics.jsonl"), rel=1e-5)
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(m3.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(smoke_cfg, spec, toy_samples, tokenizer, tmp_path):
    method = build_method("mae", smoke_cfg, spec)
    good = _batches(method, toy_samples, tokenizer, smoke_cfg.encoder.img_size)

    def poisoned(epoch):
        for i, b in enumerate(good(epoch)):
            if epoch == 1 and i == 1:
                b["image"] = b["image"] * float("nan")
            yield b

    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 4 \(parts: .*loss.*nan.*last good checkpoint"):
        train(method, poisoned, _cfg(ckpt_every=3), steps_per_epoch=3, workdir=tmp_path, info=DistInfo(), seed=0)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["state"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_optimizer_uses_the_scaled_learning_rate(smoke_cfg, spec):
    cfg = _cfg(batch_size=512, blr=1.5e-4)
    opt = build_optimizer(build_method("mae", smoke_cfg, spec), cfg)
    assert all(g["lr"] == pytest.approx(3e-4) for g in opt.param_groups)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, cfg.weight_decay}


def test_config_types_are_checked_and_numbers_in_text_converted():
    from mugbench.config import ConfigError, load_config
    from mugbench.registry import get_method

    cfg = load_config("smoke", ["train.blr=8e-3", "train.grad_clip=null"])  # YAML reads 8e-3 as text
    assert cfg.train.blr == pytest.approx(8e-3) and cfg.train.grad_clip is None
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config("smoke", ["train.batch_size=1.5"])
    with pytest.raises(ConfigError, match="eval.protocols"):
        load_config("smoke", ["eval.protocols=knn"])
    assert get_method("mae").parse_options({"mask_ratio": "6e-1"}).mask_ratio == pytest.approx(0.6)


def test_trainer_runs_after_step_on_the_method_after_each_optimizer_step(smoke_cfg, spec, toy_samples, tokenizer,
                                                                          tmp_path):
    """`train` calls ``method.after_step()`` once per optimizer step (not per micro-step); for CLIP
    that clamps a logit scale pushed past ln 100 back to ln 100 exactly."""
    method = build_method("clip", smoke_cfg, spec)
    with torch.no_grad():
        method.logit_scale.fill_(math.log(100.0) + 1.0)
    calls = []
    clamp = method.after_step
    method.after_step = lambda: (calls.append(len(calls)), clamp())[-1]
    train(method, _batches(method, toy_samples, tokenizer, smoke_cfg.encoder.img_size), _cfg(epochs=1, accum_steps=3),
          steps_per_epoch=1, workdir=tmp_path, info=DistInfo(), seed=0)
    assert len(calls) == 1  # one optimizer step of three accumulated micro-batches
    assert method.logit_scale.item() == torch.tensor(math.log(100.0)).item()


def test_a_crash_between_the_micro_batches_of_a_step_resumes_to_the_uninterrupted_weights(
        smoke_cfg, spec, toy_samples, tokenizer, tmp_path):
    """clip with two micro-batches per step (the two-pass accumulation), crashed after the first half of
    step 7's batch: the rerun resumes from checkpoint 6, replays the epoch's stream to step 7 and ends
    with the weights of an uninterrupted run, bit for bit; the logged losses are the same rows."""
    from mugbench.data.streams import split_rows

    def feed(method):
        whole = _batches(method, toy_samples, tokenizer, smoke_cfg.encoder.img_size)
        return lambda epoch: (micro for batch in whole(epoch) for micro in split_rows(batch, 2))

    cfg = _cfg(epochs=3, ckpt_every=2, accum_steps=2)
    whole = build_method("clip", smoke_cfg, spec)
    train(whole, feed(whole), cfg, steps_per_epoch=3, workdir=tmp_path / "whole", info=DistInfo(), seed=0)
    crashed = build_method("clip", smoke_cfg, spec)
    with pytest.raises(_Crash):  # epoch 2's first step is step 7; its second micro-batch never arrives
        train(crashed, _crashing(feed(crashed), 2, 1), cfg, steps_per_epoch=3, workdir=tmp_path / "crashed",
              info=DistInfo(), seed=0)
    again = build_method("clip", smoke_cfg, spec)
    summary = train(again, feed(again), cfg, steps_per_epoch=3, workdir=tmp_path / "crashed", info=DistInfo(), seed=0)
    assert summary.resumed_from == 6 and summary.steps == 9
    for key, value in whole.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert _losses(tmp_path / "crashed" / "metrics.jsonl") == _losses(tmp_path / "whole" / "metrics.jsonl")
