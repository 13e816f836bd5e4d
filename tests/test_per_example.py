"""Result records keep, per classification protocol, whether each val image was right: compactly, in
the val split's order, averaging exactly to the record's own top-1 (what a paired bootstrap needs)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mugbench.cli import main
from mugbench.config import load_config
from mugbench.evalset import EvalSets
from mugbench.results import pack_outcomes, unpack_outcomes

TINY_ARGS = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'  # the smoke ViT


def _records(results_dir) -> dict[str, dict]:
    """The records under ``results_dir`` as written on disk, by protocol."""
    return {r["protocol"]: r for r in (json.loads(p.read_text()) for p in sorted(results_dir.rglob("*.json")))}


def _check(record: dict, val_size: int) -> None:
    packed = record["per_example"]["top1"]
    assert packed["n"] == val_size
    assert unpack_outcomes(packed).mean() * 100 == pytest.approx(record["metrics"]["top1"], rel=1e-9)
    # 64 images: 8 bytes, 12 base64 characters.
    assert len(json.dumps(packed)) == len(json.dumps({"n": val_size, "bits": ""})) + 12


def test_records_keep_each_val_images_outcome_compactly(tiny_run, tmp_path):
    """A random-init smoke ViT through ``mugbench eval`` (k-NN and linear probe on toy-cls), and the
    k-NN record ``mugbench run`` wrote for a trained mae."""
    root, _ = tiny_run
    val_size = len(EvalSets(load_config("smoke"), root / "cache").get("toy-cls").val.label)
    argv = ["eval", "--timm-model", "vit_tiny_patch16_224", "--model-args", TINY_ARGS, "--evals", "knn,linear",
            "--preset", "smoke", "--results", str(tmp_path / "res"), "--cache-dir", str(root / "cache")]
    assert main(argv) == 0
    records = _records(tmp_path / "res")
    assert set(records) == {"knn", "linear"} and val_size == 64
    for record in records.values():
        _check(record, val_size)
    _check(_records(root / "results")["knn"], val_size)
    # At the toy preset's 1,000 val images a metric costs 168 characters of base64.
    assert len(pack_outcomes(np.arange(1000) % 3 == 0)["bits"]) == 168
