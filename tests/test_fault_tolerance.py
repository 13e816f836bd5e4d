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

from mugbench.runs import build_method
from mugbench.train.checkpoint import load_checkpoint, run_checkpoints
from mugbench.train.distributed import DistInfo
from mugbench.train.loop import CheckpointMismatchError, train

from test_train import _batches, _cfg, _Crash, _crashing

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


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
    # clip in two micro-batches per step (the two-pass accumulation): a kill lands mid-step as often as not,
    # and the rerun replays the global sample stream up to the checkpoint. (With loader workers too: the slow
    # test_distributed_eval_slow kill test, under torchrun.)
    return [sys.executable, "-m", "mugbench.cli", "run", "--preset", "smoke", "--methods", "clip", "--evals", "knn",
            "--set", "train.epochs=4", "--set", "train.ckpt_every=4", "--set", "train.accum_steps=2",
            "--cache-dir", str(tmp_path / "cache"),
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
    from mugbench.registry import get_protocol

    overrides = ["eval.protocols=[knn, linear, finetune]", "eval.datasets=[toy-cls]"]
    cfg = load_config("smoke", overrides)
    calls = []
    for name in ("knn", "linear"):
        protocol = get_protocol(name)
        monkeypatch.setattr(protocol, "run", lambda self, *a, _real=protocol.run, _name=name, **k:
                            (calls.append(_name), _real(self, *a, **k))[1])
    finetune = get_protocol("finetune")
    real_finetune = finetune.run

    def crash(*args, **kwargs):
        raise _Crash

    kwargs = dict(workdir=tmp_path / "runs", results_dir=tmp_path / "results", cache_dir=tmp_path / "cache",
                  overrides=overrides, log=lambda *a: None)
    monkeypatch.setattr(finetune, "run", crash)
    with pytest.raises(_Crash):
        study.run_study(cfg, ["mae"], **kwargs)
    assert sorted(calls) == ["knn", "linear"] and len(list((tmp_path / "results").rglob("*.json"))) == 2
    monkeypatch.setattr(finetune, "run", real_finetune)
    records = study.run_study(cfg, ["mae"], **kwargs)
    assert sorted(calls) == ["knn", "linear"]  # not evaluated again
    assert sorted(r.protocol for r in records) == ["finetune", "knn", "linear"]
    assert len(list((tmp_path / "results").rglob("*.json"))) == 3
    # Other evaluation settings are another evaluation: everything runs again.
    study.run_study(load_config("smoke", overrides + ["eval.knn.k=5"]), ["mae"],
                    **dict(kwargs, overrides=overrides + ["eval.knn.k=5"]))
    assert sorted(calls) == ["knn", "knn", "linear", "linear"]


def test_resume_cuts_the_log_back_to_the_checkpoint_and_drops_a_torn_last_row(tmp_path):
    from mugbench.train.loop import _truncate_log

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "lo')
    _truncate_log(log, 4)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [2, 4]


def _study_args(tmp_path: Path, results: str) -> list[str]:
    return ["run", "--methods", "mae", "--preset", "smoke", "--evals", "knn", "--results", str(tmp_path / results),
            "--workdir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
            "--reports", str(tmp_path / "reports")]


def test_every_results_folder_gets_its_records(tmp_path, capsys):
    from mugbench.cli import main

    def records(results):
        return [json.loads(p.read_text()) for p in (tmp_path / results).rglob("knn-*.json")]

    assert main(_study_args(tmp_path, "A")) == 0
    capsys.readouterr()
    # Same run folder, another results folder: A's records are no proof that B has them.
    assert main(_study_args(tmp_path, "B")) == 0
    assert "recorded before the interruption" not in capsys.readouterr().out
    (a,), (b,) = records("A"), records("B")
    assert a["metrics"] == b["metrics"] and a["steps"] == b["steps"] == 8  # the same encoder, evaluated again
    assert a["run_id"] != b["run_id"]
    # Back to A: its bookkeeping survived B's, so the evaluation is skipped and A's record kept.
    assert main(_study_args(tmp_path, "A")) == 0
    assert "knn on toy-cls: recorded before the interruption" in capsys.readouterr().out
    assert records("A") == [a]


def test_a_kill_before_the_first_checkpoint_logs_each_step_once(smoke_cfg, spec, toy_samples, tokenizer, tmp_path):
    size = smoke_cfg.encoder.img_size
    cfg = _cfg(epochs=2, ckpt_every=100)  # log_every=1; the one checkpoint is the last step's (6)
    whole = build_method("mae", smoke_cfg, spec)
    train(whole, _batches(whole, toy_samples, tokenizer, size), cfg, steps_per_epoch=3, workdir=tmp_path / "whole",
          info=DistInfo(), seed=0)
    m1 = build_method("mae", smoke_cfg, spec)
    with pytest.raises(_Crash):  # during step 5: steps 1-4 logged, no checkpoint yet
        train(m1, _crashing(_batches(m1, toy_samples, tokenizer, size), 1, 1), cfg, steps_per_epoch=3,
              workdir=tmp_path / "killed", info=DistInfo(), seed=0)
    assert not run_checkpoints(tmp_path / "killed")
    assert len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) == 4
    m2 = build_method("mae", smoke_cfg, spec)
    summary = train(m2, _batches(m2, toy_samples, tokenizer, size), cfg, steps_per_epoch=3,
                    workdir=tmp_path / "killed", info=DistInfo(), seed=0)
    assert summary.resumed_from == 0 and summary.loss_curve["step"] == list(range(1, 7))
    rows = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("whole", "killed")]
    assert [json.loads(r)["loss"] for r in rows[1]] == [json.loads(r)["loss"] for r in rows[0]]  # restarted cleanly


def test_unreadable_checkpoints_stop_the_run_and_change_nothing(smoke_cfg, spec, toy_samples, tokenizer, tmp_path):
    from mugbench.errors import user_errors
    from mugbench.train.checkpoint import UnreadableCheckpointError

    size = smoke_cfg.encoder.img_size
    m1 = build_method("mae", smoke_cfg, spec)
    train(m1, _batches(m1, toy_samples, tokenizer, size), _cfg(epochs=1, ckpt_every=1), steps_per_epoch=3,
          workdir=tmp_path, info=DistInfo(), seed=0)
    kept = run_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["checkpoint-00000003.pt", "checkpoint-00000002.pt"]
    for p in kept:
        p.write_bytes(p.read_bytes()[:1000])  # a disk that filled up
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    m2 = build_method("mae", smoke_cfg, spec)
    with pytest.raises(UnreadableCheckpointError) as caught:
        train(m2, _batches(m2, toy_samples, tokenizer, size), _cfg(epochs=2, ckpt_every=1), steps_per_epoch=3,
              workdir=tmp_path, info=DistInfo(), seed=0)
    message = str(caught.value)
    assert isinstance(caught.value, user_errors()) and "\n" not in message  # one paragraph from the CLI
    assert all(str(p) in message for p in kept) and "move" in message and "step 0" in message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing lost or rewritten


_HOLDER = """
import sys, time
from pathlib import Path
from mugbench.train.run_lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_a_locked_run_folder_is_refused_at_once(tmp_path, capsys):
    import socket

    from mugbench.cli import main
    from mugbench.config import load_config
    from mugbench.runs import run_dir_for
    from mugbench.train.run_lock import RunLockedError, run_lock

    run_dir = run_dir_for(tmp_path / "runs", load_config("smoke", []), "mae")  # the folder `_study_args` trains in
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_study_args(tmp_path, "results")) == 2
        err = capsys.readouterr().err
        assert err.startswith("mugbench: error: ") and err.count("\n") == 1
        assert f"pid {holder.pid} on {socket.gethostname()}" in err and str(run_dir) in err
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # refused before any training
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with run_lock(run_dir):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the OS drops the lock
        holder.wait()
    with run_lock(run_dir):
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    with run_lock(run_dir):  # released on leaving the block
        pass
