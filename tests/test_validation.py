"""Bad values and unusable output folders are refused before any work, with one clear error.

Every case goes through `mugbench.cli.main` in this process with all of its folders (work,
results, reports, cache) under ``tmp_path``, and checks the exit code, the one-paragraph
message and that nothing was created on disk.
"""
from __future__ import annotations

import dataclasses
import errno
import io
import os
import tarfile
import typing
from collections import namedtuple
from pathlib import Path

import pytest

from mugbench import config as config_mod
from mugbench.cli import main
from mugbench.config import ConfigError, load_config
from mugbench.protocol import NoOptions
from mugbench.registry import registered_protocols

SMALL_RUN = ["run", "--preset", "smoke", "--methods", "mae", "--evals", "knn"]


def _folders(tmp_path: Path) -> list[str]:
    return ["--workdir", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
            "--reports", str(tmp_path / "reports"), "--cache-dir", str(tmp_path / "cache")]


def _cli(args: list[str], tmp_path: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    """Run `mugbench ARGS` from ``tmp_path`` with its caches there; return (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MUGBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MUGBENCH_DATA", raising=False)
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code: int, err: str, *needles: str, first: bool = True) -> None:
    """Exit 2 with one `mugbench: error:` paragraph: all of stderr (``first``), else its last line
    (after a progress bar's output)."""
    assert code == 2, err[-2000:]
    message = err if first else err.replace("\r", "\n").strip().splitlines()[-1]
    assert message.startswith("mugbench: error:") and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in err, err


# --- item 5: values refused before any folder is created -------------------------------------------

BAD_RUN_VALUES = [
    (["--set", "train.epochs=-1"], "train.epochs=-1 is out of range: it must be a finite number > 0"),
    (["--set", "train.batch_size=0"], "train.batch_size=0 is out of range: it must be an integer >= 1"),
    (["--set", "train.batch_size=-4"], "train.batch_size=-4 is out of range"),
    (["--set", "train.epochs=.nan"], "train.epochs=nan is out of range: it must be a finite number > 0"),
    (["--set", "train.epochs=.inf"], "train.epochs=inf is out of range"),
    (["--set", "train.ckpt_every=0"], "train.ckpt_every=0 is out of range"),
    (["--set", "train.accum_steps=0"], "train.accum_steps=0 is out of range"),
    (["--set", "train.betas=[0.9, 1.0]"], "train.betas=[0.9, 1.0] is out of range: each must be a finite number in [0, 1)"),
    (["--set", "train.grad_clip=0"], "train.grad_clip=0 is out of range: it must be a finite number > 0 or null"),
    (["--set", "data.max_bad_fraction=1.5"], "data.max_bad_fraction=1.5 is out of range: it must be a finite number in [0, 1]"),
    (["--set", "eval.linear.lrs=[0.1, -1]"], "eval.linear.lrs=[0.1, -1] is out of range"),
    (["--set", "seed=-1"], "seed=-1 is out of range"),
    (["--seeds", "abc"], "'abc' is not a seed"),
    (["--seeds=0,-3"], "-3"),
    # cross-field: these used to fail after the toy data was generated, leaving the cache behind
    (["--set", "train.accum_steps=3"], "train.batch_size=32 is not divisible"),
    (["--set", "train.batch_size=512"], "512"),
]


@pytest.mark.parametrize("extra,needle", BAD_RUN_VALUES, ids=[" ".join(e) for e, _ in BAD_RUN_VALUES])
def test_bad_run_value_is_refused_before_any_folder(extra, needle, tmp_path, capsys, monkeypatch):
    code, _, err = _cli([*SMALL_RUN, *_folders(tmp_path), *extra], tmp_path, capsys, monkeypatch)
    _assert_user_error(code, err, needle)
    assert list(tmp_path.iterdir()) == [], "a refused run must leave no folder behind"


@pytest.mark.parametrize("model_args,needle", [
    ('{"checkpoint_path": "x"}', "checkpoint_path"),
    ('{"pretrained": true}', "pretrained"),
    ('{"pretrained_cfg_overlay": {"file": "x"}}', "pretrained_cfg_overlay"),
    ('{"cache_dir": "x"}', "cache_dir"),
    ('[1, 2]', "must be a JSON object"),
    ('"img_size"', "must be a JSON object"),
])
def test_eval_model_args_that_load_files_are_refused(model_args, needle, tmp_path, capsys, monkeypatch):
    args = ["eval", "--timm-model", "vit_tiny_patch16_224", "--model-args", model_args,
            "--results", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache")]
    code, _, err = _cli(args, tmp_path, capsys, monkeypatch)
    _assert_user_error(code, err, needle, "--model-args")
    assert list(tmp_path.iterdir()) == []


def test_eval_and_bench_validate_the_config_too(tmp_path, capsys, monkeypatch):
    args = ["eval", "--timm-model", "vit_tiny_patch16_224", "--model-args", '{"img_size": 32, "patch_size": 8}',
            "--preset", "smoke", "--set", "eval.knn.k=0", "--results", str(tmp_path / "results"),
            "--cache-dir", str(tmp_path / "cache")]
    code, _, err = _cli(args, tmp_path, capsys, monkeypatch)
    _assert_user_error(code, err, "eval.knn.k=0 is out of range: it must be an integer >= 1")
    code, _, err = _cli(["bench", "--preset", "smoke", "--methods", "mae", "--set", "train.batch_size=0",
                         "--results", str(tmp_path / "results")], tmp_path, capsys, monkeypatch)
    _assert_user_error(code, err, "train.batch_size=0 is out of range")
    assert list(tmp_path.iterdir()) == []


def _broken_shards(root: Path, shards: int = 2, per_shard: int = 8) -> str:
    """Real webdataset tar shards whose every image is undecodable (captions are fine)."""
    root.mkdir()
    for s in range(shards):
        with tarfile.open(root / f"{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                for ext, payload in (("jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("txt", b"a red square")):
                    info = tarfile.TarInfo(f"{s:03d}{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / f"{{000..{shards - 1:03d}}}.tar")


def test_shard_set_with_every_sample_broken_is_a_data_error(tmp_path, capsys, monkeypatch):
    pattern = _broken_shards(tmp_path / "shards")
    args = [*SMALL_RUN, *_folders(tmp_path), "--data", pattern, "--set", "data.samples_per_epoch=16",
            "--set", "train.batch_size=4", "--set", "data.streams=2"]
    code, _, err = _cli(args, tmp_path, capsys, monkeypatch)
    _assert_user_error(code, err, "yielded no batch", "undecodable", "mugbench data check", first=False)
    # No record was written, so the folders made for records and reports are gone again; the run folder stays.
    assert not (tmp_path / "results").exists() and not (tmp_path / "reports").exists()
    assert list((tmp_path / "runs").rglob("metrics.jsonl")) or list((tmp_path / "runs").iterdir())


def test_a_python_tag_in_an_override_is_a_one_paragraph_error(tmp_path, capsys, monkeypatch):
    """safe_load refuses the tag (nothing runs); the refusal is the usual error naming the key, exit 2."""
    for value in ('!!python/object/apply:os.system ["touch X"]', "[1,"):
        code, _, err = _cli([*SMALL_RUN, *_folders(tmp_path), "--set", f"train.epochs={value}"], tmp_path, capsys,
                            monkeypatch)
        _assert_user_error(code, err, "train.epochs", "not a plain YAML value")
        assert "Traceback" not in err
    assert not (tmp_path / "X").exists() and not (tmp_path / "results").exists()


# --- item 6: unusable output folders are found before training -------------------------------------

def test_unwritable_results_folder_fails_before_training(tmp_path, capsys, monkeypatch):
    # A folder under a regular file cannot be created, even by root (who ignores permission bits).
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be\n")
    folders = _folders(tmp_path)
    folders[folders.index("--results") + 1] = str(blocker / "results")
    code, _, err = _cli([*SMALL_RUN, *folders], tmp_path, capsys, monkeypatch)
    _assert_user_error(code, err, str(blocker / "results"), "--results")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"], "no run folder, no cache, no reports"
    assert blocker.read_text() == "a file where a folder should be\n"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_folder_fails_before_training(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    try:
        code, _, err = _cli([*SMALL_RUN, *_folders(tmp_path)], tmp_path, capsys, monkeypatch)
    finally:
        results.chmod(0o755)
    _assert_user_error(code, err, str(results))
    assert not (tmp_path / "runs").exists() and list(results.iterdir()) == []


def test_probe_detects_a_folder_that_refuses_writes(tmp_path, monkeypatch):
    """The probe writes a real file: a folder whose writes fail (read-only mount, quota) is caught
    even where permission bits say it is writable (as they do for root)."""
    from mugbench import preflight

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)
    with pytest.raises(preflight.OutputError, match="Read-only file system") as exc:
        preflight.check_folders({"--results": tmp_path / "results"})
    assert str(tmp_path / "results") in str(exc.value)
    assert not (tmp_path / "results").exists()  # the folder it created for the probe is removed again


def test_short_disk_is_refused_before_training(tmp_path, capsys, monkeypatch):
    from mugbench import preflight

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    code, _, err = _cli([*SMALL_RUN, *_folders(tmp_path)], tmp_path, capsys, monkeypatch)
    _assert_user_error(code, err, "free", str(tmp_path / "runs"))
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_estimate_counts_weights_and_adamw_moments():
    from mugbench.preflight import checkpoint_bytes

    cfg = load_config("paper")
    # ViT-B/16 has 86.6 M parameters (timm's vit_base_patch16_224 without its head: 85.8 M); weights +
    # two AdamW moments at 4 bytes each is ~1 GB for the encoder alone, more with the text tower.
    image_only = checkpoint_bytes(cfg, needs_text=False)
    assert 0.95e9 < image_only < 1.15e9
    assert checkpoint_bytes(cfg, needs_text=True) > image_only + 12 * 49408 * 768


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 521984")])
def test_failed_checkpoint_write_keeps_the_previous_one(error, tmp_path, monkeypatch):
    import torch

    from mugbench.errors import user_errors
    from mugbench.train import checkpoint as ckpt

    first = ckpt.save_run_checkpoint(tmp_path, {"model": {"w": torch.ones(3)}, "optimizer": {}, "state": {"step": 1}}, 1)

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")  # what a full disk leaves: a truncated file
        raise error

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(user_errors()) as exc:
        ckpt.save_run_checkpoint(tmp_path, {"model": {"w": torch.zeros(3)}, "optimizer": {}, "state": {"step": 2}}, 2)
    message = str(exc.value)
    assert str(tmp_path / "checkpoint-00000002.pt") in message and "disk" in message
    assert str(first) in message and "rerun" in message
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001.pt", "checkpoint.pt"]
    loaded, path = ckpt.load_newest_checkpoint(tmp_path)
    assert path.name in ("checkpoint.pt", first.name) and loaded["state"]["step"] == 1


# --- the schema: every numeric key has a declared range ---------------------------------------------

def _numeric(hint, default) -> bool:
    if typing.get_origin(hint) is typing.Union:
        return any(_numeric(a, None) for a in typing.get_args(hint) if a is not type(None))
    if hint in (int, float):
        return True
    values = default.values() if isinstance(default, dict) else default if isinstance(default, (list, tuple)) else ()
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize("cls", [config_mod.StudyConfig, config_mod.DataConfig, config_mod.AugmentConfig,
                                 config_mod.EncoderSpec, config_mod.TextConfig, config_mod.TrainConfig,
                                 config_mod.EvalConfig,
                                 *(p.Options for p in registered_protocols().values())])
def test_every_numeric_key_declares_its_range(cls):
    hints = typing.get_type_hints(cls)
    numeric = [f for f in dataclasses.fields(cls) if _numeric(hints[f.name], _default(f))]
    assert numeric or cls in (config_mod.StudyConfig, NoOptions)
    missing = [f.name for f in numeric if not isinstance(f.metadata.get("range"), config_mod.Range)]
    assert missing == [], f"{cls.__name__}: numeric keys without a declared range: {missing}"
    for f in numeric:
        hint, rng = hints[f.name], f.metadata["range"]
        optional = typing.get_origin(hint) is typing.Union
        scalar = typing.get_args(hint) if optional else (hint,)
        if set(scalar) & {int, float}:  # containers declare their values' kind themselves
            assert rng.integer == (int in scalar), f"{cls.__name__}.{f.name}: int keys take integers, floats numbers"
        config_mod.check_range(f"{cls.__name__}.{f.name}", _default(f), rng, nullable=optional)  # defaults fit


def test_lists_in_linear_lrs_linear_grid_and_sizes_are_checked():
    with pytest.raises(ConfigError, match=r"data.toy_sizes=.* is out of range: each must be an integer >= 1"):
        load_config("smoke", ["data.toy_sizes={pretrain: 0}"])
    with pytest.raises(ConfigError, match=r"train.betas=\[0.9\] must hold 2 values"):
        load_config("smoke", ["train.betas=[0.9]"])


@pytest.mark.parametrize("preset", config_mod.PRESETS)
def test_every_preset_is_in_range(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset and cfg.train.epochs > 0


def test_range_messages_say_key_value_and_allowed_range():
    cases = {"train.warmup_epochs=-1": "train.warmup_epochs=-1 is out of range: it must be a finite number >= 0",
             "train.min_lr=-1e-6": "train.min_lr=-1e-6 is out of range: it must be a finite number >= 0",
             "eval.finetune.layer_decay=0": "eval.finetune.layer_decay=0 is out of range: it must be a finite "
                                            "number in (0, 1]",
             "data.samples_per_epoch=0": "data.samples_per_epoch=0 is out of range: it must be an integer >= 1 "
                                         "or null"}
    for override, message in cases.items():
        with pytest.raises(ConfigError) as exc:
            load_config("smoke", [override])
        assert str(exc.value).startswith(message), str(exc.value)
    # in range, and null where null means "none"
    cfg = load_config("smoke", ["train.grad_clip=null", "train.warmup_epochs=0", "data.max_bad_fraction=1"])
    assert cfg.train.grad_clip is None and cfg.data.max_bad_fraction == 1.0


# --- the paper preset evaluates the paper's sets, and refuses to start without them ------------------

PAPER_RUN = ["run", "--preset", "paper", "--methods", "mae"]


def test_paper_preset_evaluates_the_papers_protocols():
    cfg = load_config("paper").eval
    assert cfg.datasets == ["imagenet", "ade20k", "coco-caps"]
    assert {"linear", "finetune", "segmentation"} <= set(cfg.protocols)
    # MAE's linear probe (He et al., 2022) and ViT-B fine-tuning recipe, BEiT/MAE's ADE20K schedule.
    linear, finetune, seg = (cfg.options_for(p) for p in ("linear", "finetune", "segmentation"))
    assert (linear.solver, linear.epochs, linear.batch_size, linear.lr, linear.warmup_epochs) == ("lars", 90, 16384, 0.1, 10)
    assert (finetune.epochs, finetune.batch_size, finetune.blr, finetune.layer_decay) == (100, 1024, 5.0e-4, 0.65)
    assert (seg.iters, seg.crop, seg.batch_size, seg.lr, seg.scale_range) == (160000, 512, 16, 1.0e-4, [0.5, 2.0])
    assert (finetune.crop_scale, finetune.randaug, finetune.mixup) == ([0.08, 1.0], "rand-m9-mstd0.5-inc1", 0.8)


def test_paper_preset_without_its_pretraining_set_stops_before_any_folder(tmp_path, tmp_path_factory,
                                                                          capsys, monkeypatch):
    empty = tmp_path_factory.mktemp("empty-data-root")
    code, _, err = _cli([*PAPER_RUN, "--data-root", str(empty), *_folders(tmp_path)], tmp_path, capsys, monkeypatch)
    _assert_user_error(code, err, "'cc3m' was not found", str(empty), "img2dataset")
    assert list(tmp_path.iterdir()) == [] and list(empty.iterdir()) == []


def test_paper_preset_without_its_evaluation_sets_stops_before_any_folder(tmp_path, tmp_path_factory,
                                                                          capsys, monkeypatch):
    empty, shards = tmp_path_factory.mktemp("empty-data-root"), tmp_path_factory.mktemp("shards")
    with tarfile.open(shards / "00000.tar", "w") as tar:  # one img2dataset-style sample
        for name, payload in (("000000000.txt", b"a photo of a cat"), ("000000000.jpg", b"\xff\xd8\xff")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    code, _, err = _cli([*PAPER_RUN, "--data", str(shards / "00000.tar"), "--data-root", str(empty),
                         *_folders(tmp_path)], tmp_path, capsys, monkeypatch)
    # The first missing set's own message, naming the others too: one attempt lists everything to fetch.
    _assert_user_error(code, err, "Evaluation set 'imagenet' was not found", str(empty / "imagenet"),
                       "ILSVRC2012", "ade20k, coco-caps")
    assert list(tmp_path.iterdir()) == [] and list(empty.iterdir()) == []


def test_a_study_file_with_a_python_tag_is_refused_naming_the_file_and_line(tmp_path):
    from mugbench.config import ConfigError, load_config

    study = tmp_path / "study.yaml"
    study.write_text("preset: mine\ntrain:\n  epochs: !!python/object/apply:os.system [\"touch X\"]\n")
    with pytest.raises(ConfigError, match=r"study\.yaml is not plain YAML at line 3"):
        load_config(str(study))
    assert not (tmp_path / "X").exists()
