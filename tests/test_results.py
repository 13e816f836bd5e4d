"""Result records: round trip, atomic and concurrent writes, forgiving loads, shipped references."""

from __future__ import annotations

import json
import math
import multiprocessing
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from mugbench.results import (
    MalformedRecordWarning,
    ResultRecord,
    collect_versions,
    git_commit,
    load_records,
    load_references,
    record_path,
    write_record,
)



def make_record(method="mae", protocol="knn", dataset="toy-cls", seed=0, preset="smoke", pretrain_data="toy", **metrics):
    """A small, fully specified record; provenance is fixed so tests never shell out to git."""
    return ResultRecord(
        method=method,
        protocol=protocol,
        dataset=dataset,
        pretrain_data=pretrain_data,
        preset=preset,
        seed=seed,
        metrics=metrics or {"top1": 50.0},
        method_options={"mask_ratio": 0.75},
        protocol_options={"k": 20},
        encoder={"arch": "vit", "embed_dim": 64, "depth": 2, "patch_size": 4, "img_size": 32},
        epochs=2.0,
        steps=10,
        timings={"pretrain_s": 1.5, "eval_s": 0.5, "images_per_s": 100.0},
        skipped_samples={"decode": 1},
        overrides=["train.lr=0.001"],
        versions={"python": "3.11"},
        git_commit=None,
        created="2024-01-01T00:00:00+00:00",
        run_id=f"{method}-{seed}",
        host="test",
    )


def test_record_round_trip_through_json(tmp_path):
    record = make_record(top1=61.25, top5=88.0)
    path = write_record(record, tmp_path)
    assert path == tmp_path / "toy" / "smoke" / "mae" / "knn-toy-cls-seed0.json"
    assert ResultRecord.from_dict(json.loads(path.read_text())) == record
    assert load_records(tmp_path) == [record]
    assert record.to_dict()["schema"] == 1


def test_defaults_fill_provenance():
    record = ResultRecord(method="m", protocol="knn", dataset="d", pretrain_data="toy", preset="p", seed=1, metrics={})
    assert record.versions["python"] and "torch" in record.versions and "mugbench" in record.versions
    assert record.created and record.run_id and record.host
    assert collect_versions()["python"] == record.versions["python"]
    git_commit("/nonexistent/dir")  # best effort: must not raise


def test_record_path_sanitises_and_never_collides(tmp_path):
    a = record_path(tmp_path, make_record(pretrain_data="data/{000..009}.tar"))
    b = record_path(tmp_path, make_record(pretrain_data="data_{000..009}.tar"))
    assert a != b
    assert a.is_relative_to(tmp_path) and ".." not in a.relative_to(tmp_path).parts
    assert "/" not in a.relative_to(tmp_path).parts[0]


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    write_record(make_record(top1=1.0), tmp_path)
    path = write_record(make_record(top1=2.0), tmp_path)  # same key: last writer wins
    assert json.loads(path.read_text())["metrics"] == {"top1": 2.0}
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_non_finite_metric_is_rejected_without_leaving_a_file(tmp_path):
    with pytest.raises(ValueError):
        write_record(make_record(top1=math.nan), tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_concurrent_thread_writes_all_land(tmp_path):
    with ThreadPoolExecutor(max_workers=8) as pool:
        paths = list(pool.map(lambda s: write_record(make_record(seed=s, top1=float(s)), tmp_path), range(16)))
    assert len(set(paths)) == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = load_records(tmp_path)
    assert sorted(r.seed for r in records) == list(range(16))
    assert not list(tmp_path.rglob("*.tmp"))


def test_concurrent_writes_of_one_key_leave_one_whole_file(tmp_path):
    with ThreadPoolExecutor(max_workers=8) as pool:
        paths = set(pool.map(lambda v: write_record(make_record(top1=float(v)), tmp_path), range(32)))
    (path,) = paths
    assert json.loads(path.read_text())["metrics"]["top1"] in {float(v) for v in range(32)}
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def _write_many(args) -> int:
    results_dir, writer = args
    for i in range(50):
        write_record(make_record(seed=writer * 1000 + i, top1=float(i)), results_dir)
    return writer


def test_eight_processes_writing_fifty_records_each_lose_none(tmp_path):
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        assert sorted(pool.map(_write_many, [(str(tmp_path), w) for w in range(8)])) == list(range(8))
    records = load_records(tmp_path)
    assert len(records) == 400 and len({r.seed for r in records}) == 400
    assert not list(tmp_path.rglob("*.tmp"))


def test_malformed_files_are_skipped_with_a_warning(tmp_path):
    good = write_record(make_record(), tmp_path)
    bad_json = good.with_name("broken.json")
    bad_json.write_text("{ not json")
    bad_record = good.with_name("incomplete.json")
    bad_record.write_text(json.dumps({"method": "mae"}))
    with pytest.warns(MalformedRecordWarning) as caught:
        records = load_records(tmp_path)
    assert records == [make_record()]
    messages = " ".join(str(w.message) for w in caught)
    assert "broken.json" in messages and "incomplete.json" in messages


def test_references_are_not_records(tmp_path):
    write_record(make_record(), tmp_path)
    (tmp_path / "references").mkdir()
    (tmp_path / "references" / "extra.json").write_text(json.dumps({"references": [{"claim": "c", "source": "s"}]}))
    assert len(load_records(tmp_path)) == 1
    refs = load_references(tmp_path)
    assert refs and all(r["reference"] is True and r["source"] for r in refs)
    values = {(r["method"], r["protocol"], r["dataset"], r["metric"]): r["value"] for r in refs if "method" in r}
    assert any(r["claim"] == "c" for r in refs)  # user-added references join the shipped ones
    assert values[("mae", "finetune", "imagenet", "top1")] == 83.6
    assert values[("mae", "linear", "imagenet", "top1")] == 68.0
    assert values[("mae", "segmentation", "ade20k", "mIoU")] == 48.1
    assert values[("mug", "segmentation", "ade20k", "mIoU")] == 2.0
    assert values[("mug", "finetune", "imagenet", "top1")] == 0.5




def _record_file(tmp_path, value) -> dict:
    """A record as a careless writer puts it on disk: Python's json writes NaN/Infinity bare."""
    data = make_record(seed=7, top1=1.0).to_dict()
    data["metrics"] = {"top1": value, "top5": 90.0}
    path = tmp_path / "toy" / "smoke" / "mae" / f"knn-{value}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))  # allow_nan defaults to True
    return data


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_on_disk_are_refused_with_a_warning_naming_the_file(tmp_path, value):
    good = write_record(make_record(), tmp_path)
    _record_file(tmp_path, value)
    with pytest.raises(ValueError, match="top1"):
        ResultRecord.from_dict(_record_file(tmp_path, value))
    with pytest.warns(MalformedRecordWarning) as caught:
        records = load_records(tmp_path)
    assert records == [make_record()] and good.exists()
    assert f"knn-{value}.json" in str(caught[0].message) and "not finite" in str(caught[0].message)


def test_writing_a_non_finite_metric_names_the_metric(tmp_path):
    with pytest.raises(ValueError, match=r"metric 'top5' of mae/knn/toy-cls seed 0 is inf"):
        write_record(make_record(top1=1.0, top5=math.inf), tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_written_files_get_the_users_umask_not_0600(tmp_path):
    import os
    import stat
    import sys

    import torch

    from mugbench.files import atomic_write_text
    from mugbench.train.checkpoint import load_checkpoint, save_checkpoint

    old = os.umask(0o022)
    try:
        record = write_record(make_record(), tmp_path)
        text = atomic_write_text(tmp_path / "sub" / "notes.md", "hello\n")
        checkpoint = save_checkpoint(tmp_path / "run" / "checkpoint.pt", {"step": torch.tensor(3)})
        if sys.platform.startswith("linux"):  # elsewhere the umask is read once, at import
            os.umask(0o077)  # a private umask is honoured too
            private = atomic_write_text(tmp_path / "private.md", "secret\n")
            assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    for path in (record, text, checkpoint):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert load_checkpoint(checkpoint)["step"].item() == 3
