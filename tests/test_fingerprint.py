"""The like-for-like fingerprint: which settings change it, records carry it, the report checks it."""
from __future__ import annotations

import dataclasses
import json

import pytest

from mugbench.cli import main
from mugbench.config import DataConfig, load_config
from mugbench.fingerprint import NOT_CONDITIONS, condition_diff, fingerprint, like_for_like
from mugbench.results import ResultRecord

from test_report import rows, study_records, write_report_text
from test_results import make_record

HAS_AUGMENT = any(f.name == "augment" for f in dataclasses.fields(DataConfig))

# One override per part of the fingerprint, and where it shows in the readable parts.
CHANGES = [
    ("train.epochs=3", "train.epochs"),
    ("train.batch_size=64", "train.batch_size"),
    ("train.blr=0.001", "train.blr"),
    ("train.warmup_epochs=0.5", "train.warmup_epochs"),
    ("train.precision=bf16", "train.precision"),
    ("encoder.depth=3", "encoder.depth"),
    ("encoder.img_size=64", "image_size"),
    ("data.min_image_size=8", "data.min_image_size"),
    ("data.shuffle_buffer=10", "data.shuffle_buffer"),
    ("data.streams=2", "data.streams"),  # the global batch is made of other streams of shards
    ("seed=1", "seed"),
    ("text.width=64", "text.width"),
    pytest.param("data.augment.scale=[0.5,1.0]", "augment.scale",
                 marks=pytest.mark.skipif(not HAS_AUGMENT, reason="no data.augment in this config")),
]
# Speed, memory, bookkeeping, evaluation and per-method settings: never a condition of pre-training.
SAME = ["train.compile=true", "train.optimizer_impl=loop", "train.grad_checkpointing=true", "train.log_every=3",
        "train.ckpt_every=5", "train.keep_checkpoints=1", "train.device=cpu", "train.strategy=fsdp",
        "data.pin_memory=false", "data.prefetch_factor=2", "data.decode_draft=false", "eval.knn.k=5",
        "train.accum_steps=2", "data.num_workers=2",  # exact accumulation; workers own whole streams
        "eval.protocols=[knn]", "methods.mae.mask_ratio=0.5", "preset=renamed"]


def conditions(*overrides, seed=0):
    """The smoke study's conditions with ``overrides``, as `mugbench run` records them on one CPU process."""
    return like_for_like(load_config("smoke", [f"seed={seed}", *overrides]), device="cpu")


@pytest.mark.parametrize("override, part", CHANGES)
def test_every_part_changes_the_fingerprint_and_is_named(override, part):
    base, changed = conditions(), conditions(override)
    assert fingerprint(changed) != fingerprint(base)
    diff = condition_diff(changed, base)
    assert len(diff) >= 1 and any(line.startswith(part + " ") for line in diff), diff


@pytest.mark.parametrize("override", SAME)
def test_settings_that_do_not_change_training_leave_it_alone(override):
    assert fingerprint(conditions(override)) == fingerprint(conditions())


def test_parts_are_readable_and_the_hash_is_short_and_stable():
    parts = conditions()
    assert {"data", "seed", "train", "encoder", "image_size", "text"} <= set(parts)
    assert parts["train"]["lr"] == pytest.approx(parts["train"]["blr"] * parts["train"]["batch_size"] / 256)
    assert parts["image_size"] == 32 and "img_size" not in parts["encoder"]  # named once, on its own
    assert parts["train"]["precision"] == "fp32"  # resolved on CPU
    assert "world_size" not in parts["train"] and "accum_steps" not in parts["train"]  # the same batches either way
    assert "bf16" == like_for_like(load_config("smoke"), device="cuda")["train"]["precision"]
    assert not set(NOT_CONDITIONS["data"]) & set(parts["data"])
    # JSON data, so a record read back from disk compares equal and hashes the same.
    again = json.loads(json.dumps(parts))
    assert again == parts and fingerprint(again) == fingerprint(parts)
    assert len(fingerprint(parts)) == 12 and fingerprint({}) == ""
    assert fingerprint(dict(reversed(list(parts.items())))) == fingerprint(parts)


def test_a_new_config_field_is_in_the_fingerprint_unless_excluded():
    @dataclasses.dataclass
    class WiderData(DataConfig):
        max_aspect_ratio: float = 3.0  # a filter someone adds later

    cfg = load_config("smoke")
    base = like_for_like(cfg)
    cfg.data = WiderData(**{f.name: getattr(cfg.data, f.name) for f in dataclasses.fields(DataConfig)})
    wider = like_for_like(cfg)
    assert wider["data"]["max_aspect_ratio"] == 3.0 and fingerprint(wider) != fingerprint(base)


def test_condition_diff_names_each_difference_with_both_values():
    a = {"train": {"epochs": 4.0, "betas": [0.9, 0.95]}, "seed": 0}
    b = {"train": {"epochs": 2.0, "betas": [0.9, 0.95], "world_size": 2}, "seed": 0}
    assert condition_diff(a, b) == ["train.epochs 4.0 vs 2.0", "train.world_size absent vs 2"]
    assert condition_diff(a, a) == []


def test_records_round_trip_the_fingerprint_and_old_records_still_load():
    record = make_record("mae")
    record.conditions = conditions()
    record.fingerprint = fingerprint(record.conditions)
    back = ResultRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert (back.fingerprint, back.conditions) == (record.fingerprint, record.conditions)
    old = make_record("mae").to_dict()
    del old["fingerprint"], old["conditions"]
    assert (ResultRecord.from_dict(old).fingerprint, ResultRecord.from_dict(old).conditions) == ("", {})
    with pytest.raises(ValueError, match="'conditions' must be a dict"):
        ResultRecord.from_dict(dict(old, conditions=["train.epochs=2"]))


def fingerprinted(records, changed=(), overrides=()):
    """``records`` with the conditions of their seed; those of methods in ``changed`` with ``overrides``."""
    for r in records:
        r.conditions = conditions(*(overrides if r.method in changed else ()), seed=r.seed)
        r.fingerprint = fingerprint(r.conditions)
    return records


def test_report_marks_the_row_trained_otherwise_and_names_what_differs(tmp_path):
    extra = ["data.augment.scale=[0.5,1.0]"] if HAS_AUGMENT else []
    text = write_report_text(fingerprinted(study_records(), {"mug"}, ["train.epochs=3", *extra]))
    table = rows(text)
    assert "mug†" in table and "mug" not in table and {"simclr", "mae", "clip"} <= set(table)
    note = text.split("† Not like-for-like")[1].split("\n\n")[1]
    assert note.startswith("- mug†: ") and "train.epochs 3.0 vs 1.0" in note
    if HAS_AUGMENT:
        assert "augment.scale [0.5, 1.0] vs [0.2, 1.0]" in note
    assert "mae†" not in text and "clip†" not in text
    from mugbench.report import write_report
    from mugbench.results import write_record

    for r in fingerprinted(study_records(), {"mug"}, ["train.epochs=3"]):
        write_record(r, tmp_path / "results")
    write_report(tmp_path / "results", tmp_path / "reports", figures=False)
    tex = (tmp_path / "reports" / "summary.tex").read_text()
    assert "& mug$^\\dagger$ &" in tex and "$^\\dagger$ = pre-trained under other conditions" in tex


def test_rows_sharing_the_fingerprint_are_not_marked_across_seeds():
    # Each seed has its own fingerprint (the seed is a condition); rows are compared seed by seed.
    text = write_report_text(fingerprinted(study_records()))
    assert "†" not in text and "Not like-for-like" not in text


def test_records_without_a_fingerprint_are_unknown_and_never_marked():
    records = fingerprinted(study_records(), {"mug"}, ["train.epochs=3"])
    for r in records:
        if r.method in ("mug", "clip"):
            r.fingerprint, r.conditions = "", {}
    text = write_report_text(records)
    assert "†" not in text


def test_per_seed_rows_are_marked_too():
    records = fingerprinted(study_records(), {"clip"}, ["text.width=64"])
    text = write_report_text(records, by="seed")
    assert "clip · seed 0†" in rows(text) and "mae · seed 0" in rows(text)
    assert "- clip · seed 1†: text.width 64 vs 32" in text



def _records(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))]


def test_run_and_eval_of_its_encoder_write_the_same_fingerprint(tiny_run, tmp_path):
    root, run_dir = tiny_run
    (record,) = _records(root / "results")
    expected = conditions("train.epochs=0.25", "eval.protocols=[knn]")
    assert record["conditions"] == expected and record["fingerprint"] == fingerprint(expected)
    assert json.loads((run_dir / "run.json").read_text())["conditions"] == expected
    argv = ["eval", "--checkpoint", str(run_dir), "--evals", "knn", "--results", str(tmp_path / "res"),
            "--cache-dir", str(root / "cache"), "--set", "eval.knn.k=5"]
    assert main(argv) == 0
    (again,) = _records(tmp_path / "res")
    assert again["fingerprint"] == record["fingerprint"]  # an evaluation setting is no pre-training condition


def test_eval_conditions_of_exports_older_runs_earlier_checkpoints_and_timm_models(tiny_run, tmp_path):
    from mugbench.encoder_eval import pretrain_conditions
    from mugbench.sources import load_source

    root, run_dir = tiny_run
    (record,) = _records(root / "results")
    source = load_source(run_dir)
    assert pretrain_conditions(source) == record["conditions"]
    assert main(["export", str(run_dir), str(tmp_path / "hub")]) == 0  # the export keeps them
    assert pretrain_conditions(load_source(tmp_path / "hub")) == record["conditions"]
    # A run.json from before conditions were recorded: computed from its config, precision as configured.
    older = dataclasses.replace(source, run={k: v for k, v in source.run.items() if k != "conditions"})
    assert condition_diff(pretrain_conditions(older), record["conditions"]) == ['train.precision "auto" vs "fp32"']
    # An earlier checkpoint of the run has not had the whole budget.
    early = pretrain_conditions(dataclasses.replace(source, steps=1))
    assert condition_diff(early, record["conditions"]) == ["checkpoint.of 2 vs absent", "checkpoint.step 1 vs absent"]
    assert pretrain_conditions(dataclasses.replace(source, run=None)) == {}  # e.g. a timm encoder: unknown
