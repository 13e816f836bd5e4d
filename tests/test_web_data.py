"""Web data as it really comes: every kind of bad sample, exact counts, each good sample once per
epoch, foreign shard layouts, resampled shards, `mugbench data check`, reduced-size decoding,
ImageNet folders, and the missing-set error of every named set."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from mugbench.cli import main
from mugbench.data.catalog import PRETRAIN_SETS, BadDataError, DataNotFoundError, resolve_pretrain_urls
from mugbench.data.check import check_shard_set, distribution
from mugbench.data.decode import BadImage, decode_rgb, draft_size
from mugbench.data.pipeline import DecodeOptions, make_loader, split_sample_key
from mugbench.data.transforms import build_eval_transform
from mugbench.registry import registered_eval_sets
from mugbench.train.loop import TrainState, _check_bad_fraction

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _picture(size=(96, 72), colour=(200, 40, 40), mode="RGB") -> Image.Image:
    """A two-tone image (a square on a background), so the JPEG is not trivially flat."""
    img = Image.new("RGB", size, colour)
    img.paste((30, 90, 220), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return img.convert(mode) if mode != "RGB" else img


def _jpeg(**kw) -> bytes:
    return _encode(_picture(**kw), "JPEG")


def _png(**kw) -> bytes:
    return _encode(_picture(**kw), "PNG")


def _sample(key: str, image: bytes | None, caption: str | None = "a red square on a blue field",
            ext: str = "jpg", meta: dict | None = None) -> dict:
    sample = {"__key__": key}
    if image is not None:
        sample[ext] = image
    if caption is not None:
        sample["txt"] = caption.encode()
    sample["json"] = json.dumps(meta or {"url": f"http://example.com/{key}", "status": "success"}).encode()
    return sample


def _write(path: Path, samples: list[dict], extra_members: dict[str, bytes] | None = None) -> None:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    if extra_members:  # stray files a foreign set may carry (nothing reads them)
        with tarfile.open(path, "a") as tar:
            for name, data in extra_members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _truncate_inside(path: Path, key: str) -> None:
    """Cut a tar inside the first member of sample ``key``: earlier samples stay readable."""
    with tarfile.open(path) as tar:
        first = min((m for m in tar.getmembers() if m.name.startswith(key + ".")), key=lambda m: m.offset_data)
    path.write_bytes(path.read_bytes()[:first.offset_data + 10])


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
    """Four shards holding every kind of bad sample next to good ones; returns
    (pattern, good keys, expected skips, expected repairs)."""
    root = tmp_path_factory.mktemp("web")
    good = []
    shard0 = [_sample(f"a/img.{i}.v2", _jpeg()) for i in range(6)]  # keys with dots, nested folder
    shard0 += [_sample("a/cmyk", _jpeg(mode="CMYK")),
               _sample("a/garbage", b"\xff\xd8 this is not a jpeg at all"),
               _sample("a/cut-jpeg", _jpeg(size=(400, 300))[:900]),
               _sample("a/tiny", _jpeg(size=(8, 8)))]
    good += [s["__key__"] for s in shard0[:7]]
    shard1 = [_sample(f"b/{i:04d}", _png(), ext="png") for i in range(6)]
    transparent = Image.new("P", (64, 64), 0)
    transparent.info["transparency"] = 0
    shard1 += [_sample("b/palette", _png(mode="P"), ext="png"),
               _sample("b/rgba", _png(mode="RGBA"), ext="png"),
               _sample("b/palette-alpha", _encode(transparent, "PNG"), ext="png"),
               _sample("b/grey", _jpeg(mode="L")),
               _sample("b/empty-caption", _jpeg(), caption="   "),
               _sample("b/no-caption", _jpeg(), caption=None),
               _sample("b/bad-json", _jpeg())]
    shard1[-1]["json"] = b"{not json"
    good += [s["__key__"] for s in shard1[:10]]
    shard2 = [_sample(f"c/deep/er/{i}", _jpeg(size=(120, 90)), ext="jpeg",
                      meta={"url": "http://x", "width": 120, "height": 90, "similarity": 0.31, "exif": "{}"})
              for i in range(6)]
    shard2 += [_sample("c/no-image", None)]
    good += [s["__key__"] for s in shard2[:6]]
    shard3 = [_sample(f"d/{i}", _jpeg(size=(80, 80)), ext="jpg") for i in range(8)]
    good += [s["__key__"] for s in shard3[:5]]
    for i, samples in enumerate((shard0, shard1, shard2, shard3)):
        _write(root / f"{i:05d}.tar", samples, {"c/deep/er/0.npy": b"\x93NUMPY"} if i == 2 else None)
    _truncate_inside(root / "00003.tar", "d/5")
    skipped = {"undecodable_image": 2, "tiny_image": 1, "empty_caption": 1, "missing_caption": 1,
               "bad_metadata": 1, "missing_image": 1, "truncated_tar": 1}
    repaired = {"cmyk": 1, "palette": 1, "alpha": 2, "grayscale": 1}
    return str(root / "{00000..00003}.tar"), good, skipped, repaired


DECODE = DecodeOptions(min_size=32)


def test_check_counts_every_kind_of_bad_sample(bad_set):
    pattern, good, skipped, repaired = bad_set
    report = check_shard_set(pattern, workers=2, decode=DECODE)
    assert report["samples"] == len(good) == 28
    assert report["skipped"] == skipped and report["repaired"] == repaired
    assert report["bad"] == 8 and report["bad_fraction"] == round(8 / 36, 6)
    assert sorted(k for _, k, kind in report["bad_keys"] if kind != "truncated_tar") == sorted(
        ["a/garbage", "a/cut-jpeg", "a/tiny", "b/empty-caption", "b/no-caption", "b/bad-json", "c/no-image"])
    assert report["image_width"]["max"] == 120 and report["image_width"]["min"] == 64
    assert report["caption_words"] == {"count": 28, "mean": 7.0, "min": 7, "p5": 7, "p50": 7, "p95": 7, "max": 7}
    assert report == check_shard_set(pattern, workers=1, decode=DECODE)  # parallel == serial


@pytest.mark.parametrize("workers", [0, 2])
def test_every_good_sample_once_per_epoch_and_exact_skip_counts(bad_set, workers):
    pattern, good, skipped, repaired = bad_set
    for drop_last in (False, True):
        seen, skips, fixes = Counter(), Counter(), Counter()
        for batch in make_loader(pattern, batch_size=4, image_transforms=[build_eval_transform(32)], tokenizer=None,
                                 need_caption=True, shuffle=True, seed=0, epoch=1, num_workers=workers,
                                 drop_last=drop_last, decode=DECODE, tally_tail=True, shuffle_buffer=8):
            seen.update(batch.get("key", []))
            skips.update(batch["skipped"])
            fixes.update(batch["repaired"])
        assert dict(skips) == skipped and dict(fixes) == repaired
        if not drop_last:
            assert seen == Counter(good)  # every good sample exactly once
        else:
            assert set(seen) <= set(good) and max(seen.values()) == 1


def test_split_sample_key_keeps_dots_and_folders():
    assert split_sample_key("a/img.2019.v2.jpg") == ("a/img.2019.v2", "jpg")
    assert split_sample_key("x/y.seg.png") == ("x/y", "seg.png")
    assert split_sample_key("k.JPEG") == ("k", "jpeg")
    assert split_sample_key("k.npy") == (None, None) and split_sample_key(".txt") == (None, None)


def test_decode_repairs_modes_and_rejects_bad_images():
    img, repair = decode_rgb(_encode(Image.new("RGBA", (40, 40), (255, 0, 0, 0)), "PNG"))
    assert repair == "alpha" and img.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white, not red
    img, repair = decode_rgb(_encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"))
    assert repair == "cmyk" and img.mode == "RGB" and img.getpixel((5, 5))[0] > 200
    deep = Image.fromarray(__import__("numpy").full((40, 40), 4000, dtype="uint16"))
    img, repair = decode_rgb(_encode(deep, "PNG"))
    assert repair == "grayscale" and img.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(BadImage) as bad:
        decode_rgb(_jpeg(mode="L"), repair_modes=False)
    assert bad.value.kind == "wrong_mode"
    with pytest.raises(BadImage) as bad:
        decode_rgb(_jpeg(size=(20, 300)), min_size=32)
    assert bad.value.kind == "tiny_image"


def test_draft_decoding_keeps_the_smallest_crop_at_full_resolution():
    assert draft_size(224, [0.2]) == 501 and draft_size(224, [0.08, 0.2]) == 792 and draft_size(224, []) == 224
    big = _jpeg(size=(1024, 768))
    assert decode_rgb(big, draft_to=224)[0].size == (512, 384)  # 1/2 scale: the shorter side stays >= 224
    assert decode_rgb(big, draft_to=100)[0].size == (256, 192)
    assert decode_rgb(big, draft_to=501)[0].size == (1024, 768)  # halving would go below 501
    assert decode_rgb(_png(size=(1024, 768)), draft_to=224)[0].size == (1024, 768)  # PNG: no draft mode


def test_resampled_epochs_have_a_fixed_length_and_are_reproducible(bad_set):
    pattern = bad_set[0]

    def keys(epoch, workers):
        loader = make_loader(pattern, batch_size=3, image_transforms=[build_eval_transform(16)], tokenizer=None,
                             need_caption=True, shuffle=True, seed=0, epoch=epoch, num_workers=workers,
                             decode=DECODE, resampled=True, batches_per_epoch=10, shuffle_buffer=4)
        return [b["key"] for b in loader]

    first = keys(0, 2)
    assert len(first) == 10 and all(len(k) == 3 for k in first)
    assert first == keys(0, 2) and first != keys(1, 2)
    assert len(keys(0, 0)) == 10


def test_data_check_command_writes_json_and_fix_list(bad_set, tmp_path, capsys):
    pattern = bad_set[0]
    out = tmp_path / "check.json"
    assert main(["data", "check", pattern, "--json", str(out), "--workers", "2", "--fix-list",
                 "--max-bad-fraction", "0.5"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 8 and all(len(line.split("\t")) == 3 for line in lines)
    assert "good samples: 28" in captured.err and "repaired to RGB (kept): alpha=2" in captured.err
    report = json.loads(out.read_text())
    assert report["samples"] == 28 and report["skipped"]["tiny_image"] == 1 and report["min_image_size"] == 32
    assert main(["data", "check", pattern, "--json", str(out), "--max-bad-fraction", "0.1"]) == 1
    assert "above 0.1" in capsys.readouterr().err


def test_distribution_percentiles():
    assert distribution(Counter({1: 1, 2: 1, 3: 1, 4: 1, 100: 1})) == {
        "count": 5, "mean": 22.0, "min": 1, "p5": 1, "p50": 3, "p95": 4, "max": 100}  # numpy's "lower"
    assert distribution(Counter()) == {"count": 0}


def test_too_many_bad_samples_stop_training_with_counts():
    skipped = {"undecodable_image": 380, "truncated_tar": 2}  # every rank's, merged (`train.loop._merge_counts`)
    _check_bad_fraction(TrainState(images=600, skipped=skipped), 0.2, "mae", 7)  # 982 samples read: too few to judge
    _check_bad_fraction(TrainState(images=2000, skipped=skipped), 0.2, "mae", 7)  # 16%: carry on
    with pytest.raises(BadDataError) as err:
        _check_bad_fraction(TrainState(images=700, skipped=skipped), 0.2, "mae", 7)
    msg = str(err.value)
    assert "382 of the 1082" in msg and "undecodable_image=380" in msg and "--fix-list" in msg


def test_missing_eval_sets_fail_with_where_and_how(tmp_path):
    hints = {"imagenet": "ImageFolder", "ade20k": "ADEChallengeData2016", "coco-caps": "dataset_coco.json",
             "flickr30k": "dataset_flickr30k.json"}
    from_data_root = {n: s for n, s in registered_eval_sets().items() if s.folder is not None}
    assert set(hints) == set(from_data_root)
    for name, hint in hints.items():
        with pytest.raises(DataNotFoundError) as err:
            from_data_root[name].locate(tmp_path)
        msg = str(err.value)
        assert name in msg and str(tmp_path / from_data_root[name].folder) in msg and hint in msg and "MUGBENCH_DATA" in msg
        with pytest.raises(DataNotFoundError, match="none is set"):
            from_data_root[name].locate(None)
    for name in PRETRAIN_SETS:
        with pytest.raises(DataNotFoundError, match="img2dataset --url_list"):
            resolve_pretrain_urls(name, tmp_path)


def _foreign_set(root: Path) -> str:
    """Four shards the way other tools write them: PNG and JPEG, keys with dots, nested key
    folders, extra JSON fields, a stray member, one CMYK image and one broken image."""
    colours = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 200, 40)]
    names = ["red", "green", "blue", "yellow"]
    for shard in range(4):
        samples = []
        for i in range(24):
            c = (shard + i) % 4
            ext = "png" if i % 2 else "jpg"
            image = _encode(_picture(size=(64, 64), colour=colours[c]), "PNG" if ext == "png" else "JPEG")
            samples.append(_sample(f"part{shard}/sub.dir/photo.{i}.v1", image, ext=ext,
                                   caption=f"a blue square on a {names[c]} background",
                                   meta={"url": f"http://example.com/{shard}/{i}", "width": 64, "height": 64,
                                         "punsafe": 0.01, "caption_source": "alt-text"}))
        if shard == 1:
            samples.append(_sample("part1/cmyk.0", _jpeg(size=(64, 64), mode="CMYK")))
            samples.append(_sample("part1/broken.0", b"GIF89a-not-really"))
        _write(root / f"{shard:05d}.tar", samples, {"part0/README.md": b"made by another tool"} if shard == 0 else None)
    return str(root / "{00000..00003}.tar")


def test_run_on_a_foreign_shard_set_trains_and_evaluates(tmp_path):
    (tmp_path / "shards").mkdir()
    pattern = _foreign_set(tmp_path / "shards")
    out = subprocess.run(
        [sys.executable, "-m", "mugbench.cli", "run", "--preset", "smoke", "--data", pattern, "--methods", "clip",
         "--evals", "knn,zeroshot", "--set", "data.samples_per_epoch=96", "--cache-dir", str(tmp_path / "cache"),
         "--workdir", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
         "--reports", str(tmp_path / "reports")],
        capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json")]
    assert {(r["protocol"], r["dataset"]) for r in records} == {("knn", "toy-cls"), ("zeroshot", "toy-cls")}
    for record in records:
        assert record["pretrain_data"] == pattern and record["steps"] == 3
        assert record["skipped_samples"] == {"undecodable_image": 1} and record["repaired_samples"] == {"cmyk": 1}
        assert 0 <= record["metrics"]["top1"] <= 100


def _image_folder(root: Path) -> None:
    """A two-class ImageNet-style tree: reddish and bluish noise, one CMYK file among them."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6)):
        for label, wnid in enumerate(("n00000001", "n00000002")):
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (40, 40, 3))
                pixels[..., 0 if label == 0 else 2] += 130
                img = Image.fromarray(pixels.astype("uint8"))
                img = img.convert("CMYK") if i == 0 else img
                img.save(folder / f"{wnid}_{i}.JPEG", "JPEG")


def test_imagenet_folders_evaluate_with_knn_linear_and_finetune(tmp_path, capsys):
    _image_folder(tmp_path / "data")
    args = ["eval", "--timm-model", "vit_tiny_patch16_224", "--model-args",
            '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}',
            "--datasets", "imagenet", "--evals", "knn,linear,finetune", "--preset", "smoke",
            "--data-root", str(tmp_path / "data"), "--results", str(tmp_path / "results"),
            "--cache-dir", str(tmp_path / "cache"), "--set", "eval.finetune.batch_size=8",
            "--set", "eval.knn.k=5"]
    assert main(args) == 0, capsys.readouterr().err
    records = {r["protocol"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json"))}
    assert set(records) == {"knn", "linear", "finetune"} and all(r["dataset"] == "imagenet" for r in records.values())
    assert records["knn"]["metrics"]["top1"] > 90  # red against blue: even random features separate them
    assert records["linear"]["metrics"]["top1"] > 90


def test_missing_imagenet_stops_a_run_before_training(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mugbench.cli", "run", "--preset", "smoke", "--methods", "mae",
                          "--set", "eval.datasets=[imagenet]", "--data-root", str(tmp_path),
                          "--cache-dir", str(tmp_path / "cache"), "--workdir", str(tmp_path / "runs")],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 2 and not (tmp_path / "runs").exists()
    assert "imagenet" in out.stderr and "ImageFolder" in out.stderr and "Traceback" not in out.stderr
