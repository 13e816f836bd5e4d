"""End to end through the real console script: run -> records -> report, and the error paths."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def mugbench(*args, cwd: Path, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MUGBENCH_CACHE=str(cache), HF_HUB_OFFLINE="1")
    env.pop("MUGBENCH_DATA", None)
    return subprocess.run([sys.executable, "-m", "mugbench.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


REPO = Path(__file__).resolve().parents[1]


def git(*args, cwd: Path) -> str:
    """Run git in ``cwd`` (no user config needed) and return its output."""
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One `mugbench run --preset smoke` shared by the tests below, run as a user would in a checkout: a git
    repository holding the project's .gitignore (the data cache lives outside it, as ~/.cache does)."""
    root = tmp_path_factory.mktemp("e2e")
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())
    git("init", "-q", cwd=root)
    git("add", ".gitignore", cwd=root)
    git("commit", "-qm", "checkout", cwd=root)
    start = time.perf_counter()
    proc = mugbench("run", "--preset", "smoke", cwd=root, cache=cache_of(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc, time.perf_counter() - start


def cache_of(root: Path) -> Path:
    """The data cache of the smoke run in ``root``: a sibling folder, outside the checkout."""
    return root.with_name(root.name + "-cache")


def test_run_writes_one_record_per_method_and_protocol(smoke_run):
    root, proc, _ = smoke_run
    files = sorted((root / "results").rglob("*.json"))
    records = [json.loads(f.read_text()) for f in files]
    # Feature protocols for every method; capability protocols only where the method has one.
    # The default methods: the paper's four and the two baselines (`random` is not pre-trained).
    expected = {(m, p) for m in ("simclr", "mae", "clip", "mug", "random", "supervised")
                for p in ("knn", "linear", "finetune")}  # segmentation only when asked (--evals)
    expected |= {("mae", "reconstruction"), ("mug", "reconstruction"), ("mug", "captioning")}
    expected |= {("clip", "zeroshot"), ("mug", "zeroshot"), ("clip", "retrieval")}
    assert sorted((r["method"], r["protocol"]) for r in records) == sorted(expected)
    for r in records:
        trained = r["method"] != "random"
        assert r["preset"] == "smoke" and r["pretrain_data"] == "toy" and r["steps"] == (8 if trained else 0)
        assert (r["timings"]["images_per_s"] > 0) == trained and r["versions"]["torch"]
        # what the report's figures and grouping read: memory, data share, the loss curve, paradigm, command
        assert (r["timings"]["peak_memory_mb"] > 100) == trained and 0 <= r["timings"]["data_share"] < 1
        if trained:
            assert r["loss_curve"]["step"] == [2, 4, 6, 8] and all(math.isfinite(x) for x in r["loss_curve"]["loss"])
        assert r["paradigm"] and r["command"].startswith("mugbench run --preset smoke")
        if r["protocol"] in ("knn", "linear", "finetune", "zeroshot"):
            assert r["dataset"] == "toy-cls" and 0 <= r["metrics"]["top1"] <= 100
        else:
            assert r["dataset"] == "toy-caps"
    linear = next(r for r in records if r["protocol"] == "linear")["protocol_options"]
    assert set(linear["grid_top1"]) == {"0.1", "0.3"} and linear["best_lr"] in (0.1, 0.3)
    finetune = next(r for r in records if r["protocol"] == "finetune")
    assert finetune["metrics"]["top1_last"] <= finetune["metrics"]["top1"]
    modes = {r["method"]: r["protocol_options"]["mode"] for r in records if r["protocol"] == "zeroshot"}
    assert modes == {"clip": "embedding", "mug": "likelihood"}
    retrieval = next(r for r in records if r["protocol"] == "retrieval")["metrics"]
    assert set(retrieval) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    caps = next(r for r in records if r["protocol"] == "captioning")
    assert set(caps["metrics"]) >= {"bleu4", "cider", "shape_named", "colour_named", "shape_or_colour_named"}
    assert len(caps["examples"]) == 8 and all(e["generated"] and e["reference"] for e in caps["examples"])
    for r in records:
        if r["protocol"] == "reconstruction":
            assert r["metrics"]["masked_mse"] > 0
            grid = root / "results" / "toy" / "smoke" / r["method"] / r["protocol_options"]["figure"]
            assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every method trained on the same encoder architecture for the same budget
    assert len({json.dumps(r["encoder"], sort_keys=True) for r in records}) == 1
    # the headline table is printed at the end of the run, then where the full report is
    end = proc.stdout.split("## `toy` / `smoke`")[-1]
    assert "| mae |" in end and "| mug |" in end and "k-NN top1 (toy-cls)" in end
    assert end.rstrip().endswith("(every table: reports/summary.md)") and "Published reference claims" not in end
    assert (root / "reports" / "summary.md").exists()
    # checkpoints and exported encoders live in the run directory, not in results/
    assert len(list((root / "runs").rglob("encoder.safetensors"))) == 6


def test_a_run_in_a_checkout_leaves_git_status_clean(smoke_run):
    root = smoke_run[0]
    assert (root / "results").is_dir() and (root / "reports").is_dir() and (root / "runs").is_dir()
    assert git("status", "--porcelain", "--untracked-files=all", cwd=root) == ""


def test_fresh_moves_the_old_run_aside_and_starts_over(smoke_run):
    root = smoke_run[0]
    args = ("run", "--preset", "smoke", "--methods", "random", "--evals", "knn,segmentation")
    first = mugbench(*args, cwd=root, cache=cache_of(root))
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = next(p for p in (root / "runs").rglob("random-seed0-*") if ".old-" not in p.name)
    seg, knn = (next((root / "results").rglob(f"random/{name}-seed0.json")) for name in ("segmentation-toy-seg", "knn-toy-cls"))
    before = {path: json.loads(path.read_text()) for path in (seg, knn)}
    assert 0 <= before[seg]["metrics"]["background_mIoU"] <= before[seg]["metrics"]["mIoU"] + 1e-6
    again = mugbench(*args, "--fresh", cwd=root, cache=cache_of(root))
    assert again.returncode == 0, again.stderr[-2000:]
    aside = [p for p in run_dir.parent.iterdir() if p.name.startswith(run_dir.name + ".old-")]
    assert len(aside) == 1 and f"moved to {aside[0].relative_to(root)}" in again.stdout
    # the old run is kept whole (its evaluation progress too); the new one evaluated everything again
    assert (aside[0] / "encoder.safetensors").exists() and (aside[0] / "eval" / "progress.json").exists()
    assert "recorded before the interruption" not in again.stdout
    after = {path: json.loads(path.read_text()) for path in (seg, knn)}
    assert all(after[p]["created"] != before[p]["created"] for p in (seg, knn))
    assert after[knn]["metrics"] == before[knn]["metrics"]  # the same untrained encoder, the same k-NN


def test_report_rebuilds_from_results_alone(smoke_run):
    root, proc, _ = smoke_run
    (root / "reports" / "summary.md").unlink()
    out = mugbench("report", cwd=root, cache=root / "nonexistent-cache")
    assert out.returncode == 0, out.stderr
    text = (root / "reports" / "summary.md").read_text()
    assert "| clip |" in text and "Published reference claims" in text
    assert text.strip() in out.stdout


def test_rerun_resumes_instead_of_retraining(smoke_run):
    root, _, first = smoke_run
    start = time.perf_counter()
    proc = mugbench("run", "--preset", "smoke", "--methods", "mae", "--set", "eval.protocols=[knn]",
                    cwd=root, cache=cache_of(root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "8 steps" in proc.stdout
    assert time.perf_counter() - start < first


def test_missing_cc3m_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    proc = mugbench("run", "--methods", "mae,clip,mug", "--data", "cc3m", "--data-root", str(tmp_path / "data"),
                    cwd=tmp_path, cache=tmp_path / "cache")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2
    assert "cc3m" in proc.stderr and str(tmp_path / "data") in proc.stderr and "img2dataset" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 5.0, f"took {elapsed:.1f}s"


def test_missing_ade20k_fails_before_training_with_instructions(tmp_path):
    proc = mugbench("run", "--preset", "smoke", "--methods", "mae", "--evals", "segmentation",
                    "--set", "eval.datasets=[ade20k]", "--data-root", str(tmp_path / "data"),
                    cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ADEChallengeData2016" in proc.stderr and str(tmp_path / "data") in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing half-written


@pytest.mark.parametrize("args,needle", [
    (["run", "--methods", "mae,nope"], "Registered methods"),
    (["run", "--set", "train.epoch=2"], "train.epoch"),
    (["run", "--preset", "smoke", "--set", "methods.mae.mask_ratio=2"], "mask_ratio"),
    (["run", "--preset", "smoke", "--set", "methods.mug.not_an_option=1"], "not_an_option"),
    (["run", "--preset", "smoke", "--set", "eval.protocols=[knn, lineer]"], "lineer"),
    (["run", "--preset", "nope"], "Unknown preset 'nope'"),
    (["run", "--preset", "smoke", "--data", "nope"], "Unknown pre-training data 'nope'"),
    (["run", "--preset", "smoke", "--set", "eval.datasets=[toy-cls, nope]"], "Unknown evaluation set 'nope'"),
    (["run", "--preset", "smoke", "--set", "train.epochs=abc"], "train.epochs='abc' has the wrong type"),
    (["run", "--preset", "smoke", "--set", "train.batch_size=1.5"], "expected int"),
])
def test_bad_input_is_one_clear_error(args, needle, tmp_path):
    proc = mugbench(*args, cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists()


def test_methods_lists_needs_and_capabilities(tmp_path):
    proc = mugbench("methods", cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line and not line.startswith(" ")}
    assert {"mae", "clip", "mug"} <= set(lines)
    assert "image only" in lines["mae"] and "image+text" in lines["clip"]
    assert "encode_text" in lines["clip"] and "encode_image" in lines["clip"]


def test_protocols_lists_protocols_with_options_and_the_evaluation_sets(tmp_path):
    proc = mugbench("protocols", cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    head, sets = proc.stdout.split("\nevaluation sets")
    lines = {line.split()[0]: line for line in head.splitlines()[1:] if line and not line.startswith(" ")}
    assert list(lines) == ["knn", "linear", "finetune", "segmentation", "zeroshot", "retrieval", "captioning",
                           "reconstruction"]  # report order (Protocol.order)
    assert '"k-NN": reads features, classification set; headline top1; transfer (ranked)' in lines["knn"]
    assert "reads method, captions set, needs encode_text; headline i2t_r1, t2i_r1; capability" in lines["retrieval"]
    assert "options: k=20, temperature=0.07" in head and "options: iters=160000," in head
    assert "Weighted k-NN top-1" in head
    where = {line.split()[0]: line.split()[1:] for line in sets.splitlines()[1:] if line}
    assert where["toy-cls"] == ["classification", "generated"] and where["imagenet"] == ["classification", "imagenet"]
    assert where["ade20k"] == ["segmentation", "ade20k/ADEChallengeData2016"] and where["coco-caps"][0] == "captions"


def test_eval_of_an_exported_encoder_reproduces_the_record(smoke_run):
    root = smoke_run[0]
    encoder = next((root / "runs").rglob("mae-seed0-*/encoder.safetensors"))
    proc = mugbench("eval", "--checkpoint", str(encoder), "--preset", "smoke", "--results", "eval-results",
                    cwd=root, cache=cache_of(root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(next((root / "results").rglob("mae/knn-toy-cls-seed0.json")).read_text())
    again = json.loads(next((root / "eval-results").rglob("mae/knn-toy-cls-seed0.json")).read_text())
    assert again["metrics"] == record["metrics"] and f"top1={record['metrics']['top1']:.2f}" in proc.stdout


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = mugbench("eval", "--checkpoint", str(tmp_path / "nope.safetensors"), cwd=tmp_path, cache=tmp_path / "c")
    assert proc.returncode == 2 and "nope.safetensors" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("data", ["cc3m", "cc12m", "laion400m"])
def test_a_web_scale_set_without_preset_runs_the_paper_preset(data, tmp_path):
    # The mission's command: the named sets are the paper's data, so they get the paper's setting, and the
    # first line says so before the missing set is named in one paragraph.
    empty = tmp_path / "data"
    empty.mkdir()
    proc = mugbench("run", "--methods", "mae", "--data", data, "--data-root", str(empty),
                    cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stdout.splitlines()[0] == \
        f"preset: paper (the default for the web-scale set {data}; --preset toy for a quick look)"
    error = proc.stderr.strip()
    assert error.count("\n") == 0 and f"Pre-training set '{data}' was not found" in error and str(empty) in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and list(empty.iterdir()) == []  # nothing written


@pytest.mark.parametrize("args,first_line", [
    (["--preset", "toy", "--data", "cc3m"], "preset: toy (given with --preset)"),  # an explicit preset wins
    (["--preset", "smoke"], "preset: smoke (given with --preset)"),
    ([], "preset: toy (the default for the embedded world; --preset paper with --data cc3m for the paper's setting)"),
    (["--data", "toy"], "preset: toy (the default for the embedded world; --preset paper with --data cc3m for the "
                        "paper's setting)"),
    (["--data", "shards/{00000..00003}.tar"],
     "preset: toy (the default for a shard pattern; --preset paper for the paper's ViT-B/16 setting)"),
])
def test_the_first_line_names_the_preset_and_why(args, first_line, tmp_path):
    # An unknown method stops the run right after the preset is chosen: nothing is trained or written.
    proc = mugbench("run", "--methods", "nope", *args, "--data-root", str(tmp_path / "data"),
                    cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stdout.splitlines()[0] == first_line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
