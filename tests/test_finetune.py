"""Fine-tuning protocol: MAE's recipe from timm's utilities learns a trivially separable task."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mugbench.config import load_config
from mugbench.data.transforms import build_eval_transform
from mugbench.eval.finetune import classifier_from_encoder, finetune_protocol
from mugbench.models.vit import build_encoder


def _tinted(rng: np.random.Generator, blue: bool, size: int = 48) -> Image.Image:
    """Noise tinted red or blue: the class is which of the two channels dominates, which the
    recipe's crops, flips, erasing and most RandAugment ops leave intact."""
    pixels = rng.integers(0, 96, (size, size, 3))
    pixels[..., 2 if blue else 0] += rng.integers(128, 160)
    return Image.fromarray(pixels.astype(np.uint8))


def _write_tinted(path, count: int, seed: int) -> tuple[str, list[Image.Image], list[int]]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    with wds.TarWriter(str(path)) as sink:
        for i in range(count):
            label = i % 2
            img = _tinted(rng, blue=bool(label))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            sink.write({"__key__": f"s{i:05d}", "png": buf.getvalue(), "cls": str(label).encode()})
            images.append(img)
            labels.append(label)
    return str(path), images, labels


@pytest.fixture(scope="module")
def tinted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinted")
    train_url, _, _ = _write_tinted(root / "train.tar", 512, seed=0)
    _, val_images, val_labels = _write_tinted(root / "val.tar", 128, seed=1)
    to_tensor = build_eval_transform(32)
    return {"train_urls": [train_url], "train_count": 512, "num_classes": 2,
            "val": {"image": torch.stack([to_tensor(im) for im in val_images]), "label": torch.tensor(val_labels)}}


def test_finetuning_a_random_encoder_with_the_full_recipe_separates_red_from_blue(tinted):
    cfg = load_config("smoke", ["eval.finetune_epochs=3", "eval.finetune_batch_size=32", "eval.finetune_blr=2e-3",
                                "eval.finetune_warmup_epochs=1"]).eval
    encoder = build_encoder(load_config("smoke").encoder, seed=0)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    metrics, options = finetune_protocol(encoder, tinted, cfg, seed=0, device="cpu")
    assert metrics["top1"] > 90.0, options["top1_per_epoch"]
    assert metrics["top1_last"] <= metrics["top1"] and len(options["top1_per_epoch"]) == 3
    assert options["mixup"] == 0.8 and options["randaug"] == "rand-m9-mstd0.5-inc1"
    # The caller's encoder is untouched: the protocol trains a copy.
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


def test_classifier_keeps_the_encoder_weights_and_adds_drop_path():
    encoder = build_encoder(load_config("smoke").encoder, seed=0)
    model = classifier_from_encoder(encoder, 5, "avg", drop_path=0.1)
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in shared.items())
    assert model.head.out_features == 5 and model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    x = torch.randn(2, 3, 32, 32)
    assert model.eval()(x).shape == (2, 5)
