"""Result records (round trip, atomic and concurrent writes, forgiving loads) and the report tables."""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from mugbench.report.tables import render_markdown, summary_frame, write_report
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


def _study_records():
    records = []
    for seed, (mae, clip) in enumerate([(60.0, 50.0), (62.0, 54.0), (64.0, 55.0)]):
        records.append(make_record("mae", seed=seed, top1=mae))
        records.append(make_record("clip", seed=seed, top1=clip))
    records.append(make_record("mug", seed=0, top1=70.0))
    records.append(make_record("mae", protocol="linear", seed=0, top1=40.0))
    return records


def test_summary_aggregates_over_seeds():
    frame = summary_frame(_study_records())
    mae = frame.loc[("toy", "smoke", "mae")]
    assert mae[("knn", "toy-cls", "top1", "mean")] == pytest.approx(62.0)
    assert mae[("knn", "toy-cls", "top1", "std")] == pytest.approx(2.0)
    assert mae[("knn", "toy-cls", "top1", "n")] == 3
    clip = frame.loc[("toy", "smoke", "clip")]
    assert clip[("knn", "toy-cls", "top1", "mean")] == pytest.approx(53.0)
    assert clip[("knn", "toy-cls", "top1", "std")] == pytest.approx(statistics.stdev([50.0, 54.0, 55.0]))
    mug = frame.loc[("toy", "smoke", "mug")]
    assert mug[("knn", "toy-cls", "top1", "n")] == 1 and math.isnan(mug[("knn", "toy-cls", "top1", "std")])
    assert math.isnan(mug[("linear", "toy-cls", "top1", "mean")])


def test_markdown_formats_cells_and_bolds_the_best():
    text = render_markdown(summary_frame(_study_records()), [])
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "62.0 ± 2.0 (n=3)" in rows["mae"]
    assert "**70.0**" in rows["mug"]  # single seed: plain value, and the best k-NN
    assert "**" not in rows["clip"]
    assert "**40.0**" not in rows["mae"]  # only one method has a linear result: no winner
    assert "3 seed(s) (0, 1, 2)" in text


def test_lower_is_better_metrics_bold_the_minimum():
    records = [make_record("mae", protocol="reconstruction", mse=0.02), make_record("mug", protocol="reconstruction", mse=0.05)]
    text = render_markdown(summary_frame(records), [])
    assert "**0.02**" in text and "**0.05**" not in text


def test_baseline_scores_beside_a_metric_are_never_bold():
    records = [make_record(m, protocol="segmentation", mIoU=v, background_mIoU=9.4)
               for m, v in (("mae", 15.3), ("mug", 17.3))]
    rows = {line.split("|")[1].strip(): line for line in
            render_markdown(summary_frame(records), []).splitlines() if line.startswith("| ")}
    assert "**17.3**" in rows["mug"] and "**9.4**" not in rows["mug"] + rows["mae"]


def test_report_from_results_dir_alone(tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    for record in _study_records():
        write_record(record, results)
    write_record(make_record("mae", preset="toy", top1=33.0), results)  # a second study

    text = write_report(results, reports)
    assert (reports / "summary.md").read_text() == text
    assert "preset `smoke`" in text and "preset `toy`" in text
    assert "Published reference claims (not produced by this run)" in text
    assert "[reference] MAE paper, ImageNet-1k pre-training, ViT-B/16" in text
    assert "83.6" in text and "2.0% mIoU" in text
    csv = (reports / "summary.csv").read_text().splitlines()
    assert csv[0] == "pretrain_data,preset,method,protocol,dataset,metric,mean,std,n"
    assert "toy,smoke,mae,knn,toy-cls,top1,62.0,2.0,3" in csv
    assert sorted(p.name for p in reports.iterdir()) == ["summary.csv", "summary.md"]


def test_report_with_no_records_says_so(tmp_path):
    text = write_report(tmp_path / "empty", tmp_path / "reports")
    assert f"No result records found under `{tmp_path / 'empty'}`" in text
    # With no records at all, the shipped references still appear.
    text = render_markdown(summary_frame([]), load_references(tmp_path / "empty"))
    assert "No result records found" in text and "[reference] MUG" in text
