"""`mugbench report`: records -> tables (values, means, stds, bold, margins, gaps, references),
figures, filters and groupings, forgiving loads, and byte-identical rebuilds."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from torchvision.utils import save_image

from mugbench.report import Selection, summary_frame, write_report
from mugbench.results import write_record

from test_results import make_record

SEEDS = (0, 1, 2)
# (method, protocol, dataset, metric) -> one value per seed; mae has no zero-shot (no text tower).
VALUES = {
    ("simclr", "linear", "toy-cls", "top1"): (35.0, 36.0, 37.0),
    ("mae", "linear", "toy-cls", "top1"): (40.0, 42.0, 44.0),
    ("clip", "linear", "toy-cls", "top1"): (33.0, 34.0, 38.0),
    ("mug", "linear", "toy-cls", "top1"): (45.0, 46.0, 50.0),
    ("simclr", "segmentation", "toy-seg", "mIoU"): (15.0, 15.0, 15.0),
    ("mae", "segmentation", "toy-seg", "mIoU"): (16.0, 16.5, 17.0),
    ("clip", "segmentation", "toy-seg", "mIoU"): (14.0, 14.0, 14.0),
    ("mug", "segmentation", "toy-seg", "mIoU"): (17.0, 17.5),  # seed 2 never finished
    ("clip", "zeroshot", "toy-cls", "top1"): (20.0, 21.0, 22.0),
}


def study_records(preset="toy"):
    """The synthetic study above as records, with curves, timings and a linear grid."""
    records = []
    for (method, protocol, dataset, metric), values in VALUES.items():
        for seed, value in zip(SEEDS, values):
            r = make_record(method, protocol=protocol, dataset=dataset, seed=seed, preset=preset, **{metric: value})
            r.loss_curve = {"step": [10, 20, 30], "loss": [3.0 - seed * 0.1, 2.0, 1.5]}
            r.timings = {"pretrain_s": 10.0, "images_per_s": 100.0 + seed, "peak_memory_mb": 900.0, "eval_s": 1.0}
            if protocol == "linear":
                r.protocol_options = {"grid_top1": {"0.1": value - 2, "0.3": value}}
            records.append(r)
    return records


def rows(text: str) -> dict[str, str]:
    """Markdown table rows of the first table by their method cell."""
    table = text.split("<details>")[0].split("Ranking on transfer")[0]
    return {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith("| ")}


def test_table_cells_are_mean_and_sample_std_with_the_best_in_bold():
    frame = summary_frame(study_records())
    mae = frame.loc[("toy", "toy", "single-modal generative", "mae")]
    assert mae[("linear", "toy-cls", "top1", "mean")] == pytest.approx(42.0)
    assert mae[("linear", "toy-cls", "top1", "std")] == pytest.approx(2.0)
    assert mae[("linear", "toy-cls", "top1", "n")] == 3
    mug = frame.loc[("toy", "toy", "multi-modal generative", "mug")]
    assert mug[("segmentation", "toy-seg", "mIoU", "std")] == pytest.approx(statistics.stdev([17.0, 17.5]))

    text = write_report_text(study_records())
    r = rows(text)
    assert "| 42.0 ± 2.0 ≈ |" in r["mae"]  # 5 points behind mug, but Welch's p = 0.064 over 3 seeds: tied
    assert "**47.0 ± 2.6**" in r["mug"]  # mean 47, std of (45, 46, 50)
    assert "**17.2 ± 0.4 (n=2)**" in r["mug"]  # fewer seeds than the table: the count shows
    assert "| — |" in r["mae"]  # no zero-shot for mae: a dash, never 0
    assert "0.0" not in r["mae"]


def test_rows_are_grouped_by_paradigm_in_the_papers_order():
    text = write_report_text(study_records())
    order = [line.split("|")[1].strip() or "…" for line in text.split("<details>")[0].splitlines()
             if line.startswith("| ") and "method" not in line]
    assert order[:4] == ["single-modal discriminative", "single-modal generative", "multi-modal discriminative",
                         "multi-modal generative"]
    assert list(rows(text))[:5] == ["method", "simclr", "mae", "clip", "mug"]


def test_margin_row_names_the_best_and_the_runner_up():
    r = rows(write_report_text(study_records()))
    margin = r["*best − runner-up*"]
    assert "+5.0 (mug over mae)" in margin  # linear: 47.0 - 42.0
    assert "+0.75 (mug over mae)" in margin  # segmentation: 17.25 - 16.5
    assert "+1.0 (mug over mae)" not in margin


def test_the_papers_claims_sit_beside_our_margins():
    text = write_report_text(study_records())
    section = text.split("## The paper's margins beside ours")[1].split("##")[0]
    seg = next(line for line in section.splitlines() if "2.0% mIoU" in line)
    assert "| +2.0 |" in seg and "segmentation mIoU (toy-seg)" in seg and "+0.75 (mug leads; next best mae)" in seg
    assert "| within noise (Welch p = 0.15) |" in seg  # mug (17, 17.5) against mae (16, 16.5, 17)
    assert "| 2 of 3 |" in seg
    fine = next(line for line in section.splitlines() if "0.5% on ImageNet" in line)
    assert "no matching column" in fine  # no fine-tuning records: said, not invented


def test_missing_cells_are_listed_and_not_applicable_ones_told_apart():
    text = write_report_text(study_records())
    missing = text.split("Missing from this table:")[1].split("<details>")[0]
    assert "- mug: too few seeds for segmentation mIoU (toy-seg) (2 of 3 seeds)" in missing
    assert "- mug: no result for zero-shot top1 (toy-cls)" in missing  # mug can score captions
    assert "not applicable, zeroshot: simclr, mae" in missing


def test_published_figures_are_labelled_rows_never_cells_of_ours():
    records = [make_record(m, protocol="finetune", dataset="imagenet", seed=0, preset="paper", top1=v)
               for m, v in (("mae", 80.0), ("mug", 81.0))]
    text = write_report_text(records)
    ref = rows(text)["[reference] MAE paper, ImageNet-1k pre-training, ViT-B/16"]
    assert ref.startswith("| *published* |") and "| 83.6 |" in ref and "**" not in ref
    assert "**81.0**" in rows(text)["mug"]  # our best stays ours, despite the higher published figure
    assert "Source: He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022" in text


def test_csv_and_latex_carry_the_same_numbers(tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    for r in study_records():
        write_record(r, results)
    write_report(results, reports, figures=False)
    csv = (reports / "summary.csv").read_text().splitlines()
    assert csv[0] == "pretrain_data,preset,paradigm,method,protocol,dataset,metric,mean,std,n"
    assert "toy,toy,single-modal generative,mae,linear,toy-cls,top1,42.0,2.0,3" in csv
    tex = (reports / "summary.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\textbf{47.0 $\\pm$ 2.6}" in tex
    assert "mae & 42.0 $\\pm$ 2.0 $\\approx$ & 16.5 $\\pm$ 0.5 $\\approx$ & --- \\\\" in tex
    assert "clip & 35.0 $\\pm$ 2.6 & 14.0 $\\pm$ 0.0 & 21.0 $\\pm$ 1.0 \\\\" in tex  # resolved: no mark
    assert "multi-modal generative & mug" in tex


def test_figures_are_drawn_from_records_alone(tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    for r in study_records():
        write_record(r, results)
    # A reconstruction grid and captions of the same two images, as the harness writes them.
    for method in ("mae", "mug"):
        rec = make_record(method, protocol="reconstruction", dataset="toy-caps", preset="toy", masked_mse=0.2)
        rec.protocol_options = {"figure": "reconstruction-toy-caps-seed0.png"}
        rec.examples = [{"key": "a"}, {"key": "b"}]
        grid = write_record(rec, results).with_suffix(".png")
        save_image(torch.rand(6, 3, 32, 32), grid, nrow=2, padding=2)
    cap = make_record("mug", protocol="captioning", dataset="toy-caps", preset="toy", cider=40.0)
    cap.examples = [{"key": "b", "generated": "a red square", "reference": "a big red square"},
                    {"key": "a", "generated": "a blue disc", "reference": "a small blue disc"}]
    write_record(cap, results)
    write_record(make_record("mae", protocol="train-step", dataset="synthetic", preset="toy",
                             step_ms=10.0, time_ratio_to_plain_vit=0.6), results)
    # A compiled measurement of the same step is its own record and its own chart.
    write_record(make_record("mae", protocol="train-step", dataset="synthetic-compiled", preset="toy",
                             step_ms=8.0, time_ratio_to_plain_vit=0.5), results)

    write_report(results, reports)
    figures = sorted(p.name for p in (reports / "figures").iterdir())
    for kind in ("bars", "loss", "throughput", "examples", "linear-lr"):
        for suffix in ("png", "pdf"):
            assert f"toy-toy-{kind}.{suffix}" in figures
    assert sum(name.startswith("bench-toy") and name.endswith(".png") for name in figures) == 2
    assert any("synthetic_compiled" in name for name in figures)
    for path in (reports / "figures").iterdir():
        assert path.stat().st_size > 5_000
        if path.suffix == ".png":  # not a blank canvas
            import matplotlib.pyplot as plt
            assert np.asarray(plt.imread(path))[..., :3].std() > 0.05
    index = (reports / "README.md").read_text()
    assert "![examples](figures/toy-toy-examples.png)" in index and "| mae |" in index
    # a rebuild from fewer records removes the figures it no longer draws
    for path in results.rglob("reconstruction-*"):
        path.unlink()
    write_report(results, reports)
    assert not (reports / "figures" / "toy-toy-examples.png").exists()


def test_rebuilding_gives_identical_tables(tmp_path):
    results = tmp_path / "results"
    for r in study_records():
        write_record(r, results)
    write_report(results, tmp_path / "a")
    write_report(results, tmp_path / "b")
    for name in ("summary.md", "summary.csv", "summary.tex", "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for png in (tmp_path / "a" / "figures").glob("*.png"):
        assert png.read_bytes() == (tmp_path / "b" / "figures" / png.name).read_bytes()


def test_malformed_and_foreign_files_are_listed_and_skipped(tmp_path):
    results = tmp_path / "results"
    for r in study_records():
        write_record(r, results)
    (results / "notes.json").write_text(json.dumps({"hello": "a foreign file"}))
    (results / "toy" / "broken.json").write_text('{"method": "mae", ')
    text = write_report(results, tmp_path / "reports", figures=False)
    skipped = text.split("## Files skipped (not records)")[1]
    assert "notes.json" in skipped and "missing required field" in skipped
    assert "broken.json" in skipped
    assert "| 42.0 ± 2.0 ≈ |" in rows(text)["mae"]  # the good records still make the table


def test_filters_and_groupings(tmp_path):
    results = tmp_path / "results"
    for r in study_records() + study_records(preset="toy-long"):
        write_record(r, results)
    only = write_report(results, tmp_path / "r1", selection=Selection(studies=("toy",), protocols=("linear",),
                                                                       methods=("mae", "mug")), figures=False)
    assert "preset `toy-long`" not in only and "segmentation mIoU" not in only.split("## The paper")[0]
    assert set(rows(only)) == {"method", "mae", "mug", "*best − runner-up*"}
    by_seed = write_report(results, tmp_path / "r2", by="seed", selection=Selection(studies=("toy",)), figures=False)
    # one seed per row and no per-example outcomes: no test can compare a row with the best
    assert "| 44.0 ? |" in rows(by_seed)["mae · seed 2"] and "±" not in rows(by_seed)["mae · seed 2"]
    by_preset = write_report(results, tmp_path / "r3", by="preset", figures=False)
    assert "preset `all presets`" in by_preset
    assert {"mae · toy", "mae · toy-long"} <= set(rows(by_preset))
    with pytest.raises(ValueError, match="unknown grouping"):
        summary_frame(study_records(), by="colour")


def test_no_records_says_so_and_still_lists_the_references(tmp_path):
    text = write_report(tmp_path / "empty", tmp_path / "reports")
    assert f"No result records found under `{tmp_path / 'empty'}`" in text
    assert "[reference] MUG (Zhao et al., TMLR 2024)" in text


def write_report_text(records, **kwargs) -> str:
    """The summary Markdown of ``records`` (tables only)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        for r in records:
            write_record(r, Path(tmp) / "results")
        return write_report(Path(tmp) / "results", Path(tmp) / "reports", figures=False, **kwargs)


def test_committed_reports_match_the_committed_results(tmp_path, monkeypatch):
    # `mugbench report` on a clean clone must give the committed tables byte for byte.
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    write_report(Path("reference/results"), tmp_path, figures=False)
    for name in ("summary.md", "summary.csv", "summary.tex"):
        assert (tmp_path / name).read_text() == (repo / "reference" / "reports" / name).read_text(), (
            f"reference/reports/{name} is stale: rebuild it with "
            f"`mugbench report --results reference/results --reports reference/reports` from the repository root")


def test_ranking_on_transfer_and_the_papers_pairwise_claims():
    text = write_report_text(study_records())
    section = text.split("Ranking on transfer")[1].split("Missing from this table")[0]
    # linear: mug, mae, simclr, clip; segmentation: mug, mae, simclr, clip -> mean ranks 1, 2, 3, 4
    assert "| 1 | mug | 1.00 | 2 of 2 |" in section and "| 4 | clip | 4.00 | 2 of 2 |" in section
    assert "clip ahead of mae on 0 of 2; clip ahead of simclr on 0 of 2; mug ahead of mae on 2 of 2" in section


def test_a_row_missing_a_transfer_column_is_not_placed():
    records = [r for r in study_records() if not (r.method == "mae" and r.protocol == "segmentation")]
    section = write_report_text(records).split("Ranking on transfer")[1].split("Missing from this table")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "place" not in line]
    # 2nd on linear but tied with mug there (shares its rank), yet listed after the complete rows, unplaced
    assert lines[-1] == "| — | mae | 1.00 | 1 of 2 |"
    assert lines[0].startswith("| 1 | mug |")


@pytest.fixture
def probe_two():
    """A throw-away transfer protocol registered as ``probe2`` for one test, forgotten after."""
    from mugbench.protocol import Protocol
    from mugbench.registry import PROTOCOLS, register_protocol

    @register_protocol("probe2")
    class ProbeTwo(Protocol):
        """A probe that exists only in this test: the report must place, label and rank it from its class."""

        label, headline, order, transfer = "probe two", ("acc",), 25, True

    yield ProbeTwo
    PROTOCOLS.unregister("probe2")


def test_a_registered_protocol_gets_its_column_label_place_and_ranking(probe_two):
    # fine-tune ranks as linear does (mug, mae, simclr, clip); probe two the other way round.
    extra = {"finetune": ("top1", {"mug": 30.0, "mae": 20.0, "simclr": 10.0, "clip": 5.0}),
             "probe2": ("acc", {"mug": 60.0, "mae": 70.0, "simclr": 80.0, "clip": 90.0})}
    records = study_records()
    for protocol, (metric, values) in extra.items():
        for method, value in values.items():
            for seed in SEEDS:
                records.append(make_record(method, protocol=protocol, seed=seed, preset="toy",
                                           **{metric: value, "loss": 1.0}))
    # a plugin's protocol that is not installed here: by name, last, every non-baseline metric, unranked
    records += [make_record("mae", protocol="plugin-x", seed=s, preset="toy", score=3.0, background_score=1.0)
                for s in SEEDS]
    text = write_report_text(records)
    header = next(line for line in text.splitlines() if line.startswith("| paradigm | method |"))
    assert [c.strip() for c in header.split("|")[3:-1]] == [
        "linear probe top1 (toy-cls)", "probe two acc (toy-cls)", "fine-tune top1 (toy-cls)",
        "segmentation mIoU (toy-seg)", "zero-shot top1 (toy-cls)", "plugin-x score (toy-cls)"]
    assert {m: rows(text)[m].split("|")[4].strip() for m in ("mae", "simclr", "clip", "mug")} == {
        "mae": "70.0 ± 0.0", "simclr": "80.0 ± 0.0", "clip": "**90.0 ± 0.0**", "mug": "60.0 ± 0.0"}
    section = text.split("Ranking on transfer")[1].split("Missing from this table")[0]
    assert section.startswith(" (mean rank over the linear probe, probe two, fine-tune and segmentation columns;")
    # competition ranks (linear, probe two, fine-tune, segmentation), rows tied with a column's best sharing
    # rank 1 (linear: mae; segmentation: mae, simclr; probe two and fine-tune have no spread: all resolved):
    # mug 1,4,1,1; mae 1,3,2,1; simclr 3,2,3,1; clip 4,1,4,4 -> mug and mae share the first place
    for line in ("| 1 | mae | 1.75 | 4 of 4 |", "| 1 | mug | 1.75 | 4 of 4 |", "| 3 | simclr | 2.25 | 4 of 4 |",
                 "| 4 | clip | 3.25 | 4 of 4 |"):
        assert line in section
    assert "clip ahead of mae on 1 of 4; clip ahead of simclr on 1 of 4" in section


def test_the_ranking_names_its_transfer_protocols_by_their_labels():
    records = study_records() + [make_record(m, protocol=p, seed=s, preset="toy", top1=v)
                                 for p in ("knn", "finetune") for m, v in (("mae", 2.0), ("mug", 1.0))
                                 for s in SEEDS]
    assert ("Ranking on transfer (mean rank over the k-NN, linear probe, fine-tune and segmentation columns;"
            in write_report_text(records))
    assert ("Ranking on transfer (mean rank over the linear probe and segmentation columns;"
            in write_report_text(study_records()))


def test_tables_only_rebuild_leaves_figures_and_index_alone(tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    for r in study_records():
        write_record(r, results)
    write_report(results, reports, by="seed")
    assert sorted(p.name for p in (reports / "figures").glob("*.png")) == ["toy-toy-bars.png"]  # per-run figures need --by method
    index = (reports / "README.md").read_bytes()
    write_record(make_record("mae", protocol="knn", preset="toy", seed=5, top1=1.0), results)
    write_report(results, reports, figures=False)
    assert (reports / "README.md").read_bytes() == index and (reports / "figures" / "toy-toy-bars.png").exists()
    assert "seed(s) (0, 1, 2, 5)" in (reports / "summary.md").read_text()


@pytest.mark.parametrize("bad", ["NaN", "Infinity"])
def test_non_finite_metric_records_are_listed_and_left_out_of_every_table(tmp_path, bad):
    results = tmp_path / "results"
    for r in study_records():
        write_record(r, results)
    # A fourth mae seed whose top1 is NaN/Infinity, as json.dumps writes them by default.
    data = make_record("mae", protocol="linear", dataset="toy-cls", seed=3, preset="toy", top1=1.0).to_dict()
    path = results / "toy" / "toy" / "mae" / "linear-toy-cls-seed3.json"
    path.write_text(json.dumps(data).replace('"top1": 1.0', f'"top1": {bad}'))
    assert bad in path.read_text()
    text = write_report(results, tmp_path / "reports", figures=False)
    skipped = text.split("## Files skipped (not records)")[1]
    assert "linear-toy-cls-seed3.json" in skipped and "not finite" in skipped
    assert "| 42.0 ± 2.0 ≈ |" in rows(text)["mae"]  # the three finite seeds, n=3: the bad one is not counted
    assert "seed(s) (0, 1, 2)." in text
    for name in ("summary.md", "summary.csv", "summary.tex"):
        body = (tmp_path / "reports" / name).read_text().split("## Files skipped")[0]
        assert "inf" not in body.lower().replace("info", "") and "nan" not in body.lower()


def _examples_records(results, figure_of):
    """Reconstruction records of mae and mug whose ``figure`` is ``figure_of(method, grid path)``."""
    for method in ("mae", "mug"):
        rec = make_record(method, protocol="reconstruction", dataset="toy-caps", preset="toy", masked_mse=0.2)
        rec.examples = [{"key": "a"}, {"key": "b"}]
        path = write_record(rec, results)
        rec.protocol_options = {"figure": figure_of(method, path)}
        write_record(rec, results)


def test_figure_paths_outside_the_results_folder_are_never_read(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    results, reports = tmp_path / "results", tmp_path / "reports"
    for r in study_records():
        write_record(r, results)
    outside = tmp_path / "outside.png"  # a real image, so only the confinement keeps it out
    save_image(torch.rand(6, 3, 32, 32), outside, nrow=2, padding=2)
    figures = {"mae": "../../../../outside.png", "mug": str(outside)}
    _examples_records(results, lambda method, path: figures[method])
    cap = make_record("mae", protocol="reconstruction", dataset="toy-caps", preset="toy", seed=1, masked_mse=0.3)
    passwd = "../" * 12 + "etc/passwd"  # climbs past / whatever the depth of tmp_path
    cap.protocol_options = {"figure": passwd}
    write_record(cap, results)
    read = []
    real_imread = plt.imread
    monkeypatch.setattr(plt, "imread", lambda p, *a, **k: read.append(str(p)) or real_imread(p, *a, **k))

    text = write_report(results, reports)
    assert read == []
    assert not (reports / "figures" / "toy-toy-examples.png").exists()
    skipped = text.split("## Files skipped (not records)")[1]
    for figure in ("../../../../outside.png", str(outside), passwd):
        assert f"figure path '{figure}'" in skipped
    assert skipped.count("outside the results folder") == 3
    assert "mae/reconstruction/toy-caps seed 1" in skipped
    # the records' numbers still count: mae's two seeds (0.2, 0.3) and mug's one
    # (mug's one seed: no test, so mae's cell is unresolved)
    assert "| 0.25 ± 0.07 (n=2) ? |" in rows(text)["mae"] and "| **0.2 (n=1)** |" in rows(text)["mug"]


def test_figure_paths_inside_the_results_folder_still_draw(tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    shared = results / "figures" / "grid.png"  # elsewhere in results/, reached with ../: allowed
    shared.parent.mkdir(parents=True)
    save_image(torch.rand(6, 3, 32, 32), shared, nrow=2, padding=2)
    _examples_records(results, lambda method, path: "../../../figures/grid.png")
    text = write_report(results, reports)
    assert (reports / "figures" / "toy-toy-examples.png").exists()
    assert "## Files skipped" not in text


# Statistical resolution (issue 18): synthetic columns whose distributions are known.

def column_records(values: dict[str, tuple[float, ...]], protocol="linear", metric="top1", outcomes=None,
                   paradigms=None):
    """Records of one column: ``values`` maps a method to one value per seed (seeds 0, 1, ...);
    ``outcomes`` maps a method to one boolean array per seed, kept packed as the harness keeps them."""
    from mugbench.results import pack_outcomes

    records = []
    for method, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            r = make_record(method, protocol=protocol, dataset="toy-cls", seed=seed, preset="toy", **{metric: value})
            if outcomes and method in outcomes:
                r.per_example = {metric: pack_outcomes(outcomes[method][seed])}
            r.paradigm = (paradigms or {}).get(method, r.paradigm)
            records.append(r)
    return records


def linear_cells(text: str) -> dict[str, str]:
    """The linear-probe cell of each row of the first table."""
    return {row: line.split("|")[3].strip() for row, line in rows(text).items() if row in ("simclr", "mae", "clip",
                                                                                         "mug", "random", "supervised")}


def test_a_clear_win_is_bold_and_the_other_row_unmarked():
    text = write_report_text(column_records({"mae": (60.0, 60.5, 59.5), "mug": (40.0, 40.4, 39.6)}))
    assert linear_cells(text) == {"mae": "**60.0 ± 0.5**", "mug": "40.0 ± 0.4"}  # Welch p ~ 1e-5: resolved
    note = next(line for line in text.splitlines() if line.startswith("≈ = tied"))
    assert "Welch's t-test over the seeds (the table has 3" in note and "α = 0.05" in note
    assert "bootstrap" not in note  # no per-example outcomes kept: that test is not claimed


def test_a_clear_tie_is_marked_tied_with_the_best():
    text = write_report_text(column_records({"mae": (50.0, 50.6, 49.4), "mug": (49.6, 49.0, 49.9)}))
    assert linear_cells(text) == {"mae": "**50.0 ± 0.6**", "mug": "49.5 ± 0.5 ≈"}  # Welch p ~ 0.3


def test_one_seed_only_is_marked_unresolved_not_ranked_as_different():
    text = write_report_text(column_records({"mae": (60.0,), "mug": (40.0,)}))
    assert linear_cells(text) == {"mae": "**60.0**", "mug": "40.0 ?"}
    assert "? = unresolved, no test applies" in text
    ranking = text.split("Ranking on transfer")[1].split("\n\n")[0]
    assert "? = a rank rests on a column where no test could compare the row with the best" in ranking
    assert "| 2 | mug | 2.00 ? | 1 of 1 |" in text


def _outcomes(p: float, n: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < p


def test_per_example_outcomes_resolve_or_tie_by_a_paired_bootstrap():
    from mugbench.report.resolution import BOOTSTRAP, TIED, RESOLVED, Sample, bootstrap_interval, compare

    right = _outcomes(0.6)
    nearly = right.copy()
    nearly[:5] = ~nearly[:5]  # the same examples right or wrong but five: no resolvable difference
    far = _outcomes(0.3, seed=1)
    one_seed = {"mae": (100 * right.mean(),), "mug": (100 * nearly.mean(),), "clip": (100 * far.mean(),)}
    text = write_report_text(column_records(one_seed, outcomes={"mae": [right], "mug": [nearly], "clip": [far]}))
    cells = linear_cells(text)
    assert cells["mug"].endswith(" ≈") and cells["clip"] == f"{100 * far.mean():.1f}"  # resolved: unmarked
    assert "a paired bootstrap over evaluation examples" in text and "Welch" not in text.split("≈ = tied")[1][:200]
    # identical outcomes: the interval is exactly zero, a tie; the samples' seeds are averaged first
    same = Sample(np.array([60.0]), np.stack([right]).astype(float))
    assert bootstrap_interval(same, same) == (0.0, 0.0) and compare(same, same).status == TIED
    two_seeds = Sample(np.array([60.0, 30.0]), np.stack([right, far]).astype(float))
    low, high = bootstrap_interval(same, two_seeds)
    assert 0 < low < (right.mean() - (right.mean() + far.mean()) / 2) < high
    assert compare(same, Sample(np.array([30.0]), np.stack([far]).astype(float))).tests == (BOOTSTRAP,)
    assert compare(same, Sample(np.array([30.0]), np.stack([far]).astype(float))).status == RESOLVED


def test_a_difference_is_resolved_only_when_every_applicable_test_rejects():
    # Welch over 3 seeds rejects (far apart, small spread), but the per-example outcomes are identical:
    # the bootstrap does not reject, so the row is tied.
    right = _outcomes(0.5)
    records = column_records({"mae": (60.0, 60.5, 59.5), "mug": (40.0, 40.4, 39.6)},
                             outcomes={"mae": [right] * 3, "mug": [right] * 3})
    text = write_report_text(records)
    assert linear_cells(text)["mug"] == "40.0 ± 0.4 ≈"
    assert "Welch's t-test over the seeds" in text and "paired bootstrap over evaluation examples" in text
    # outcomes of different lengths cannot be paired: only Welch applies, and it resolves
    records = column_records({"mae": (60.0, 60.5, 59.5), "mug": (40.0, 40.4, 39.6)},
                             outcomes={"mae": [right] * 3, "mug": [right[:900]] * 3})
    assert linear_cells(write_report_text(records))["mug"] == "40.0 ± 0.4"


def test_methods_tied_with_the_best_share_its_place_in_the_ranking():
    records = []
    for protocol in ("knn", "linear"):
        records += column_records({"mae": (50.0, 50.6, 49.4), "mug": (49.6, 49.0, 49.9), "clip": (30.0, 30.2, 29.8)},
                                  protocol=protocol)
    section = write_report_text(records).split("Ranking on transfer")[1].split("Missing from this table")[0]
    assert "rows tied with a column's best (≈ in the table) share its rank there" in section
    assert "| 1 | mae | 1.00 | 2 of 2 |" in section and "| 1 | mug | 1.00 | 2 of 2 |" in section
    assert "| 3 | clip | 3.00 | 2 of 2 |" in section  # competition ranking: after the two rows ahead


def baseline_study():
    """mae and mug with the baseline rows: supervised scores highest, random lowest."""
    paradigms = {"random": "baseline", "supervised": "baseline"}
    return column_records({"mae": (50.0, 50.5, 49.5), "mug": (40.0, 40.4, 39.6), "random": (20.0, 20.2, 19.8),
                           "supervised": (70.0, 70.3, 69.7)}, paradigms=paradigms)


def test_baseline_rows_are_a_group_of_their_own_never_bold_or_ranked():
    text = write_report_text(baseline_study())
    table = rows(text)
    assert list(table)[1:] == ["mae", "mug", "random", "supervised", "*best − runner-up*"]  # baselines last
    assert table["random"].startswith("| baseline | random |") and table["supervised"].startswith("|  | supervised |")
    cells = linear_cells(text)
    assert cells["mae"] == "**50.0 ± 0.5**"  # the best method, though supervised scores higher
    assert cells["supervised"] == "70.0 ± 0.3" and cells["random"] == "20.0 ± 0.2"  # no bold, no mark
    assert "+10.0 (mae over mug)" in table["*best − runner-up*"]
    section = text.split("Ranking on transfer")[1].split("<details>")[0]
    assert "| 1 | mae |" in section and "| 2 | mug |" in section
    assert "random |" not in section and "supervised |" not in section
    assert "baseline rows (random, supervised) are reference points" in text


def test_an_untrained_baseline_does_not_make_a_study_mix_budgets():
    """``random`` is evaluated as initialised (0 steps, 0 epochs): named in the header, not a mixed budget."""
    records = baseline_study()
    for r in records:
        r.epochs, r.steps = (0.0, 0) if r.method == "random" else (4.0, 372)
    text = write_report_text(records)
    assert "Pre-training epochs: 4 (random: not pre-trained)." in text and "mixes encoders or epoch" not in text
    records[0].epochs = 8.0  # a pre-trained row with another budget still warns
    assert "mixes encoders or epoch budgets" in write_report_text(records)


def test_the_full_table_shows_each_gain_over_random():
    full = write_report_text(baseline_study()).split("<summary>All metrics</summary>")[1].split("</details>")[0]
    cells = {line.split("|")[2].strip(): line.split("|")[3].strip() for line in full.splitlines()
             if line.startswith("| ") and "method" not in line}
    assert cells == {"mae": "**50.0 ± 0.5** (+30.0)", "mug": "40.0 ± 0.4 (+20.0)", "random": "20.0 ± 0.2",
                     "supervised": "70.0 ± 0.3 (+50.0)"}
    assert "(+x) after a cell: its gain over the `random` row" in full
    # a lower-is-better metric: the gain is random's value minus the row's
    mse = write_report_text(column_records({"mae": (0.2, 0.2), "random": (0.5, 0.5)}, protocol="reconstruction",
                                           metric="masked_mse", paradigms={"random": "baseline"}))
    assert "0.2 ± 0.0 (+0.3)" in mse.split("<summary>All metrics</summary>")[1]


def test_a_column_the_best_method_does_not_lift_above_random_is_named():
    records = column_records({"mae": (21.0, 20.0, 19.0), "mug": (20.0, 19.0, 18.0), "random": (20.0, 20.2, 19.8)},
                             paradigms={"random": "baseline"})
    text = write_report_text(records)
    assert "Not resolved above `random` (α = 0.05)" in text and "linear probe top1 (toy-cls) (best mae, +0.0" in text
    assert "Not resolved above" not in write_report_text(baseline_study())


def test_a_best_learning_rate_at_the_edge_of_its_grid_is_noted():
    records = column_records({"mae": (50.0, 50.5, 49.5), "mug": (40.0, 40.4, 39.6)})
    for r in records:
        best = 1.0 if r.method == "mae" else 0.1  # mae's optimum is the top of the grid, mug's inside it
        r.protocol_options = {"lrs": [0.01, 0.1, 1.0], "best_lr": best, "grid_top1": {}}
    text = write_report_text(records)
    note = text.split("Learning rate at an edge of its grid")[1].split("\n\n")[1]
    assert note == ("- linear probe (toy-cls): best rate 1, the largest of the grid 0.01, 0.1, 1, "
                    "for mae (seeds 0, 1, 2)")
    for r in records:
        r.protocol_options["best_lr"] = 0.1
    assert "Learning rate at an edge" not in write_report_text(records)


def test_the_gain_figure_starts_each_bar_at_the_random_floor(tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    for r in baseline_study():
        write_record(r, results)
    write_report(results, reports)
    assert (reports / "figures" / "toy-toy-gain.png").stat().st_size > 5_000
    index = (reports / "README.md").read_text()
    assert "![gain](figures/toy-toy-gain.png)" in index and "starts at the `random` row's mean" in index
    for r in study_records():  # no random row: no such figure
        write_record(r, tmp_path / "other")
    write_report(tmp_path / "other", tmp_path / "reports2")
    assert not (tmp_path / "reports2" / "figures" / "toy-toy-gain.png").exists()


def test_a_cell_mixing_commits_is_marked_and_its_commits_named():
    # A user's seed 0 beside seeds 1-2 of another commit: the mean mixes two versions of the code.
    records = study_records()
    for r in records:
        r.git_commit = ("a" if (r.method, r.seed) == ("mae", 0) else "b") * 40
    text = write_report_text(records)
    r = rows(text)
    assert "| 42.0 ± 2.0‡ ≈ |" in r["mae"] and "‡" not in r["mug"] + r["clip"] + r["simclr"]
    assert "- mae, linear (toy-cls), segmentation (toy-seg): aaaaaaaaaa: seed 0; bbbbbbbbbb: seeds 1, 2" in text
    for r in records:
        r.git_commit = "b" * 40
    assert "‡" not in write_report_text(records)


def test_a_column_only_random_has_draws_no_empty_gain_panel(tmp_path):
    # `mugbench run --methods random --evals segmentation` beside earlier runs of other methods
    records = [make_record("mae", protocol="linear", seed=0, preset="toy", top1=40.0),
               make_record("random", protocol="linear", seed=0, preset="toy", top1=20.0),
               make_record("random", protocol="segmentation", dataset="toy-seg", seed=0, preset="toy", mIoU=10.0)]
    for r in records:
        write_record(r, tmp_path / "results")
    write_report(tmp_path / "results", tmp_path / "reports", figures=True)
    assert (tmp_path / "reports" / "figures" / "toy-toy-gain.png").exists()


# The critical-difference view (Friedman + Nemenyi, autorank) over every transfer column and seed.

def ordered_study(order_per_block):
    """knn and linear records on 3 seeds (6 blocks); ``order_per_block(i)`` gives block i's methods,
    best first, scored 60, 50, 40, ... (block i = protocol i // 3, seed i % 3)."""
    records = []
    for i in range(6):
        protocol, seed = ("knn", "linear")[i // 3], i % 3
        for place, method in enumerate(order_per_block(i)):
            records.append(make_record(method, protocol=protocol, dataset="toy-cls", seed=seed, preset="toy",
                                       top1=60.0 - 10 * place))
    return records


def cd_paragraph(text: str) -> str:
    return next(line for line in text.splitlines() if "critical-difference" in line.lower() or
                line.startswith("Critical difference"))


def test_a_consistent_order_is_told_apart_by_the_critical_difference(tmp_path):
    # mae always first, clip always last, mug and simclr take turns: mean ranks 1, 2.5, 2.5, 4 over 6 blocks.
    records = ordered_study(lambda i: ("mae", "mug", "simclr", "clip") if i % 2 else ("mae", "simclr", "mug", "clip"))
    for r in records:
        write_record(r, tmp_path / "results")
    write_report(tmp_path / "results", tmp_path / "reports")
    text = (tmp_path / "reports" / "summary.md").read_text()
    paragraph = cd_paragraph(text)
    assert "over 6 blocks (2 transfer columns × up to 3 seeds" in paragraph
    assert "Mean ranks (1 = best): mae 1.00, mug 2.50, simclr 2.50, clip 4.00." in paragraph
    # Nemenyi's CD for 4 methods on 6 blocks: q(0.05, 4, inf) / sqrt(2) * sqrt(4 * 5 / (6 * 6)) = 1.91 ranks.
    assert "Nemenyi's CD at α = 0.05 is 1.91 ranks" in paragraph
    assert "told apart): mae ahead of clip." in paragraph  # 3 ranks apart; the 1.5-rank gaps are not
    assert "not independent benchmarks" in paragraph
    assert (tmp_path / "reports" / "figures" / "toy-toy-cd.png").stat().st_size > 5_000
    assert "![cd](figures/toy-toy-cd.png)" in (tmp_path / "reports" / "README.md").read_text()


def test_methods_that_take_turns_are_not_told_apart():
    # Each of the three methods is first, second and third equally often: equal mean ranks, Friedman p = 1.
    turns = ("mae", "mug", "clip")
    paragraph = cd_paragraph(write_report_text(ordered_study(lambda i: turns[i % 3:] + turns[:i % 3])))
    assert "mae 2.00, mug 2.00, clip 2.00" in paragraph or "clip 2.00, mae 2.00, mug 2.00" in paragraph
    assert "does not reject equal ranks (p = 1" in paragraph and "no pair of methods is told apart" in paragraph


def test_too_few_blocks_give_no_critical_difference_and_say_why(tmp_path):
    records = [r for r in ordered_study(lambda i: ("mae", "mug", "clip")) if r.seed < 2]  # 2 columns x 2 seeds
    for r in records:
        write_record(r, tmp_path / "results")
    write_report(tmp_path / "results", tmp_path / "reports")
    text = (tmp_path / "reports" / "summary.md").read_text()
    assert ("the Friedman test needs at least 5 complete blocks (a transfer column on one seed, every method "
            "present), this study has 4") in text
    assert not (tmp_path / "reports" / "figures" / "toy-toy-cd.png").exists()


def test_the_critical_difference_leaves_out_baselines_and_methods_missing_a_column():
    from mugbench.report.critical_difference import performance_matrix
    from mugbench.report.frame import headline_columns, long_frame, summary_frame

    records = ordered_study(lambda i: ("mae", "mug", "clip", "random"))
    for r in records:
        r.paradigm = "baseline" if r.method == "random" else r.paradigm
    records += [make_record("simclr", protocol="knn", dataset="toy-cls", seed=s, preset="toy", top1=1.0)
                for s in range(3)]  # no linear-probe column
    long = long_frame(records)
    matrix, left_out = performance_matrix(long, headline_columns(summary_frame(records, long=long).columns))
    assert sorted(matrix.columns) == ["clip", "mae", "mug"] and left_out == ["simclr"]
    assert matrix.shape == (6, 3) and (matrix["mae"] == 60.0).all()
