"""Like-for-like, enforced: one base-view augmentation and one sample stream per study, for every method.

The base view (view 0, ``batch["image"]``) comes from the study's ``data.augment`` through
`method_view_specs`; methods declare only extra views (SimCLR's pair) or a recorded override. The
sample filter (``data.require_caption`` and the decoder's checks) is the study's, so an image-only
method and a text method read the same samples in the same order.
"""
from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from conftest import make_batch
from mugbench.config import AugmentConfig, ConfigError, load_config
from mugbench.data.tokenizer import TextTokenizer
from mugbench.data.transforms import (ViewDeclarationError, ViewSpec, apply_views, augmentation_record,
                                      base_view_spec, build_view_transform, method_view_specs)
from mugbench.method import Method
from mugbench.methods.simclr import SIMCLR_VIEW
from mugbench.registry import get_method, registered_methods
from mugbench.results import ResultRecord
from mugbench.data.pretrain import PretrainData, check_sample_stream, pretrain_batches
from mugbench.runs import build_method

BUILT_IN = ("mae", "simclr", "clip", "slip", "flip", "coca", "cap", "mug")
# MAE's pre-training crop (He et al. 2022), bicubic, and no flip on captioned data.
DEFAULT_BASE = ViewSpec(scale=(0.2, 1.0), hflip=False, interpolation="bicubic")


def test_the_built_in_methods_are_all_registered():
    assert set(BUILT_IN) <= set(registered_methods())


@pytest.mark.parametrize("name", sorted(registered_methods()))
def test_every_method_trains_on_the_study_base_view(name, smoke_cfg, spec):
    method = build_method(name, smoke_cfg, spec)
    cls, augment = type(method), smoke_cfg.data.augment
    views = method_view_specs(cls, augment)
    record = augmentation_record(cls, augment)
    if cls.base_view is None:
        assert views[0] == base_view_spec(augment) == DEFAULT_BASE
        assert record["base_view_source"] == "study policy (data.augment)" and record["base_view_reason"] == ""
    else:  # a declared override is used, and its reason reported
        assert views[0] == cls.base_view and cls.base_view_reason.strip()
        assert record["base_view_reason"] == cls.base_view_reason
    assert record["base_view"] == dataclasses.asdict(views[0])
    assert record["extra_views"] == [dataclasses.asdict(v) for v in views[1:]]
    assert record["policy"] == {"scale": (0.2, 1.0), "hflip": None, "interpolation": "bicubic"}


def test_every_method_crops_the_same_base_view_of_an_image():
    """Same image, same per-sample seed: view 0 is drawn first, so it is the same crop for all methods."""
    image = Image.effect_mandelbrot((64, 48), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    augment = load_config("smoke").data.augment
    first = {}
    for name in BUILT_IN:
        transforms = [build_view_transform(v, 32) for v in method_view_specs(get_method(name), augment)]
        first[name] = apply_views(image, transforms, seed=1234)[0]
    for name in BUILT_IN:
        assert torch.equal(first[name], first["mae"]), name


def test_set_changes_every_methods_base_view():
    cfg = load_config("smoke", ["data.augment.scale=[0.5,1]", "data.augment.hflip=true",
                                "data.augment.interpolation=bilinear"])
    wanted = ViewSpec(scale=(0.5, 1.0), hflip=True, interpolation="bilinear")
    for name, cls in registered_methods().items():
        views = method_view_specs(cls, cfg.data.augment)
        if cls.base_view is None:
            assert views[0] == wanted, name
        steps = build_view_transform(views[0], 32).transforms
        crop = steps[0]
        assert isinstance(crop, v2.RandomResizedCrop)
        if cls.base_view is None:
            assert tuple(crop.scale) == (0.5, 1.0) and crop.interpolation == v2.InterpolationMode.BILINEAR
            assert any(isinstance(s, v2.RandomHorizontalFlip) for s in steps)
    # the default flips nothing: captions name left and right
    default = build_view_transform(method_view_specs(get_method("mug"), AugmentConfig())[0], 32)
    assert not any(isinstance(s, v2.RandomHorizontalFlip) for s in default.transforms)
    assert AugmentConfig(hflip=None).flips(captioned=False)  # auto flips only data without captions


def test_only_simclr_and_slip_add_views_and_they_are_simclr_views():
    augment = AugmentConfig()
    extras = {name: method_view_specs(get_method(name), augment)[1:] for name in BUILT_IN}
    assert extras["simclr"] == extras["slip"] == [SIMCLR_VIEW, SIMCLR_VIEW]
    assert SIMCLR_VIEW.scale == (0.08, 1.0) and SIMCLR_VIEW.color_jitter > 0 and SIMCLR_VIEW.blur > 0
    assert all(extras[name] == [] for name in BUILT_IN if name not in ("simclr", "slip"))


def test_simclr_compares_its_two_extra_views_and_ignores_the_base_view(smoke_cfg, spec, toy_samples, tokenizer):
    method = build_method("simclr", smoke_cfg, spec)
    batch = make_batch(type(method), toy_samples[:8], tokenizer, smoke_cfg.encoder.img_size)
    assert len(batch["image_views"]) == 3 and batch["image"] is batch["image_views"][0]
    loss = method(batch)["loss"]
    noisy = dict(batch, image=torch.randn_like(batch["image"]))
    noisy["image_views"] = [noisy["image"], *batch["image_views"][1:]]
    assert torch.allclose(method(noisy)["loss"], loss)
    swapped = dict(batch, image_views=[batch["image"], batch["image_views"][1], batch["image"]])
    assert not torch.allclose(method(swapped)["loss"], loss)


def test_a_declared_base_view_override_is_used_and_recorded():
    own = ViewSpec(scale=(0.9, 1.0), hflip=False)

    class Override(Method):
        """A method that needs its own base view."""

        base_view = own
        base_view_reason = "needs nearly whole images"

    views = method_view_specs(Override, AugmentConfig())
    assert views == [own]
    record = augmentation_record(Override, AugmentConfig())
    assert record["base_view_source"] == "method override" and record["base_view_reason"] == "needs nearly whole images"

    class Unexplained(Method):
        """An override without a reason."""

        base_view = own

    with pytest.raises(ViewDeclarationError, match="base_view_reason"):
        method_view_specs(Unexplained, AugmentConfig())

    class OldStyle(Method):
        """A plugin written before extra_views."""

        views = (ViewSpec(),)

    with pytest.raises(ViewDeclarationError, match="extra_views"):
        method_view_specs(OldStyle, AugmentConfig())


def test_records_carry_the_augmentation_and_old_records_still_load():
    augmentation = augmentation_record(get_method("slip"), AugmentConfig())
    rec = ResultRecord(method="slip", protocol="knn", dataset="toy-cls", pretrain_data="toy", preset="smoke",
                       seed=0, metrics={"top1": 50.0}, augmentation=augmentation)
    back = ResultRecord.from_dict(rec.to_dict())
    assert back.augmentation == augmentation and len(back.augmentation["extra_views"]) == 2
    old = {k: v for k, v in rec.to_dict().items() if k != "augmentation"}
    assert ResultRecord.from_dict(old).augmentation == {}
    with pytest.raises(ValueError, match="augmentation"):
        ResultRecord.from_dict(dict(rec.to_dict(), augmentation=[1]))


# --- one sample stream -------------------------------------------------------------------------------

def _image(size: int, colour: tuple, fmt: str) -> bytes:
    img = Image.new("RGB", (size, size), colour)
    img.paste((255 - colour[0], 80, 160), (size // 4, size // 4, size // 2, size // 2))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# Per shard of 8: sample 2 has no .txt, 5 a blank .txt; shard 1 adds a tiny and an undecodable image.
SKIPS = {"missing_caption": 3, "empty_caption": 3, "tiny_image": 1, "undecodable_image": 1}


def _shards(root: Path) -> list[str]:
    """Three img2dataset-style tar shards (JPEG and PNG), with caption-less and bad samples."""
    urls = []
    for shard in range(3):
        path = root / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(8):
                key, jpg = f"s{shard}-{i:02d}", i % 2 == 0
                _add(tar, f"{key}.{'jpg' if jpg else 'png'}",
                     _image(64, (30 * i % 255, 40 * shard, 90), "JPEG" if jpg else "PNG"))
                if i == 5:
                    _add(tar, f"{key}.txt", b"   \n")
                elif i != 2:
                    _add(tar, f"{key}.txt", f"a square number {i} of shard {shard}".encode())
            if shard == 1:
                _add(tar, "tiny.png", _image(16, (10, 10, 10), "PNG"))
                _add(tar, "tiny.txt", b"too small to crop")
                _add(tar, "broken.jpg", b"\xff\xd8 not a jpeg")
                _add(tar, "broken.txt", b"cannot be decoded")
        urls.append(str(path))
    return urls


def _stream(cfg, data, name: str, tokenizer, epoch: int) -> tuple[list[str], dict, list[torch.Tensor], dict]:
    """Everything one epoch of ``name``'s loader yields, read through run_study's `pretrain_batches`."""
    # More steps than the data holds: the epoch ends where the stream runs dry, every sample read.
    batches = pretrain_batches(cfg, data, get_method(name), tokenizer, steps_per_epoch=7)
    keys, skipped, images, first = [], {}, [], None
    for batch in batches(epoch):
        for reason, n in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        if "key" in batch:
            keys += batch["key"]
            images.append(batch["image"])
            first = first or batch
    return keys, skipped, images, first


# Batches of 4 from one stream over the three shards.
STREAM = ["train.batch_size=4", "data.streams=1"]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return PretrainData("test-shards", _shards(root), 24, root / "vocab.json")


@pytest.mark.parametrize("epoch", [0, 1])
def test_mae_and_clip_read_the_same_samples_in_the_same_order(shard_set, epoch):
    cfg = load_config("smoke", STREAM)
    tokenizer = TextTokenizer(cfg.text.context_length)
    mae = _stream(cfg, shard_set, "mae", tokenizer, epoch)
    clip = _stream(cfg, shard_set, "clip", tokenizer, epoch)
    simclr = _stream(cfg, shard_set, "simclr", tokenizer, epoch)
    assert mae[0] == clip[0] == simclr[0] and len(mae[0]) == 16  # 18 good samples, 4 full batches of 4
    assert all(k[-2:] not in ("02", "05") for k in mae[0]) and "tiny" not in mae[0]
    assert mae[1] == clip[1] == simclr[1] == SKIPS  # the same skips, counted the same
    for a, b, c in zip(mae[2], clip[2], simclr[2]):  # the same base-view crops, too
        assert torch.equal(a, b) and torch.equal(a, c)
    assert "text" in clip[3] and "text" not in mae[3] and len(simclr[3]["image_views"]) == 3


def test_the_caption_filter_is_the_studys_setting(shard_set):
    cfg = load_config("smoke", [*STREAM, "data.require_caption=false"])
    keys, skipped, _, _ = _stream(cfg, shard_set, "mae", None, 0)
    assert skipped == {"tiny_image": 1, "undecodable_image": 1} and len(keys) == 24  # all 24 captioned or not
    check_sample_stream(cfg, ["mae", "simclr"])  # image-only methods may keep caption-less samples
    with pytest.raises(ConfigError, match="data.require_caption=false .* clip reads captions"):
        check_sample_stream(cfg, ["mae", "clip"])
    check_sample_stream(load_config("smoke"), list(BUILT_IN))
