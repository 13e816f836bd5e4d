"""Shared fixtures: a small toy batch and the smoke study configuration."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mugbench.config import AugmentConfig, load_config
from mugbench.data.tokenizer import TextTokenizer, corpus_vocab
from mugbench.data.toy import ToyWorld
from mugbench.data.transforms import build_view_transform, method_view_specs
from mugbench.data.pretrain import text_spec


@pytest.fixture(scope="session")
def smoke_cfg():
    """The `smoke` preset: tiny ViT, tiny text towers."""
    return load_config("smoke")


@pytest.fixture(scope="session")
def toy_samples():
    """32 samples of the embedded world (generated in memory, no shards)."""
    world = ToyWorld(seed=0)
    return [world.sample("pretrain", i) for i in range(32)]


@pytest.fixture(scope="session")
def tokenizer(toy_samples):
    """Compact-vocabulary tokenizer over the sample captions."""
    return TextTokenizer(32, corpus_vocab(c for s in toy_samples for c in s.captions))


@pytest.fixture(scope="session")
def spec(smoke_cfg, tokenizer):
    """The TextSpec methods are built with in tests."""
    return text_spec(smoke_cfg, tokenizer)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real `mugbench run --evals knn` of mae on the smoke preset for two optimiser steps (~10 s):
    ``(root, run_dir)``, with ``runs/``, ``results/`` and ``reports/`` under ``root``."""
    from mugbench.cli import main

    root = tmp_path_factory.mktemp("tiny-run")
    argv = ["run", "--preset", "smoke", "--methods", "mae", "--set", "train.epochs=0.25", "--evals", "knn",
            "--workdir", str(root / "runs"), "--results", str(root / "results"), "--reports", str(root / "reports"),
            "--cache-dir", str(root / "cache")]
    assert main(argv) == 0
    return root, next((root / "runs").glob("toy/smoke/mae-seed0-*"))


def make_batch(method_cls, samples, tokenizer, image_size: int, seed: int = 0,
               augment: AugmentConfig = AugmentConfig()) -> dict:
    """A batch in the loader's format for the views ``method_cls`` trains on under the base-view
    policy ``augment`` (the schema's default unless given)."""
    torch.manual_seed(seed)
    views = [torch.stack([build_view_transform(v, image_size)(s.image) for s in samples])
             for v in method_view_specs(method_cls, augment)]
    batch = {"image": views[0], "text": tokenizer([s.captions[0] for s in samples]),
             "caption": [s.captions[0] for s in samples], "label": torch.tensor([s.label for s in samples])}
    if len(views) > 1:
        batch["image_views"] = views
    return batch
