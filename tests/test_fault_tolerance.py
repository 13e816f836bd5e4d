"""Fault tolerance: rotating checkpoints with fallback past a corrupt one, exact resume after
SIGKILL, a checkpoint of the wrong method, and evaluation resumed from the protocol reached.
(Many processes writing records at once: test_results.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mugbench.study import build_method
from mugbench.train.checkpoint import load_checkpoint, run_checkpoints
from mugbench.train.distributed import DistInfo
from mugbench.train.loop import CheckpointMismatchError, train

from test_train import _batches, _cfg, _Crash

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _crashing(feed, at_epoch: int, at_batch: int):
    def batches(epoch):
        for i, b in enumerate(feed(epoch)):
            if epoch == at_epoch and i == at_batch:
                raise _Crash
            yield b
    return batches


def test_keeps_the_last_checkpoints_and_falls_back_past_a_corrupt_one(smoke_cfg, spec, toy_samples, tokenizer,
                                                                       tmp_path, capsys):
    size = smoke_cfg.encoder.img_size
    m1 = build_method("mae", smoke_cfg, spec)
    train(m1, _batches(m1, toy_samples, tokenizer, size), _cfg(epochs=3, ckpt_every=2), steps_per_epoch=3,
          workdir=tmp_path / "a", info=DistInfo(), seed=0)
    kept = run_checkpoints(tmp_path / "a")
    assert [p.name for p in kept] == ["checkpoint-00000009.pt", "checkpoint-00000008.pt"]
    assert (tmp_path / "a" / "checkpoint.pt").resolve() == kept[0].resolve()
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt")["state"]["step"] == 9

    # Crash during step 7 (checkpoints 4 and 6 on disk), then the newest is found truncated.
    m2 = build_method("mae", smoke_cfg, spec)
    with pytest.raises(_Crash):
        train(m2, _crashing(_batches(m2, toy_samples, tokenizer, size), 2, 0), _cfg(epochs=3, ckpt_every=2),
              steps_per_epoch=3, workdir=tmp_path / "b", info=DistInfo(), seed=0)
    newest = tmp_path / "b" / "checkpoint-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    torn = tmp_path / "b" / ".checkpoint-00000007.pt.abc.tmp"  # what a kill during a write leaves
    torn.write_bytes(b"partial")
    m3 = build_method("mae", smoke_cfg, spec)
    summary = train(m3, _batches(m3, toy_samples, tokenizer, size), _cfg(epochs=3, ckpt_every=2), steps_per_epoch=3,
                    workdir=tmp_path / "b", info=DistInfo(), seed=0)
    assert "checkpoint-00000006.pt is unreadable" in capsys.readouterr().err
    assert summary.resumed_from == 4 and summary.steps == 9
    assert not torn.exists()  # the next save cleared it
    for k, v in m1.state_dict().items():
        assert torch.equal(m3.state_dict()[k], v), k  # bitwise: same batches, same RNG, same order of ops
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))  # rows past the checkpoint were cut, not repeated


def test_a_checkpoint_of_another_method_is_a_clear_error(smoke_cfg, spec, toy_samples, tokenizer, tmp_path):
    size = smoke_cfg.encoder.img_size
    mae = build_method("mae", smoke_cfg, spec)
    train(mae, _batches(mae, toy_samples, tokenizer, size), _cfg(epochs=1), steps_per_epoch=3, workdir=tmp_path,
          info=DistInfo(), seed=0, desc="mae")
    simclr = build_method("simclr", smoke_cfg, spec)
    with pytest.raises(CheckpointMismatchError, match="method 'mae'.*trains 'simclr'"):
        train(simclr, _batches(simclr, toy_samples, tokenizer, size), _cfg(epochs=1), steps_per_epoch=3,
              workdir=tmp_path, info=DistInfo(), seed=0, desc="simclr")


def _run(tmp_path: Path, workdir: str, results: str) -> list[str]:
    return [sys.executable, "-m", "mugbench.cli", "run", "--preset", "smoke", "--methods", "mae", "--evals", "knn",
            "--set", "train.epochs=4", "--set", "train.ckpt_every=4", "--cache-dir", str(tmp_path / "cache"),
            "--workdir", str(tmp_path / workdir), "--results", str(tmp_path / results),
            "--reports", str(tmp_path / "reports")]


def test_sigkill_mid_training_then_rerun_equals_an_uninterrupted_run(tmp_path):
    whole = subprocess.run(_run(tmp_path, "whole", "r-whole"), capture_output=True, text=True, env=ENV, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = subprocess.Popen(_run(tmp_path, "killed", "r-killed"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while not list((tmp_path / "killed").rglob("checkpoint-00000012.pt")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: what a preempted node does to a job
    proc.wait()
    run_dir = next((tmp_path / "killed").rglob("checkpoint-00000012.pt")).parent
    assert not (run_dir / "encoder.safetensors").exists()  # killed before training finished
    again = subprocess.run(_run(tmp_path, "killed", "r-killed"), capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    a = load_file(next((tmp_path / "whole").rglob("encoder.safetensors")))
    b = load_file(run_dir / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise on the CPU
    rec = {name: [json.loads(p.read_text()) for p in (tmp_path / name).rglob("*.json")][0]
           for name in ("r-whole", "r-killed")}
    assert rec["r-whole"]["metrics"] == rec["r-killed"]["metrics"] and rec["r-killed"]["steps"] == 32
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 33, 2))  # log_every=2, no row twice


def test_rerun_after_a_crash_in_evaluation_goes_on_from_the_protocol_reached(tmp_path, monkeypatch):
    from mugbench import study
    from mugbench.config import load_config
    from mugbench.eval import EncoderProtocol

    overrides = ["eval.protocols=[knn, linear, finetune]", "eval.datasets=[toy-cls]"]
    cfg = load_config("smoke", overrides)
    calls = []
    for name in ("knn", "linear"):
        real = study.FEATURE_PROTOCOLS[name]
        monkeypatch.setitem(study.FEATURE_PROTOCOLS, name,
                            lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    real_finetune = study.ENCODER_PROTOCOLS["finetune"]

    def crash(*args, **kwargs):
        raise _Crash

    kwargs = dict(workdir=tmp_path / "runs", results_dir=tmp_path / "results", cache_dir=tmp_path / "cache",
                  overrides=overrides, log=lambda *a: None)
    monkeypatch.setitem(study.ENCODER_PROTOCOLS, "finetune", EncoderProtocol(crash, "classification"))
    with pytest.raises(_Crash):
        study.run_study(cfg, ["mae"], **kwargs)
    assert sorted(calls) == ["knn", "linear"] and len(list((tmp_path / "results").rglob("*.json"))) == 2
    monkeypatch.setitem(study.ENCODER_PROTOCOLS, "finetune", real_finetune)
    records = study.run_study(cfg, ["mae"], **kwargs)
    assert sorted(calls) == ["knn", "linear"]  # not evaluated again
    assert sorted(r.protocol for r in records) == ["finetune", "knn", "linear"]
    assert len(list((tmp_path / "results").rglob("*.json"))) == 3
    # Other evaluation settings are another evaluation: everything runs again.
    study.run_study(load_config("smoke", overrides + ["eval.knn_k=5"]), ["mae"],
                    **dict(kwargs, overrides=overrides + ["eval.knn_k=5"]))
    assert sorted(calls) == ["knn", "knn", "linear", "linear"]


def test_resume_cuts_the_log_back_to_the_checkpoint_and_drops_a_torn_last_row(tmp_path):
    from mugbench.train.loop import _truncate_log

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "lo')
    _truncate_log(log, 4)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [2, 4]
