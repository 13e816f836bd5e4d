"""Same seed, same numbers: pre-training and every protocol depend on the study's seed alone.

Nothing a protocol or method leaves behind in the process (the global torch, Python and numpy
RNG states) may change the numbers of what runs after it, and a rerun of the same command in
fresh folders gives identical records. `_scramble` stands in for "whatever ran before".
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mugbench.config import load_config
from mugbench.models.vit import build_encoder
from mugbench.data.pretrain import build_tokenizer, resolve_data, text_spec
from mugbench.eval.harness import evaluate
from mugbench.evalset import EvalSets
from mugbench.runs import build_method
from mugbench.study import run_study

# Fields of a record that say when, where and by which process it was made, not what it measured.
PROVENANCE = {"timings", "run_id", "created", "host", "versions", "git_commit", "command"}


def _scramble(state: int) -> None:
    """Leave the process's global RNGs as some earlier protocol or method might have."""
    random.seed(state)
    np.random.seed(state)
    torch.manual_seed(state)
    np.random.rand(state % 7 + 1), random.random(), torch.rand(state % 5 + 1)


def _numbers(record) -> dict:
    """Everything a record measured: metrics, loss curve, protocol options, examples, counts."""
    return {k: v for k, v in record.to_dict().items() if k not in PROVENANCE}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One generated smoke world for the whole module."""
    return tmp_path_factory.mktemp("cache")


def _study(*overrides: str):
    return load_config("smoke", list(overrides))


def test_pretraining_with_loader_workers_repeats_exactly_whatever_ran_before(cache, tmp_path):
    """Two runs of one method in fresh folders, two DataLoader workers, different global RNG states
    before each: identical loss curves, features and probe numbers."""
    cfg = _study("eval.protocols=[knn,linear]", "data.num_workers=2")
    runs = []
    for state in (1, 2):
        _scramble(state)
        out = tmp_path / str(state)
        records = run_study(cfg, ["simclr"], workdir=out / "w", results_dir=out / "r", cache_dir=cache,
                            log=lambda *a, **k: None)
        runs.append({(r.protocol, r.dataset): _numbers(r) for r in records})
    assert runs[0].keys() == {("knn", "toy-cls"), ("linear", "toy-cls")}
    assert runs[0] == runs[1]
    assert len(runs[0][("knn", "toy-cls")]["loss_curve"]["loss"]) == 4  # 8 steps, logged every 2


def test_finetune_gives_the_same_numbers_alone_or_after_other_protocols(cache):
    """Fine-tuning draws from torch, Python's ``random`` (RandAugment, erasing) and numpy (timm's
    Mixup / CutMix, RandAugment's op choice): all three are seeded by the protocol, so running it
    after the frozen-feature protocols, or after anything else, changes nothing."""
    alone, after = _study("eval.protocols=[finetune]"), _study("eval.protocols=[knn,linear,finetune]")
    encoder = build_encoder(alone.encoder, seed=0)
    results = []
    for state, cfg in ((1, alone), (2, after)):
        _scramble(state)
        out = evaluate(encoder, cfg, EvalSets(cfg, cache), "cpu")
        results.append(next((r.metrics, r.options) for r in out if r.protocol == "finetune"))
    (metrics, options), (metrics_after, options_after) = results
    assert metrics == metrics_after
    assert options["top1_per_epoch"] == options_after["top1_per_epoch"]


def test_segmentation_trains_the_same_weights_whatever_ran_before(cache, tmp_path):
    """mmengine seeds torch, Python and numpy (its ``randomness``); the head's init, the sampler and
    mmseg's random resize / crop / flip / photometric distortion follow the seed alone."""
    cfg = _study("eval.protocols=[segmentation]", "eval.segmentation.iters=4")
    encoder = build_encoder(cfg.encoder, seed=0)
    runs = []
    for state in (1, 2):
        _scramble(state)
        out = evaluate(encoder, cfg, EvalSets(cfg, cache), "cpu", workdir=tmp_path / str(state))
        weights = torch.load(tmp_path / str(state) / "segmentation-toy-seg" / "iter_4.pth",
                             weights_only=True)["state_dict"]
        runs.append((out[0].metrics, weights))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].keys() == runs[1][1].keys()
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@pytest.mark.parametrize("name", ["mug", "clip"])
def test_capability_protocols_repeat_exactly_whatever_ran_before(cache, tmp_path, name):
    """Zero-shot, retrieval, captioning and reconstruction (masks drawn from the seed) of an
    untrained method give the same numbers and captions after different global RNG states."""
    cfg = _study("eval.protocols=[zeroshot,retrieval,captioning,reconstruction]")
    tokenizer = build_tokenizer(cfg, resolve_data(cfg, None, cache, log=lambda *a: None))
    method = build_method(name, cfg, text_spec(cfg, tokenizer))
    runs = []
    for state in (1, 2):
        _scramble(state)
        out = evaluate(method, cfg, EvalSets(cfg, cache), "cpu", tokenizer=tokenizer,
                       artifact_stem=lambda p, d, state=state: tmp_path / f"{state}-{p}-{d}")
        runs.append([(r.protocol, r.dataset, r.metrics, {k: v for k, v in r.options.items() if k != "figure"},
                      r.examples) for r in out])
    expected = {"mug": {"zeroshot", "captioning", "reconstruction"}, "clip": {"zeroshot", "retrieval"}}[name]
    assert {r[0] for r in runs[0]} == expected
    assert runs[0] == runs[1]


def test_records_trained_on_cuda_say_they_are_not_bitwise_repeatable():
    """CPU records carry nothing extra (they repeat exactly, above); CUDA ones name the kernels."""
    from mugbench.eval.determinism import determinism_note

    assert determinism_note("cpu") == {}
    assert "atomic adds" in determinism_note(torch.device("cuda", 0))["determinism"]


ALL_PROTOCOLS = "knn,linear,finetune,segmentation,zeroshot,retrieval,captioning,reconstruction"


@pytest.mark.slow
def test_smoke_study_twice_gives_identical_records(tmp_path):
    """The issue's acceptance test: the default study at the smoke preset, all 8 methods and every
    protocol, run twice with one seed into fresh folders: identical records (metrics, loss curves,
    options, generated captions), provenance aside."""
    from mugbench.cli import main
    from mugbench.results import ResultRecord

    methods = "mae,simclr,clip,slip,flip,coca,cap,mug"
    records = []
    for run in ("first", "second"):
        out = tmp_path / run
        main(["run", "--preset", "smoke", "--methods", methods, "--seeds", "0", "--evals", ALL_PROTOCOLS,
              "--workdir", str(out / "w"),
              "--results", str(out / "r"), "--reports", str(out / "p"), "--cache-dir", str(tmp_path / "cache")])
        found = [ResultRecord.from_dict(json.loads(p.read_text())) for p in sorted((out / "r").rglob("*.json"))]
        records.append({(r.method, r.protocol, r.dataset): _numbers(r) for r in found if r.protocol})
    assert {m for m, _, _ in records[0]} == set(methods.split(","))
    assert {p for _, p, _ in records[0]} == set(ALL_PROTOCOLS.split(","))
    differing = sorted(k for k in records[0] if records[0][k] != records[1].get(k))
    assert records[0].keys() == records[1].keys() and not differing, differing
