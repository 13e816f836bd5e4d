"""Fine-tuning protocol: MAE's recipe from timm's utilities learns a trivially separable task."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mugbench.config import ConfigError, load_config
from mugbench.data.transforms import build_eval_transform
from mugbench.eval.finetune import (classifier_from_encoder, finetune, fit_probe_head, right_per_image,
                                    train_transform)
from mugbench.eval.harness import run_protocol
from mugbench.evalset import ClassificationSet, EvalSets, LabelledImages, ShardTrainBatches
from mugbench.models.vit import build_encoder
from mugbench.protocols.finetune import FineTune

# What a fine-tuning record keeps besides the recipe's options (all of FineTune.Options) on the CPU
# (on CUDA also the determinism note).
_RECORD_EXTRAS = {"pool", "top1_per_epoch", "precision"}


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
def tinted(tmp_path_factory) -> ClassificationSet:
    """512 train images in a labelled shard (read back augmented) and 128 val images, red or blue."""
    root = tmp_path_factory.mktemp("tinted")
    train_url, train_images, train_labels = _write_tinted(root / "train.tar", 512, seed=0)
    _, val_images, val_labels = _write_tinted(root / "val.tar", 128, seed=1)
    to_tensor = build_eval_transform(32)

    def split(images, labels, prefix):
        return LabelledImages(torch.stack([to_tensor(im) for im in images]), torch.tensor(labels),
                              [f"{prefix}{i:05d}" for i in range(len(labels))])

    return ClassificationSet(name="tinted", classes=["red", "blue"], train=split(train_images, train_labels, "s"),
                             val=split(val_images, val_labels, "v"),
                             train_batches=ShardTrainBatches([train_url], 512))


def test_finetuning_a_random_encoder_with_the_full_recipe_separates_red_from_blue(tinted):
    cfg = load_config("smoke", ["eval.finetune.epochs=3", "eval.finetune.batch_size=32", "eval.finetune.blr=2e-3",
                                "eval.finetune.warmup_epochs=1"])
    opts = cfg.eval.options_for("finetune")
    encoder = build_encoder(cfg.encoder, seed=0)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    metrics, options, outcomes = finetune(encoder, tinted, opts, seed=0, device="cpu", pool=cfg.eval.pool,
                                          batch_size=cfg.eval.batch_size)
    assert metrics["top1"] > 90.0, options["top1_per_epoch"]
    assert metrics["top1_last"] <= metrics["top1"] and len(options["top1_per_epoch"]) == 3
    # Whether each of the 128 val images was right after the best epoch and after the last: their means
    # are the two numbers.
    assert set(outcomes) == set(metrics) and all(flags.shape == (128,) for flags in outcomes.values())
    for metric, flags in outcomes.items():
        assert 100.0 * flags.double().mean().item() == pytest.approx(metrics[metric], rel=1e-9)
    assert options["mixup"] == 0.8 and options["randaug"] == "rand-m9-mstd0.5-inc1"
    # The record keeps every option of the recipe as set, the read-out, and the per-epoch scores.
    assert set(options) == {f.name for f in dataclasses.fields(FineTune.Options)} | _RECORD_EXTRAS
    assert {k: options[k] for k in dataclasses.asdict(opts)} == dataclasses.asdict(opts)
    assert (options["epochs"], options["blr"], options["pool"]) == (3, 2e-3, cfg.eval.pool)
    # The caller's encoder is untouched: the protocol trains a copy.
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


def test_crop_ranges_reach_the_training_transform_and_are_checked():
    """MAE's (timm's) RandomResizedCrop ranges by default; the toy preset crops nothing, so a training
    image shows the whole scene at the scale the val images are scored at (the preset's measurement)."""
    crop = train_transform(32, FineTune.Options()).transforms[0]
    assert tuple(crop.scale) == (0.08, 1.0) and tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3))
    toy = load_config("toy").eval.options_for("finetune")
    crop = train_transform(32, toy).transforms[0]
    assert tuple(crop.scale) == (1.0, 1.0) and tuple(crop.ratio) == (1.0, 1.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    whole = np.asarray(image.resize((32, 32), Image.BICUBIC))
    assert all(np.array_equal(np.asarray(crop(image)), whole) for _ in range(5))  # the whole image, resized
    for key, value in (("crop_scale", [1.0, 0.5]), ("crop_ratio", [2.0, 1.0])):
        with pytest.raises(ConfigError, match=f"eval.finetune.{key}"):
            load_config("toy", [f"eval.finetune.{key}={value}"])
    with pytest.raises(ConfigError, match="eval.finetune.crop_scale"):
        load_config("toy", ["eval.finetune.crop_scale=[0.5]"])


def test_a_probe_head_reads_the_frozen_features_before_fine_tuning(tinted):
    """LP-FT's first stage: fitted on the un-augmented train split, the head alone (the encoder untouched)
    tells red from blue on the val split. The recipe records which start it took."""
    encoder = build_encoder(load_config("smoke").encoder, seed=0)
    model = classifier_from_encoder(encoder, 2, "avg", drop_path=0.1)
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    fit_probe_head(model, tinted.train.image, tinted.train.label, batch_size=64, device="cpu")
    right = right_per_image(model, tinted.val.image, tinted.val.label, batch_size=64, device="cpu")
    assert right.float().mean() > 0.95 and model.head.weight.abs().max() > 1e-2, right.float().mean()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in body.items())
    cfg = load_config("smoke", ["eval.finetune.epochs=1", "eval.finetune.head_init=probe"])
    _, options, _ = finetune(encoder, tinted, cfg.eval.options_for("finetune"), seed=0, device="cpu",
                             pool=cfg.eval.pool, batch_size=64)
    assert options["head_init"] == "probe"
    with pytest.raises(ConfigError, match="eval.finetune.head_init"):
        load_config("smoke", ["eval.finetune.head_init=zero"])


def test_classifier_keeps_the_encoder_weights_and_adds_drop_path():
    encoder = build_encoder(load_config("smoke").encoder, seed=0)
    model = classifier_from_encoder(encoder, 5, "avg", drop_path=0.1)
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in shared.items())
    assert model.head.out_features == 5 and model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    x = torch.randn(2, 3, 32, 32)
    assert model.eval()(x).shape == (2, 5)


def test_the_registered_protocol_fine_tunes_on_the_toy_set(tmp_path):
    """``finetune`` through the harness on ``toy-cls`` loaded by its registered source: the train split
    comes back augmented from its shards (every one of its 128 images once per epoch), the record holds
    the smoke preset's options, and a rerun with the same seed gives the same numbers."""
    cfg = load_config("smoke", ["eval.finetune.epochs=2"])
    data = EvalSets(cfg, tmp_path / "cache").get("toy-cls")
    transform = build_eval_transform(cfg.encoder.img_size)
    seen = [b["label"] for b in data.train_batches(epoch=0, batch_size=32, transform=transform, seed=0)]
    assert sum(len(labels) for labels in seen) == data.train_count == 128
    encoder = build_encoder(cfg.encoder, seed=0)
    result = run_protocol("finetune", encoder, data, cfg)
    again = run_protocol("finetune", encoder, data, cfg)
    assert set(result.metrics) == {"top1", "top1_last"} and result.metrics == again.metrics
    assert set(result.per_example) == {"top1", "top1_last"} and len(result.per_example["top1"]) == len(data.val.label)
    assert all(torch.equal(flags, again.per_example[m]) for m, flags in result.per_example.items())
    assert all(100.0 * flags.double().mean().item() == pytest.approx(result.metrics[m], rel=1e-9)
               for m, flags in result.per_example.items())
    assert all(0.0 <= v <= 100.0 for v in result.metrics.values())
    opts = dataclasses.replace(FineTune.Options(), epochs=2, batch_size=32, warmup_epochs=0)  # smoke's
    assert {k: result.options[k] for k in dataclasses.asdict(opts)} == dataclasses.asdict(opts)
    assert len(result.options["top1_per_epoch"]) == 2 and result.options["pool"] == cfg.eval.pool
