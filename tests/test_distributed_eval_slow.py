"""Every rank of a torchrun job evaluates (slow tier: real torchrun processes over gloo on the CPU).

The records of `mugbench eval` under two ranks equal one process's; a study finishes although its longest
protocol outlasts the process-group timeout; a job killed in training and in evaluation resumes to the
records of an uninterrupted one; two simulated nodes with node-local caches each prepare their own.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gloo import free_port

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
MUGBENCH = ["-m", "mugbench.cli"]
# The fine-tuning recipe without the draws each rank makes for its own rows (drop path, Mixup/CutMix):
# what is left to differ between one process and two ranks is the order in which float sums are taken.
RANK_INVARIANT_FINETUNE = ["--set", "eval.finetune.drop_path=0", "--set", "eval.finetune.mixup=0",
                           "--set", "eval.finetune.cutmix=0", "--set", "eval.finetune.epochs=2"]


def _env(tmp_path: Path, cache: str = "cache") -> dict:
    # One thread per process in both launches, so that a rank runs the kernels one process runs.
    return dict(os.environ, HF_HUB_OFFLINE="1", MUGBENCH_CACHE=str(tmp_path / cache), OMP_NUM_THREADS="1")


def _run(cmd: list[str], tmp_path: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=tmp_path, env=env or _env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc


def _records(folder: Path) -> dict:
    """Result records under ``folder`` by (method, protocol, dataset)."""
    out = {}
    for path in folder.rglob("*.json"):
        record = json.loads(path.read_text())
        key = (record["method"], record["protocol"], record["dataset"])
        assert key not in out, f"{key} written twice"
        out[key] = record
    return out


@pytest.mark.slow
def test_eval_under_torchrun_gives_the_one_process_records(tmp_path):
    """A clip and a mug smoke run, evaluated with every protocol in one process and under two ranks."""
    _run([sys.executable, *MUGBENCH, "run", "--preset", "smoke", "--methods", "clip,mug", "--evals", "knn"], tmp_path)
    evals = ["--evals", "knn,linear,finetune,zeroshot,retrieval,captioning,reconstruction,segmentation",
             *RANK_INVARIANT_FINETUNE, "--set", "eval.segmentation.iters=20"]
    seconds = {}
    for run_dir in sorted((tmp_path / "runs").glob("toy/smoke/*-seed0-*")):
        for name, launch in (("one", [sys.executable]), ("two", [*TORCHRUN, "--standalone", "--nproc-per-node", "2"])):
            start = time.perf_counter()
            proc = _run([*launch, *MUGBENCH, "eval", "--checkpoint", str(run_dir), *evals,
                         "--results", f"results-{name}"], tmp_path)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            assert proc.stdout.count("written:") == 1  # rank 0 alone reports
    one, two = _records(tmp_path / "results-one"), _records(tmp_path / "results-two")
    assert one.keys() == two.keys() and len(one) == 6 + 7  # clip: 4 encoder protocols, zeroshot, retrieval; mug: 4, zeroshot, captioning, reconstruction
    for key, record in one.items():
        other = two[key]
        assert record["timings"]["eval_world_size"] == 1 and other["timings"]["eval_world_size"] == 2
        if key[1] in ("finetune", "segmentation"):
            continue
        # Frozen features and capabilities: each rank computes whole one-process batches, so the
        # records are identical, per-example outcomes included.
        assert other["metrics"] == record["metrics"], key
        assert other["per_example"] == record["per_example"] and other["examples"] == record["examples"], key
    for method in ("clip", "mug"):
        # Fine-tuning: the same global batches and crops; DDP averages the two halves' gradients, a float sum
        # in another order than one process's mean over the batch, which may flip a near-tie image: one
        # of the 64 val images (1.6 points) per epoch at most.
        a, b = one[(method, "finetune", "toy-cls")], two[(method, "finetune", "toy-cls")]
        for x, y in zip(a["protocol_options"]["top1_per_epoch"], b["protocol_options"]["top1_per_epoch"]):
            assert abs(x - y) <= 100 / 64 + 1e-9, (method, a["protocol_options"], b["protocol_options"])
    # Segmentation: per-rank BatchNorm statistics on the CPU (torch's SyncBatchNorm needs CUDA) on top of
    # the reduction order: 20 iterations of 8 crops split 4 + 4 stay within 10 mIoU points.
    a, b = one[("mug", "segmentation", "toy-seg")], two[("mug", "segmentation", "toy-seg")]
    assert abs(a["metrics"]["mIoU"] - b["metrics"]["mIoU"]) <= 10.0, (a["metrics"], b["metrics"])
    print(f"\nmugbench eval, clip + mug, every protocol: one process {seconds['one']:.0f} s, two ranks "
          f"{seconds['two']:.0f} s (one thread each)")


@pytest.mark.slow
def test_a_study_outlasting_the_process_group_timeout_finishes(tmp_path):
    """Segmentation longer than the 15-second timeout: rank 1 used to move on to the next method and wait
    for rank 0 in its first collective, past the timeout; now both train UperNet."""
    proc = _run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", *MUGBENCH, "run", "--preset", "smoke",
                 "--methods", "mae,random", "--evals", "knn,segmentation", "--set", "train.dist_timeout_min=0.25",
                 "--set", "eval.segmentation.iters=1000"], tmp_path)
    records = _records(tmp_path / "results")
    assert sorted(records) == [(m, p, d) for m in ("mae", "random") for p, d in (("knn", "toy-cls"),
                                                                                ("segmentation", "toy-seg"))]
    longest = max(r["timings"]["eval_s"] for r in records.values() if r["protocol"] == "segmentation")
    print(f"\nlongest segmentation: {longest:.0f} s against a 15 s timeout")
    assert longest > 15, "the protocol must outlast the timeout for this test to mean anything"
    assert proc.stdout.count("full report:") == 1


def _torchrun_study(tmp_path: Path, results: str) -> list[str]:
    return [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *MUGBENCH, "run", "--preset", "smoke",
            "--methods", "mae", "--evals", "knn,linear,finetune", "--set", "train.ckpt_every=2",
            "--set", "train.accum_steps=2", "--set", "data.num_workers=1",  # killed mid-step, streams in workers
            "--set", "eval.finetune.epochs=6", "--workdir", f"runs-{results}", "--results", results]


def _run_until(cmd: list[str], tmp_path: Path, ready) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the whole group (torchrun and its ranks) as soon
    as ``ready()`` holds; the job must not have finished by then."""
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not ready():
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_kill_and_rerun_under_torchrun_equals_an_uninterrupted_job(tmp_path):
    """Killed after the fourth of eight steps, then in fine-tuning after the k-NN and probe records; each
    rerun resumes, and the records equal an uninterrupted job's bit for bit."""
    _run(_torchrun_study(tmp_path, "whole"), tmp_path)
    cmd = _torchrun_study(tmp_path, "killed")

    def logged_steps() -> int:
        logs = list((tmp_path / "runs-killed").glob("toy/smoke/mae-*/metrics.jsonl"))
        return len(logs[0].read_text().splitlines()) if logs else 0

    _run_until(cmd, tmp_path, lambda: logged_steps() >= 2)  # rows every 2 steps: step 4 is checkpointed
    assert not list((tmp_path / "killed").rglob("*.json"))
    _run_until(cmd, tmp_path, lambda: len(list((tmp_path / "killed").rglob("*.json"))) >= 2)
    assert len(list((tmp_path / "killed").rglob("*.json"))) < 3
    _run(cmd, tmp_path)
    whole, killed = _records(tmp_path / "whole"), _records(tmp_path / "killed")
    assert whole.keys() == killed.keys() and len(whole) == 3
    for key, record in whole.items():
        for field in ("metrics", "per_example", "loss_curve", "protocol_options", "steps"):
            assert killed[key][field] == record[field], (key, field)


@pytest.mark.slow
def test_two_nodes_with_node_local_caches_each_prepare_their_own(tmp_path):
    """Two torchrun agents as two nodes of one process each, every node with its own MUGBENCH_CACHE (as on
    node-local scratch) and one shared work and results folder."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
               "--master-addr", "127.0.0.1", "--master-port", str(port), *MUGBENCH, "run", "--preset", "smoke",
               "--methods", "mae,clip", "--evals", "knn,retrieval"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path, f"cache-node{node}"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-6000:]
    for node in (0, 1):  # each node generated the embedded world (and its vocabulary) into its own cache
        assert list((tmp_path / f"cache-node{node}").glob("toy/*/manifest.json"))
    assert sorted(_records(tmp_path / "results")) == [("clip", "knn", "toy-cls"), ("clip", "retrieval", "toy-caps"),
                                                       ("mae", "knn", "toy-cls")]
    assert outputs[0][0].count("full report:") == 1 and "full report:" not in outputs[1][0]
