"""Data layer: toy world and shards, the webdataset reader, transforms and the catalog."""
from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mugbench.data.catalog import PRETRAIN_SETS, DataNotFoundError, expand_urls, resolve_pretrain_urls
from mugbench.data.check import check_shard_set
from mugbench.data.pipeline import load_split_tensors, make_loader
from mugbench.data.toy import SHAPE_WORDS, TOY_CLASSES, ToyWorld, prepare_toy, toy_cache_dir
from mugbench.data.transforms import ViewSpec, apply_views, build_eval_transform, build_view_transform

SIZES = {"pretrain": 120, "cls-val": 30, "seg-val": 24, "caps-val": 10}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small toy shard set: (root, manifest)."""
    root = tmp_path_factory.mktemp("toy")
    return root, prepare_toy(root, SIZES, seed=0, shard_size=50, workers=1)


def _urls(toy, split):
    root, manifest = toy
    return [str(root / name) for name in manifest["splits"][split]["shards"]]


def _members(path):
    """{member name: bytes} of a tar, read with the standard library only."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- toy world


def test_shards_are_real_tars_matching_manifest(toy):
    root, manifest = toy
    assert manifest["classes"] == list(TOY_CLASSES) and len(TOY_CLASSES) == 8
    for split, info in manifest["splits"].items():
        assert info["count"] == SIZES[split]
        keys = Counter()
        for name in info["shards"]:
            assert name.startswith(f"{split}-") and name.endswith(".tar")
            for member in _members(root / name):
                key, ext = member.split(".", 1)
                keys[key] += 1
                assert ext in {"png", "txt", "json", "cls", "seg.png"}
        assert len(keys) == info["count"]
        per_sample = 5 if split.startswith("seg") else 4
        assert set(keys.values()) == {per_sample}
        assert all(k.startswith(split.replace("-", "_") + "_") for k in keys)
    report = check_shard_set(_urls(toy, "pretrain"))
    assert (report["samples"], report["skipped"], report["shards"]) == (120, {}, 3)
    assert json.loads((root / "manifest.json").read_text())["splits"] == manifest["splits"]


def test_sample_contents_are_consistent(toy):
    members = _members(_urls(toy, "seg-val")[0])
    world = ToyWorld(0)
    for index in (0, 7):
        key = f"seg_val_{index:08d}"
        meta = json.loads(members[f"{key}.json"])
        sample = world.sample("seg-val", index)
        assert meta["label"] == sample.label == int(members[f"{key}.cls"])
        assert meta["captions"] == sample.captions
        assert members[f"{key}.txt"].decode() in sample.captions
        mask = np.array(Image.open(io.BytesIO(members[f"{key}.seg.png"])))
        assert mask.dtype == np.uint8 and np.array_equal(mask, sample.mask)


def test_prepare_is_deterministic(tmp_path):
    sizes = {"pretrain": 12, "seg-val": 6}
    a = prepare_toy(tmp_path / "a", sizes, seed=3, shard_size=5, workers=1)
    b = prepare_toy(tmp_path / "b", sizes, seed=3, shard_size=5, workers=2)  # worker count must not matter
    c = prepare_toy(tmp_path / "c", sizes, seed=4, shard_size=5, workers=1)
    assert a["splits"] == b["splits"] == c["splits"]
    for split in sizes:
        for name in a["splits"][split]["shards"]:
            assert _members(tmp_path / "a" / name) == _members(tmp_path / "b" / name)
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
            assert _members(tmp_path / "a" / name) != _members(tmp_path / "c" / name)


def test_cache_hit_does_not_rewrite(toy):
    root, manifest = toy
    files = sorted(root.iterdir())
    before = {p: p.stat().st_mtime_ns for p in files}
    again = prepare_toy(root, SIZES, seed=0, shard_size=50, workers=1)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in sorted(root.iterdir())} == before


def test_cache_dir_depends_on_parameters(tmp_path):
    base = toy_cache_dir(tmp_path, SIZES, 0, 64)
    assert base.parent == tmp_path / "toy"
    assert base == toy_cache_dir(tmp_path, dict(reversed(SIZES.items())), 0, 64)
    assert base != toy_cache_dir(tmp_path, SIZES, 1, 64)
    assert base != toy_cache_dir(tmp_path, SIZES, 0, 32)
    assert base != toy_cache_dir(tmp_path, {**SIZES, "pretrain": 121}, 0, 64)


def test_world_is_independent_of_call_order():
    first = ToyWorld(5).sample("cls-train", 17)
    world = ToyWorld(5)
    for i in range(5):
        world.sample("pretrain", i)
    second = world.sample("cls-train", 17)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    assert first.captions == second.captions and first.objects == second.objects
    other = ToyWorld(5).sample("cls-val", 17)
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))


def test_images_labels_and_masks():
    world = ToyWorld(1, native_size=48)
    labels = Counter()
    for i in range(60):
        s = world.sample("pretrain", i)
        assert s.image.mode == "RGB" and s.image.size == (48, 48)
        assert s.mask.shape == (48, 48) and s.mask.dtype == np.uint8
        assert 0 <= s.label < len(TOY_CLASSES) and s.objects[0]["shape"] == TOY_CLASSES[s.label]
        assert (s.mask == s.label + 1).sum() > 20  # the main object is visible in the mask
        assert set(np.unique(s.mask)) <= {0} | {TOY_CLASSES.index(o["shape"]) + 1 for o in s.objects}
        assert all(o["radius"] < s.objects[0]["radius"] for o in s.objects[1:])  # main = largest
        assert 1 <= len(s.objects) <= 3
        labels[s.label] += 1
    assert len(labels) == len(TOY_CLASSES)


def test_captions_vary_and_name_the_main_shape():
    world = ToyWorld(0)
    captions, openers, relations, positions = [], Counter(), 0, 0
    for i in range(100):
        s = world.sample("caps-val", i)
        assert len(s.captions) == 5 and len(set(s.captions)) == 5
        words = SHAPE_WORDS[s.objects[0]["shape"]]
        for cap in s.captions:
            low = cap.lower()
            assert any(w in low for w in words), (cap, words)
            openers[" ".join(low.split()[:2])] += 1
            relations += any(r in low for r in ("left of", "right of", "above", "below", "next to"))
            positions += any(p in low for p in ("top", "bottom", "centre", "center", "middle", " side"))
        captions += s.captions
    assert len(set(captions)) >= 490
    assert len(openers) >= 8
    assert relations > 50 and positions > 100
    # attributes appear in both orders ("big red", "red ... big"-free) and colours are mentioned
    assert sum("red" in c.lower() for c in captions) > 20


# --------------------------------------------------------------------------- reader


def _loader(urls, **kw):
    args = dict(batch_size=8, image_transforms=[build_view_transform(ViewSpec(), 24),
                                                build_view_transform(ViewSpec(color_jitter=1.0, blur=0.5), 24)],
                tokenizer=None, need_caption=True, need_label=True, shuffle=True, seed=0, epoch=0,
                shuffle_buffer=100)
    args.update(kw)
    return make_loader(urls, **args)


def test_loader_batches(toy):
    batches = list(_loader(_urls(toy, "pretrain"), tokenizer=lambda caps: torch.ones(len(caps), 7, dtype=torch.long)))
    assert len(batches) == 120 // 8
    b = batches[0]
    assert b["image"].shape == (8, 3, 24, 24) and b["image"].dtype == torch.float32
    assert len(b["image_views"]) == 2 and torch.equal(b["image_views"][0], b["image"])
    assert b["text"].shape == (8, 7) and b["label"].dtype == torch.long and len(b["caption"]) == 8
    assert b["skipped"] == {}
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == 120


def test_loader_is_deterministic(toy):
    urls = _urls(toy, "pretrain")
    a, b = list(_loader(urls)), list(_loader(urls))
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["image_views"][1], y["image_views"][1])
    c = list(_loader(urls, epoch=1))
    assert [x["key"] for x in a] != [x["key"] for x in c]
    plain = [k for x in _loader(urls, shuffle=False) for k in x["key"]]
    assert plain == sorted(plain)


def test_augmentations_do_not_depend_on_worker_count(toy):
    urls = _urls(toy, "pretrain")
    solo = {k: img for x in _loader(urls, num_workers=0) for k, img in zip(x["key"], x["image"])}
    duo = list(_loader(urls, num_workers=2))
    assert [x["key"] for x in duo] == [x["key"] for x in _loader(urls, num_workers=2)]
    for x in duo:
        for key, img in zip(x["key"], x["image"]):
            assert torch.equal(solo[key], img)


def test_segmentation_loading_keeps_masks_aligned(toy):
    urls = _urls(toy, "seg-val")
    data = load_split_tensors(urls, build_eval_transform(64), need_mask=True, mask_size=64)
    world = ToyWorld(0)
    assert data["image"].shape == (24, 3, 64, 64) and data["mask"].shape == (24, 64, 64)
    assert data["key"][0] == "seg_val_00000000" and len(data["captions"][0]) == 5
    for i in (0, 23):
        s = world.sample("seg-val", i)
        assert torch.equal(data["mask"][i], torch.from_numpy(s.mask.astype(np.int64)))
        assert int(data["label"][i]) == s.label
    small = load_split_tensors(urls, build_eval_transform(32), need_mask=True, mask_size=16)
    assert small["image"].shape[-1] == 32 and small["mask"].shape[-1] == 16
    batch = next(iter(make_loader(urls, batch_size=4, image_transforms=[build_eval_transform(32)],
                                  tokenizer=None, need_caption=False, need_mask=True, shuffle=False, seed=0)))
    assert batch["mask"].shape == (4, 32, 32) and batch["mask"].dtype == torch.long


def test_bad_samples_are_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(8):
            sample = {"__key__": f"s{i}", "png": _png(), "txt": f"a red square {i}".encode(), "cls": b"1"}
            if i == 1:
                sample["png"] = b"definitely not an image"
            if i == 2:
                sample["txt"] = b"   "
            if i == 3:
                del sample["txt"]
            sink.write(sample)
    report = check_shard_set(str(path))
    assert report["samples"] == 5 and report["shards"] == 1
    assert report["skipped"] == {"undecodable_image": 1, "empty_caption": 1, "missing_caption": 1}
    batches = list(make_loader(str(path), batch_size=2, image_transforms=[build_eval_transform(16)],
                               tokenizer=None, need_caption=True, shuffle=False, seed=0, drop_last=False))
    assert sum(len(b["key"]) for b in batches) == 5
    total = Counter()
    for b in batches:
        total.update(b["skipped"])
    assert total == Counter(report["skipped"])
    # without a caption requirement only the broken image is dropped
    assert check_shard_set(str(path), need_caption=False)["samples"] == 7


def test_truncated_tar_is_counted(tmp_path):
    full = tmp_path / "full.tar"
    with wds.TarWriter(str(full), encoder=False) as sink:
        for i in range(10):
            sink.write({"__key__": f"t{i}", "png": _png(), "txt": b"a blue circle"})
    data = full.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    report = check_shard_set([str(tmp_path / "cut.tar"), str(full)])
    assert report["skipped"].get("truncated_tar") == 1
    assert 10 < report["samples"] < 20


def test_expand_urls():
    assert expand_urls("a/{00..02}.tar") == ["a/00.tar", "a/01.tar", "a/02.tar"]
    assert expand_urls("a/{0..1}.tar::b/x.tar") == ["a/0.tar", "a/1.tar", "b/x.tar"]
    assert expand_urls(["a/{0..1}.tar", "c.tar"]) == ["a/0.tar", "a/1.tar", "c.tar"]


# --------------------------------------------------------------------------- transforms


def test_transforms_are_reproducible():
    img = ToyWorld(0).sample("pretrain", 0).image
    simclr = build_view_transform(ViewSpec(scale=(0.08, 1.0), color_jitter=1.0, grayscale=0.2, blur=0.5), 32)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = apply_views(img, [simclr, simclr], seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    b = apply_views(img, [simclr, simclr], seed=7)
    assert a[0].shape == (3, 32, 32) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], apply_views(img, [simclr], seed=8)[0])
    ev = build_eval_transform(32)(Image.new("RGB", (64, 48), (124, 116, 104)))
    assert ev.shape == (3, 32, 32) and ev.abs().max() < 0.05  # the ImageNet mean maps to ~0


# --------------------------------------------------------------------------- catalog


def test_missing_named_set_fails_fast_with_instructions(tmp_path):
    for name in PRETRAIN_SETS:
        start = time.perf_counter()
        with pytest.raises(DataNotFoundError) as err:
            resolve_pretrain_urls(name, tmp_path)
        assert time.perf_counter() - start < 1.0
        msg = str(err.value)
        assert name in msg and "img2dataset" in msg and "MUGBENCH_DATA" in msg
        assert str(tmp_path / name) in msg
    with pytest.raises(DataNotFoundError, match="MUGBENCH_DATA"):
        resolve_pretrain_urls("cc3m", None)


def test_named_set_and_patterns_resolve(tmp_path):
    (tmp_path / "cc3m").mkdir()
    for i in (0, 331):
        (tmp_path / "cc3m" / f"{i:05d}.tar").write_bytes(b"")
    urls = resolve_pretrain_urls("cc3m", tmp_path)
    assert len(urls) == 332 and urls[0] == str(tmp_path / "cc3m" / "00000.tar")
    pattern = str(tmp_path / "cc3m" / "{00000..00001}.tar")
    with pytest.raises(DataNotFoundError, match="00001.tar"):
        resolve_pretrain_urls(pattern, None)
    assert resolve_pretrain_urls(str(tmp_path / "cc3m" / "00000.tar"), None) == [str(tmp_path / "cc3m" / "00000.tar")]
    assert resolve_pretrain_urls("cc3m/00331.tar", tmp_path) == [str(tmp_path / "cc3m" / "00331.tar")]
    with pytest.raises(ValueError):
        resolve_pretrain_urls("toy", tmp_path)


def test_unknown_name_lists_sets():
    with pytest.raises(DataNotFoundError) as err:
        resolve_pretrain_urls("imagenet21k", None)
    msg = str(err.value)
    assert all(name in msg for name in ("toy", *PRETRAIN_SETS)) and "pattern" in msg
