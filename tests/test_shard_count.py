"""Sample counts of shard sets without data.samples_per_epoch: img2dataset stats files, a header pass
that agrees with the training pipeline, its cache and the cache's invalidation, and a run on a
foreign shard set that sets no epoch length."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from mugbench.config import load_config
from mugbench.data import shard_count
from mugbench.data.catalog import BadDataError, DataNotFoundError
from mugbench.data.pipeline import IMAGE_KEYS, SkipCounter, TarSamples
from mugbench.data.shard_count import count_samples, stats_file
from mugbench.data.pretrain import resolve_data

# The shard sets here hold 1-3 shards: one sample stream reads them (each of data.streams needs a shard).
ONE_STREAM = ["data.streams=1"]


def _image(fmt: str, colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buf, fmt)
    return buf.getvalue()


PNG, JPEG = _image("PNG"), _image("JPEG")


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))


def _sample(key: str, image: bytes | None, ext: str = "png") -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", image)] if image is not None else []
    return members + [(f"{key}.txt", f"a red square ({key})".encode()), (f"{key}.json", b'{"status": "success"}')]


def _shard_set(root: Path, per_shard: int = 4) -> tuple[list[str], int]:
    """Three shards: keys with dots, PNG, JPEG, upper-case and .jpeg suffixes, a key with no image, a
    stray member of an unknown kind, webdataset metadata, a folder entry, and one shard cut off inside
    an image. Returns the shard paths and how many samples with an image they really hold."""
    root.mkdir(parents=True, exist_ok=True)
    shard0 = [m for i in range(per_shard) for m in _sample(f"s0/img.{i}.v2", PNG if i % 2 else JPEG,
                                                             "png" if i % 2 else "jpg")]
    shard0 += _sample("s0/no-image", None) + [("s0/README.md", b"made by another tool"), ("__meta__", b"{}")]
    shard1 = [m for i in range(per_shard) for m in _sample(f"s1/{i:04d}", JPEG, ("jpeg", "JPG")[i % 2])]
    shard2 = [m for i in range(per_shard + 1) for m in _sample(f"s2/photo.{i}", PNG)]
    paths = [root / f"{i:05d}.tar" for i in range(3)]
    for path, members in zip(paths, (shard0, shard1, shard2)):
        _write_shard(path, members)
    with tarfile.open(paths[1], "a") as tar:  # a directory entry is not a member of any sample
        info = tarfile.TarInfo("s1/extra")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    with tarfile.open(paths[2]) as tar:  # cut inside the last sample's image, as a broken download is
        last = tar.getmember(f"s2/photo.{per_shard}.png")
    paths[2].write_bytes(paths[2].read_bytes()[:last.offset_data + 10])
    return [str(p) for p in paths], 3 * per_shard


def _pipeline_count(urls: list[str]) -> int:
    """Samples with an image as the training pipeline's own reader groups them."""
    samples = wds.DataPipeline(wds.SimpleShardList(urls), TarSamples(SkipCounter().tar_handler))
    return sum(any(k in s for k in IMAGE_KEYS) for s in samples)


def test_stats_files_are_summed_when_every_shard_has_one(tmp_path):
    urls, _ = _shard_set(tmp_path / "shards")
    successes = [7, 11, 5]  # not the tars' real counts: the stats files are what is read
    for url, n in zip(urls, successes):
        stats_file(url).write_text(json.dumps({"count": n + 2, "successes": n, "failed_to_download": 2,
                                               "failed_to_resize": 0, "duration": 1.5, "status_dict": {}}))
    assert stats_file(urls[0]) == tmp_path / "shards" / "00000_stats.json"
    lines = []
    assert count_samples(urls, tmp_path / "cache", log=lines.append) == (23, "img2dataset stats files")
    assert lines == [] and not (tmp_path / "cache").exists()  # nothing to cache
    stats_file(urls[1]).unlink()  # one shard without: the headers are counted instead, and it is said why
    total, source = count_samples(urls, tmp_path / "cache", log=lines.append)
    assert (total, source) == (12, "a header pass over 3 shards")
    assert lines == ["not using img2dataset stats files: 1 of 3 shards have none"]
    stats_file(urls[1]).write_text('{"count": 3}')  # no successes: not trusted either
    assert count_samples(urls, tmp_path / "cache2", log=lines.append)[0] == 12
    assert "has no count of successes" in lines[-1]


def test_header_count_equals_what_the_training_pipeline_reads(tmp_path):
    urls, real = _shard_set(tmp_path / "shards")
    assert real == 12 and _pipeline_count(urls) == real
    assert [shard_count.count_shard(u) for u in urls] == [4, 4, 4]
    assert count_samples(urls, tmp_path / "cache") == (real, "a header pass over 3 shards")
    gz = tmp_path / "shards" / "00003.tar.gz"  # compressed shards are read through, but counted the same
    with tarfile.open(gz, "w:gz") as tar, tarfile.open(urls[0]) as plain:
        for member in plain.getmembers():
            tar.addfile(member, plain.extractfile(member))
    assert shard_count.count_shard(str(gz)) == _pipeline_count([str(gz)]) == 4


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_header_reader_agrees_with_tarfile_or_hands_over(tmp_path, fmt):
    # Long keys need a ustar prefix, GNU long-name or pax headers; the fast reader takes the first and
    # leaves the others to tarfile.
    folder = "f" * 90 + "/" + "g" * 60 if fmt == tarfile.USTAR_FORMAT else "k" * 150
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(3):
            for ext, data in (("jpg", JPEG), ("txt", b"caption")):
                info = tarfile.TarInfo(f"{folder}/photo.{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    fast = shard_count._plain_member_names(str(path))
    slow = list(shard_count._tarfile_member_names(str(path)))
    assert slow == [f"{folder}/photo.{i}.{ext}" for i in range(3) for ext in ("jpg", "txt")]
    assert fast == (slow if fmt == tarfile.USTAR_FORMAT else None)
    assert shard_count.count_shard(str(path)) == _pipeline_count([str(path)]) == 3
    urls, _ = _shard_set(tmp_path / "shards")
    for url in urls:
        assert shard_count._plain_member_names(url) == list(shard_count._tarfile_member_names(url))


def test_count_is_cached_and_recounted_when_a_shard_changes(tmp_path, monkeypatch):
    urls, real = _shard_set(tmp_path / "shards")
    cache = tmp_path / "cache"
    assert count_samples(urls, cache) == (real, "a header pass over 3 shards")
    (entry,) = (cache / "shard-counts").glob("*.json")
    assert json.loads(entry.read_text())["per_shard"] == [4, 4, 4]
    calls = []
    real_count_shard = shard_count.count_shard

    def counting(path, log=print):
        calls.append(path)
        return real_count_shard(path, log)

    def no_header_reads(path, log=print):
        raise AssertionError(f"{path} was read again although its count is cached")

    monkeypatch.setattr(shard_count, "count_shard", no_header_reads)
    assert count_samples(urls, cache) == (real, "a header pass over 3 shards (cached)")

    monkeypatch.setattr(shard_count, "count_shard", counting)
    _write_shard(Path(urls[1]), [m for i in range(6) for m in _sample(f"n/{i}", PNG)])  # size and mtime change
    assert count_samples(urls, cache) == (14, "a header pass over 3 shards")
    assert calls == urls
    calls.clear()
    stat = os.stat(urls[0])
    os.utime(urls[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched only: mtime alone changes
    assert count_samples(urls, cache) == (14, "a header pass over 3 shards")
    assert calls == urls
    calls.clear()
    live = max((cache / "shard-counts").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    live.write_text("{ damaged")  # a damaged entry is never trusted: counted again
    assert count_samples(urls, cache) == (14, "a header pass over 3 shards")
    assert calls == urls and json.loads(live.read_text())["samples"] == 14


def test_no_samples_remote_shards_and_an_explicit_value(tmp_path):
    (tmp_path / "empty").mkdir()
    _write_shard(tmp_path / "empty" / "00000.tar", _sample("k", None))
    with pytest.raises(BadDataError, match="hold no sample with an image"):
        count_samples([str(tmp_path / "empty" / "00000.tar")], tmp_path / "cache")
    with pytest.raises(DataNotFoundError, match="remote"):
        count_samples(["pipe:curl -s http://example.com/00000.tar"], tmp_path / "cache")
    remote = load_config("smoke", ["data.name=pipe:cat /x/{00000..00001}.tar"])
    with pytest.raises(DataNotFoundError, match="data.samples_per_epoch"):
        resolve_data(remote, None, tmp_path / "cache", log=print)

    urls, _ = _shard_set(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "{00000..00002}.tar")
    lines = []
    explicit = load_config("smoke", [f"data.name={pattern}", "data.samples_per_epoch=1000", *ONE_STREAM])
    assert resolve_data(explicit, None, tmp_path / "cache", log=lines.append).samples == 1000
    for url, n in zip(urls, (40, 41, 42)):
        stats_file(url).write_text(json.dumps({"successes": n}))
    counted = load_config("smoke", [f"data.name={pattern}", *ONE_STREAM])
    assert resolve_data(counted, None, tmp_path / "cache", log=lines.append).samples == 123
    assert lines == ["samples per epoch: 1,000 from data.samples_per_epoch",
                     "samples per epoch: 123 from img2dataset stats files"]


@pytest.mark.parametrize("with_stats", [False, True])
def test_a_foreign_shard_set_trains_without_samples_per_epoch(tmp_path, capsys, with_stats):
    from mugbench.cli import main

    urls, real = _shard_set(tmp_path / "shards", per_shard=16)  # 48 samples: one batch of 32 per epoch
    if with_stats:  # as img2dataset leaves them: each shard's successes
        for url in urls:
            stats_file(url).write_text(json.dumps({"count": 20, "successes": 16, "failed_to_download": 4}))
    source = "img2dataset stats files" if with_stats else "a header pass over 3 shards"
    pattern = str(tmp_path / "shards" / "{00000..00002}.tar")
    args = ["run", "--methods", "mae", "--preset", "smoke", "--data", pattern, "--evals", "knn", "--set", *ONE_STREAM,
            "--cache-dir", str(tmp_path / "cache"), "--workdir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"samples per epoch: {real} from {source}" in out
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json")]
    assert records and all(r["pretrain_data"] == pattern and r["steps"] == real // 32 for r in records)


def _stats_set(root: Path, counts: list[int]) -> str:
    """Shards of ``counts`` JPEG samples each with img2dataset's stats files (their real counts); the pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(counts):
        _write_shard(root / f"{i:05d}.tar", [m for k in range(n) for m in _sample(f"{i}{k:04d}", JPEG, "jpg")])
        stats_file(root / f"{i:05d}.tar").write_text(json.dumps({"count": n + 1, "successes": n}))
    return str(root / f"{{00000..{len(counts) - 1:05d}}}.tar")


def test_the_paper_preset_counts_its_named_set(tmp_path, monkeypatch):
    # paper.yaml sets no epoch length: a named set under the data root is counted like a pattern.
    from mugbench.data import catalog

    monkeypatch.setitem(catalog.PRETRAIN_SETS, "cc3m", "cc3m/{00000..00001}.tar")  # a two-shard "download"
    _stats_set(tmp_path / "root" / "cc3m", [5, 6])
    cfg = load_config("paper", ONE_STREAM)
    assert cfg.data.name == "cc3m" and cfg.data.samples_per_epoch is None
    lines, warnings = [], []
    data = resolve_data(cfg, tmp_path / "root", tmp_path / "cache", log=lines.append, warn=warnings.append)
    assert data.samples == 11 and len(data.urls) == 2
    assert lines == ["samples per epoch: 11 from img2dataset stats files"] and warnings == []


@pytest.mark.parametrize("explicit,warned", [(100, False), (103, False), (97, False), (104, True), (64, True)])
def test_an_explicit_epoch_length_wins_and_is_checked_against_the_shards(tmp_path, explicit, warned):
    pattern = _stats_set(tmp_path / "shards", [60, 40])  # 100 samples
    cfg = load_config("paper", [f"data.name={pattern}", f"data.samples_per_epoch={explicit}", *ONE_STREAM])
    lines, warnings = [], []
    data = resolve_data(cfg, None, tmp_path / "cache", log=lines.append, warn=warnings.append)
    assert data.samples == explicit and lines == [f"samples per epoch: {explicit} from data.samples_per_epoch"]
    if warned:  # both numbers, where the count came from, and that the explicit value is used
        (warning,) = warnings
        assert f"data.samples_per_epoch={explicit}" in warning and "the 100 samples" in warning
        assert "img2dataset stats files" in warning and f"the explicit {explicit} is used" in warning
    else:
        assert warnings == []


def test_resampled_or_remote_shards_are_not_checked(tmp_path, monkeypatch):
    # With data.resampled an epoch is deliberately N draws from a larger set (README's LAION example):
    # nothing is counted, so 41k shards cost nothing either.
    pattern = _stats_set(tmp_path / "shards", [10])
    monkeypatch.setattr(shard_count, "count_samples", lambda *a, **k: pytest.fail("counted resampled shards"))
    cfg = load_config("paper", [f"data.name={pattern}", "data.samples_per_epoch=1000", "data.resampled=true"])
    warnings = []
    assert resolve_data(cfg, None, tmp_path / "cache", log=print, warn=warnings.append).samples == 1000
    remote = load_config("paper", ["data.name=pipe:cat /x/{00000..00001}.tar", "data.samples_per_epoch=1000",
                                   *ONE_STREAM])
    assert resolve_data(remote, None, tmp_path / "cache", log=print, warn=warnings.append).samples == 1000
    assert warnings == []


def test_the_mismatch_warning_goes_to_stderr_by_default_and_a_failed_count_only_warns(tmp_path, capsys):
    urls, real = _shard_set(tmp_path / "shards")  # no stats files: a header pass
    pattern = str(tmp_path / "shards" / "{00000..00002}.tar")
    cfg = load_config("smoke", [f"data.name={pattern}", "data.samples_per_epoch=64", *ONE_STREAM])
    assert resolve_data(cfg, None, tmp_path / "cache", log=print).samples == 64
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "samples per epoch: 64 from data.samples_per_epoch"
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]  # beside the count's bar
    assert warning.startswith("warning: data.samples_per_epoch=64 differs from the 12 samples") and \
        "a header pass over 3 shards" in warning
    (tmp_path / "empty").mkdir()
    _write_shard(tmp_path / "empty" / "00000.tar", _sample("k", None))  # nothing to count: said, not raised
    cfg = load_config("smoke", [f"data.name={tmp_path / 'empty' / '00000.tar'}", "data.samples_per_epoch=64",
                               *ONE_STREAM])
    warnings = []
    assert resolve_data(cfg, None, tmp_path / "cache", log=print, warn=warnings.append).samples == 64
    assert len(warnings) == 1 and "could not be checked" in warnings[0] and "no sample with an image" in warnings[0]
