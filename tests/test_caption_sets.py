"""COCO / Flickr30k in Karpathy's JSON layout: loading, and the caption protocols on them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mugbench.config import load_config
from mugbench.data.caption_sets import load_karpathy_split
from mugbench.data.catalog import DataNotFoundError
from mugbench.data.transforms import build_eval_transform
from mugbench.eval.harness import run_protocol
from mugbench.evalset import EvalSets
from mugbench.runs import build_method


def _fake_coco(root, n_test=4, n_train=2):
    """A Karpathy-layout COCO folder: images under val2014/, two splits, five captions an image."""
    (root / "coco" / "val2014").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(n_test + n_train):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "coco" / "val2014" / name)
        images.append({"filepath": "val2014", "filename": name, "split": "test" if i < n_test else "train",
                       "sentences": [{"raw": f" a photo number {i} variant {j}. "} for j in range(5)]})
    (root / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def test_karpathy_split_loads_the_test_images_with_all_their_captions(tmp_path):
    root = _fake_coco(tmp_path) / "coco"
    val = load_karpathy_split(root, "dataset_coco.json", build_eval_transform(32))
    assert val["image"].shape == (4, 3, 32, 32) and len(val["captions"]) == 4
    assert val["captions"][1] == [f"a photo number 1 variant {j}." for j in range(5)]
    assert val["key"][0] == "COCO_val2014_000000000000" and (val["label"] == -1).all()
    (root / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000002.jpg"):
        load_karpathy_split(root, "dataset_coco.json", build_eval_transform(32))


def test_retrieval_and_captioning_run_on_coco_caps(tmp_path, spec, tokenizer):
    cfg = load_config("smoke")
    data = EvalSets(cfg, tmp_path / "cache", _fake_coco(tmp_path / "data")).get("coco-caps")
    torch.manual_seed(0)
    clip, cap = build_method("clip", cfg, spec).eval(), build_method("cap", cfg, spec).eval()
    kw = dict(tokenizer=tokenizer, device="cpu", artifact=tmp_path / "fig")
    result = run_protocol("retrieval", clip, data, cfg, **kw)
    assert result.options == {"images": 4, "texts": 20} and all(0 <= v <= 100 for v in result.metrics.values())
    result = run_protocol("captioning", cap, data, cfg, **kw)
    metrics, examples = result.metrics, result.examples
    # Real caption sets know no objects: BLEU and CIDEr only.
    assert set(metrics) == {"bleu4", "cider"} and examples[0]["reference"] == "a photo number 0 variant 0."


def test_missing_flickr30k_says_where_it_looked(tmp_path):
    with pytest.raises(DataNotFoundError, match="dataset_flickr30k.json"):
        EvalSets(load_config("smoke"), tmp_path / "cache", tmp_path / "data").get("flickr30k")
