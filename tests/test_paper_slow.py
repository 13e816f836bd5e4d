"""The `paper` preset end to end (slow tier): ViT-B/16 at 224, the paper's text towers, MAE's decoder and
UperNet at 512 crops, on a miniature data root in the real layouts (`paper_world`), with only the budgets cut.

What the fast tier cannot show: that the paper's own setting runs through every protocol it names, on data
laid out as img2dataset, ImageNet, ADE20K and Karpathy's COCO split ship it, and ends in a report.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mugbench.config import load_config
from paper_world import build_paper_world

# Budgets only (epochs, iterations, batch sizes): every architecture and recipe setting stays the preset's.
# One pre-training step of 4 samples, one probe epoch, one fine-tuning step of 8, one UperNet iteration of 2
# crops (its BatchNorm needs more than one).
# data.streams: the miniature download has 2 shards, and every one of the preset's 64 streams needs one.
BUDGET = ["train.epochs=0.5", "train.batch_size=4", "train.warmup_epochs=0", "data.streams=2",
          "eval.batch_size=8",
          "eval.linear.epochs=1", "eval.linear.batch_size=8", "eval.linear.warmup_epochs=0",
          "eval.finetune.epochs=1", "eval.finetune.batch_size=8", "eval.finetune.warmup_epochs=0",
          "eval.segmentation.iters=1", "eval.segmentation.batch_size=2", "eval.segmentation.warmup_iters=0"]
TRANSFER = {("knn", "imagenet"), ("linear", "imagenet"), ("finetune", "imagenet"), ("segmentation", "ade20k")}
# Capability protocols: clip has encode_text (zero-shot by prompt embeddings, retrieval); mug has caption,
# score_text (zero-shot by prompt likelihood) and reconstruct.
EXPECTED = {  # in run order (--methods mug,clip)
    "mug": TRANSFER | {("zeroshot", "imagenet"), ("captioning", "coco-caps"), ("reconstruction", "coco-caps")},
    "clip": TRANSFER | {("zeroshot", "imagenet"), ("retrieval", "coco-caps")},
}
VIT_B16 = {"timm_name": "vit_base_patch16_224", "img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12,
           "num_heads": 12}


def phase_times(records: list[dict]) -> list[tuple[str, float]]:
    """``(phase, seconds)`` from the records' own timings, in the order the run went: each method's
    pre-training, then its evaluations in the preset's protocol order."""
    order = load_config("paper").eval.protocols
    rows, seen = [], set()
    for r in sorted(records, key=lambda r: (list(EXPECTED).index(r["method"]), order.index(r["protocol"]))):
        if r["method"] not in seen:
            seen.add(r["method"])
            rows.append((f"{r['method']} pre-training", r["timings"]["pretrain_s"]))
        rows.append((f"{r['method']} {r['protocol']} on {r['dataset']}", r["timings"]["eval_s"]))
    return rows


@pytest.mark.slow
def test_paper_preset_runs_every_protocol_on_the_real_layouts(tmp_path):
    world = build_paper_world(tmp_path / "data")
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, MUGBENCH_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    env.pop("MUGBENCH_DATA", None)
    cmd = [sys.executable, "-m", "mugbench.cli", "run", "--preset", "paper", "--methods", ",".join(EXPECTED),
           "--data", world["pattern"], "--data-root", str(world["root"])]
    for item in BUDGET:
        cmd += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n" + proc.stderr[-5000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "preset: paper (given with --preset)"
    # paper.yaml pins no epoch length: img2dataset's stats files give this download's.
    assert f"samples per epoch: {world['samples']} from img2dataset stats files" in lines

    records = [json.loads(p.read_text()) for p in (work / "results").rglob("*.json")]
    found = {m: {(r["protocol"], r["dataset"]) for r in records if r["method"] == m} for m in EXPECTED}
    assert found == EXPECTED
    # Between them the two methods go through every protocol the preset names (a protocol added to
    # paper.yaml then needs its place in EXPECTED).
    assert {p for pairs in found.values() for p, _ in pairs} == set(load_config("paper").eval.protocols)
    for r in records:
        where = (r["method"], r["protocol"], r["dataset"])
        assert r["preset"] == "paper" and r["pretrain_data"] == world["pattern"], where
        assert r["metrics"] and all(math.isfinite(v) for v in r["metrics"].values()), (where, r["metrics"])
        # The paper's architecture, as every record states it: ViT-B/16 at 224, 12-layer 768-wide text towers.
        assert {k: r["encoder"][k] for k in VIT_B16} == VIT_B16, where
        assert (r["conditions"]["text"]["layers"], r["conditions"]["text"]["width"]) == (12, 768), where
        assert r["steps"] == 1 and r["skipped_samples"] == {}, where
        if r["method"] == "mug":  # MAE's decoder under MUG's masked latent
            options = r["method_options"]
            assert (options["decoder_depth"], options["decoder_width"], options["mask_ratio"]) == (8, 512, 0.75)
        if r["protocol"] == "segmentation":  # UperNet at the paper's crop and width
            options = r["protocol_options"]
            assert (options["head"], options["crop"], options["channels"]) == ("UPerHead+FCNHead", 512, 512)
    assert (work / "reports" / "README.md").is_file()

    print(f"\n{shlex.join(cmd)}\npaper preset, {' + '.join(EXPECTED)} on the miniature world: {elapsed:.0f} s")
    for phase, seconds in phase_times(records):
        print(f"  {phase:40s} {seconds:7.1f} s")
    print("\n".join(line for line in lines if line.startswith("[")))  # the run's own phase lines
    # ViT-B checkpoints with their AdamW moments, and UperNet's: about 10 GB that pytest would keep for
    # its last three sessions. Kept when the test fails (above), for a look at what went wrong.
    shutil.rmtree(work / "runs")


def test_the_miniature_world_is_deterministic_and_in_the_layouts_the_preset_reads(tmp_path):
    # The fast tier's guard on the slow test's data: same bytes on every build, img2dataset's stats files
    # agree with what the tars hold, and the preflight finds every evaluation set of the preset.
    from mugbench.data.catalog import expand_urls
    from mugbench.data.shard_count import count_samples, count_shard
    from mugbench.preflight import check_study

    first, again = build_paper_world(tmp_path / "a"), build_paper_world(tmp_path / "b")

    def files(root: Path) -> dict:
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert files(first["root"]) == files(again["root"])
    urls = expand_urls(first["pattern"])
    assert count_samples(urls, tmp_path / "cache") == (first["samples"], "img2dataset stats files")
    assert sum(count_shard(u) for u in urls) == first["samples"]
    cfg = load_config("paper", [f"data.name={first['pattern']}"])
    check_study(cfg, list(EXPECTED), first["root"])
    ade = first["root"] / "ade20k" / "ADEChallengeData2016"
    for split in ("training", "validation"):
        images = sorted(p.stem for p in (ade / "images" / split).glob("*.jpg"))
        assert images and images == sorted(p.stem for p in (ade / "annotations" / split).glob("*.png"))
