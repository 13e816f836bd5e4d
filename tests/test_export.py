"""`mugbench export` (timm hub folders that transformers and, for CLIP-style runs, open_clip load too),
`mugbench eval` of runs and timm models, `run --evals`."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file

from mugbench.cli import main
from mugbench.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from mugbench.models.vit import build_encoder
from mugbench.sources import load_source
from mugbench.train.checkpoint import export_encoder

TINY_ARGS = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'  # the smoke ViT


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Everything here must work offline: any attempt to reach the Hugging Face hub fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download from the Hugging Face hub")

    monkeypatch.setattr("timm.models._hub.hf_hub_download", refuse, raising=False)



def _features(model, seed=0):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval().forward_features(images)


def _records(results):
    return [json.loads(p.read_text()) for p in sorted(results.rglob("*.json"))]


def test_export_of_an_encoder_file_rebuilds_the_same_vit_in_timm(smoke_cfg, tmp_path):
    encoder = build_encoder(smoke_cfg.encoder, seed=3)
    with torch.no_grad():  # weights unlike any fresh init, so a re-init could not pass by accident
        for p in encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    file = export_encoder(tmp_path / "encoder.safetensors", encoder, smoke_cfg.encoder)
    out = tmp_path / "hub"
    assert main(["export", str(file), str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md"}

    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(_features(model), _features(encoder))
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["embed_dim"] == 32 and config["model_args"]["depth"] == 2
    # transformers passes num_classes=0 itself; timm takes it from the top level: no classifier either way
    assert "num_classes" not in config["model_args"] and model.num_classes == 0
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["num_classes"] == 0 == config["num_classes"]
    assert cfg["mean"] == pytest.approx(list(IMAGENET_MEAN)) and cfg["std"] == pytest.approx(list(IMAGENET_STD))
    assert "license" not in cfg and "augreg" not in cfg.get("tag", "")  # not timm's released weights
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)


def _encoder_file(smoke_cfg, tmp_path):
    """An exported encoder file: the cheapest source an export accepts."""
    return export_encoder(tmp_path / "encoder.safetensors", build_encoder(smoke_cfg.encoder, seed=0), smoke_cfg.encoder)


def test_export_into_a_non_empty_folder_needs_force(smoke_cfg, tmp_path, capsys):
    file = _encoder_file(smoke_cfg, tmp_path)
    out = tmp_path / "hub"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(file), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mugbench: error:") and "not empty" in err and "--force" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert {p.name: p.read_text() for p in out.iterdir()} == {"config.json": '{"mine": true}', "notes.txt": "keep me"}

    assert main(["export", str(file), str(out), "--force"]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md", "notes.txt"}
    assert (out / "notes.txt").read_text() == "keep me"  # only the export's own files are written
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(_features(model), _features(load_source(file).encoder))


@pytest.mark.parametrize("marker", ["run.json", "metrics.jsonl", "checkpoint-00000002.pt", "checkpoint.pt"])
@pytest.mark.parametrize("force", [False, True])
def test_export_into_a_run_folder_is_always_refused(smoke_cfg, tmp_path, capsys, marker, force):
    file = _encoder_file(smoke_cfg, tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / marker).write_text("run file")
    (run / "config.json").write_text("{}")
    assert main(["export", str(file), str(run), *(["--force"] if force else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mugbench: error:") and "run folder" in err and marker in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert {p.name: p.read_text() for p in run.iterdir()} == {marker: "run file", "config.json": "{}"}


def test_export_loads_in_transformers(smoke_cfg, tmp_path):
    """transformers' AutoModel / TimmWrapperModel, AutoImageProcessor and the image-feature-extraction
    pipeline load the folder offline and give timm's tokens and class token (issue 19: they failed on
    num_classes passed twice); the processor is mugbench's eval preprocessing."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, TimmWrapperModel, pipeline

    out = tmp_path / "hub"
    assert main(["export", str(_encoder_file(smoke_cfg, tmp_path)), str(out)]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.forward_features(images)
        for cls in (AutoModel, TimmWrapperModel):
            hf = cls.from_pretrained(str(out)).eval()(pixel_values=images)
            assert (hf.last_hidden_state - tokens).abs().max() <= 1e-6
            assert (hf.pooler_output - tokens[:, 0]).abs().max() <= 1e-6  # the encoder's "token" pooling

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    pixels = AutoImageProcessor.from_pretrained(str(out))(image, return_tensors="pt")["pixel_values"]
    assert (pixels[0] - build_eval_transform(32)(image)).abs().max() <= 1e-5
    with torch.no_grad():
        expected = model.forward_features(pixels)
    extract = pipeline("image-feature-extraction", model=str(out))
    assert (torch.tensor(extract(image)) - expected).abs().max() <= 1e-6
    assert (torch.tensor(extract(image, pool=True)) - expected[:, 0]).abs().max() <= 1e-6


def test_export_timm_checks_the_destination(smoke_cfg, tmp_path):
    from mugbench.export import ExportError, export_timm

    (tmp_path / "src").mkdir()
    file = _encoder_file(smoke_cfg, tmp_path / "src")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(ExportError, match="run folder"):
        export_timm(file, tmp_path / "run", force=True)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["metrics.jsonl"]
    assert export_timm(file, tmp_path / "empty", verify=False) == tmp_path / "empty"
    with pytest.raises(ExportError, match="not empty"):
        export_timm(file, tmp_path / "empty", verify=False)


def test_run_evals_shorthand_and_run_json(tiny_run):
    root, run_dir = tiny_run
    assert {r["protocol"] for r in _records(root / "results")} == {"knn"}
    info = json.loads((run_dir / "run.json").read_text())
    assert info["method"] == "mae" and info["config"]["preset"] == "smoke" and info["steps"] == 2
    assert info["encoder"]["timm_kwargs"]["img_size"] == 32 and isinstance(info["vocab"], list)


@pytest.mark.parametrize("what", ["checkpoint.pt", "run-dir"])
def test_export_of_a_run_checkpoint(tiny_run, tmp_path, what):
    root, run_dir = tiny_run
    out = tmp_path / "hub"
    source = run_dir / "checkpoint.pt" if what == "checkpoint.pt" else run_dir
    assert main(["export", str(source), str(out), "--results", str(root / "results")]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md"}  # mae: no text tower
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(_features(model), _features(load_source(run_dir / "encoder.safetensors").encoder))
    config = json.loads((out / "config.json").read_text())
    assert config["mugbench"]["method"] == "mae" and config["mugbench"]["pretrain_data"] == "toy"
    card = (out / "README.md").read_text()
    assert "`mae`" in card and "| preset | smoke |" in card and f"local-dir:{out}" in card
    front = card.split("---\n")[1]
    for line in ("library_name: timm", "pipeline_tag: image-feature-extraction", "license: apache-2.0"):
        assert line in front.splitlines()
    (trained,) = _records(root / "results")  # the run's k-NN record is the card's results table
    assert f"| k-NN | toy-cls | top1 {trained['metrics']['top1']:.2f} |" in card
    assert "AutoModel.from_pretrained" in card and "open_clip" not in card


@pytest.fixture(scope="module")
def clip_run(tiny_run, tmp_path_factory):
    """A `mugbench run --evals zeroshot` of clip on the smoke preset for two optimiser steps, on the toy
    data `tiny_run` generated: ``(root, cache_dir, run_dir)``."""
    root, cache = tmp_path_factory.mktemp("clip-run"), tiny_run[0] / "cache"
    argv = ["run", "--preset", "smoke", "--methods", "clip", "--set", "train.epochs=0.25", "--evals", "zeroshot",
            "--workdir", str(root / "runs"), "--results", str(root / "results"), "--reports", str(root / "reports"),
            "--cache-dir", str(cache)]
    assert main(argv) == 0
    return root, cache, next((root / "runs").glob("toy/smoke/clip-seed0-*"))


def test_export_of_a_clip_run_is_an_open_clip_model_with_the_same_zero_shot(clip_run, tmp_path, capsys):
    """open_clip loads both towers and its own tokenizer from the export (the run's compact vocabulary
    mapped back to the full BPE), gives mugbench's embeddings, and classifies every toy val image zero-shot
    as `mugbench run`'s zeroshot protocol did."""
    import numpy as np
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from PIL import Image

    from mugbench.config import from_dict
    from mugbench.encoder_eval import rebuild_method
    from mugbench.evalset import EvalSets
    from mugbench.results import unpack_outcomes

    root, cache, run_dir = clip_run
    out = tmp_path / "hub"
    assert main(["export", str(run_dir), str(out), "--results", str(root / "results")]) == 0
    assert "open_clip: both towers written" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md",
                                               "open_clip_config.json", "open_clip_model.safetensors"}
    (record,) = _records(root / "results")
    card = (out / "README.md").read_text()
    assert f"| zero-shot | toy-cls | top1 {record['metrics']['top1']:.2f}" in card
    assert f'open_clip.create_model_and_transforms("local-dir:{out}")' in card

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    assert (preprocess(image) - build_eval_transform(32)(image)).abs().max() <= 1e-5  # mugbench's eval transform
    method, mug_tokenizer = rebuild_method(load_source(run_dir))
    assert mug_tokenizer.vocab is not None  # the smoke preset's compact vocabulary: mapped, not copied
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    texts = ["a red cube left of a blue sphere.", "zebra xylophone quasar", ""]
    with torch.no_grad():
        assert (model.encode_image(images, normalize=True) - method.encode_image(images)).abs().max() <= 1e-5
        assert (model.encode_text(tokenizer(texts), normalize=True) - method.encode_text(mug_tokenizer(texts))
                ).abs().max() <= 1e-6
    assert model.logit_scale.item() == method.logit_scale.item()

    data = EvalSets(from_dict(json.loads((run_dir / "run.json").read_text())["config"]), cache).get("toy-cls")
    classifier = build_zero_shot_classifier(model, tokenizer, data.prompt_words(), data.prompts)
    with torch.no_grad():
        right = (model.encode_image(data.val.image, normalize=True) @ classifier).argmax(1) == data.val.label
    assert record["protocol"] == "zeroshot" and record["dataset"] == "toy-cls"
    assert right.tolist() == unpack_outcomes(record["per_example"]["top1"]).tolist()  # image by image
    assert 100.0 * int(right.sum()) / len(right) == record["metrics"]["top1"]


@pytest.mark.parametrize("name", ["slip", "flip"])
def test_open_clip_export_of_clip_variants(smoke_cfg, spec, tokenizer, tmp_path, name):
    """slip and flip embed like clip (FLIP sees the whole image at inference): the same mapping holds."""
    from mugbench.export_open_clip import verify_open_clip, write_open_clip
    from mugbench.runs import build_method

    method = build_method(name, smoke_cfg, spec)
    with torch.no_grad():  # weights unlike any init: a swapped or dropped tensor cannot pass by accident
        for p in method.parameters():
            p.add_(0.05 * torch.randn_like(p))
    write_open_clip(method, tokenizer, tmp_path, 32, IMAGENET_MEAN, IMAGENET_STD)
    diffs = verify_open_clip(method, tokenizer, tmp_path, 32)
    assert diffs["image"] <= 1e-5 and diffs["text"] <= 1e-6 and diffs["logit_scale"] == 0


@pytest.mark.parametrize("vit_args", [{"qkv_bias": False}, {"pre_norm": True}, {"init_values": 0.1}])
def test_open_clip_export_of_other_vit_variants(smoke_cfg, spec, tokenizer, tmp_path, vit_args):
    """ViTs without attention biases or with a pre-norm (timm's CLIP ViTs) map too; layer scale, which
    the mapping has no place for, is refused before anything is written."""
    from mugbench.export import ExportError
    from mugbench.export_open_clip import verify_open_clip, write_open_clip
    from mugbench.runs import build_method

    method = build_method("clip", smoke_cfg, spec)
    method.encoder = timm.create_model(smoke_cfg.encoder.timm_name, **smoke_cfg.encoder.timm_kwargs(), **vit_args)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if "init_values" in vit_args:
        with pytest.raises(ExportError, match="ls1.gamma"):
            write_open_clip(method, tokenizer, tmp_path, 32, IMAGENET_MEAN, IMAGENET_STD)
        assert not any(tmp_path.iterdir())
        return
    write_open_clip(method, tokenizer, tmp_path, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert verify_open_clip(method, tokenizer, tmp_path, 32)["image"] <= 1e-5


@pytest.mark.parametrize("name,needle", [("coca", "correct_cls_mask"), ("mae", "no text tower")])
def test_open_clip_export_refuses_what_open_clip_cannot_express(smoke_cfg, spec, tokenizer, tmp_path, name, needle):
    from mugbench.export import ExportError
    from mugbench.export_open_clip import write_open_clip
    from mugbench.runs import build_method

    with pytest.raises(ExportError, match=needle):
        write_open_clip(build_method(name, smoke_cfg, spec), tokenizer, tmp_path, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert not any(tmp_path.iterdir())


def test_eval_of_a_run_reproduces_its_record_and_adds_capabilities(tiny_run, tmp_path):
    root, run_dir = tiny_run
    results = tmp_path / "results"
    argv = ["eval", "--checkpoint", str(run_dir), "--evals", "knn,reconstruction", "--results", str(results),
            "--cache-dir", str(root / "cache")]
    assert main(argv) == 0
    (trained,) = _records(root / "results")
    records = {r["protocol"]: r for r in _records(results)}
    assert set(records) == {"knn", "reconstruction"}
    assert records["knn"]["metrics"] == trained["metrics"]  # same encoder, same study: same number
    for r in records.values():
        assert (r["method"], r["pretrain_data"], r["preset"], r["steps"]) == ("mae", "toy", "smoke", 2)
        assert r["protocol_options"]["encoder_source"]["kind"] == "run"
    assert records["reconstruction"]["metrics"]["masked_mse"] > 0


def test_eval_of_an_exported_folder_keeps_the_runs_identity(tiny_run, tmp_path):
    root, run_dir = tiny_run
    assert main(["export", str(run_dir), str(tmp_path / "hub")]) == 0
    argv = ["eval", "--checkpoint", str(tmp_path / "hub"), "--evals", "knn", "--results", str(tmp_path / "res"),
            "--cache-dir", str(root / "cache")]
    assert main(argv) == 0
    (record,) = _records(tmp_path / "res")
    (trained,) = _records(root / "results")
    assert (record["method"], record["pretrain_data"], record["metrics"]) == ("mae", "toy", trained["metrics"])
    assert record["protocol_options"]["encoder_source"]["kind"] == "timm-folder"


def test_eval_of_a_timm_model_writes_an_external_record(tiny_run, tmp_path):
    root, _ = tiny_run
    argv = ["eval", "--timm-model", "vit_tiny_patch16_224", "--model-args", TINY_ARGS, "--evals", "knn",
            "--preset", "smoke", "--results", str(tmp_path / "res"), "--cache-dir", str(root / "cache")]
    assert main(argv) == 0
    (record,) = _records(tmp_path / "res")
    assert (record["method"], record["pretrain_data"], record["protocol"]) == ("timm:vit_tiny_patch16_224", "external", "knn")
    assert math.isfinite(record["metrics"]["top1"]) and 0 <= record["metrics"]["top1"] <= 100
    source = record["protocol_options"]["encoder_source"]
    assert source["kind"] == "timm" and source["weights"] == "random init" and source["model_args"]["embed_dim"] == 32
    assert record["encoder"]["embed_dim"] == 32 and record["encoder"]["img_size"] == 32


def test_eval_of_timm_weights_matches_the_run(tiny_run, tmp_path):
    """The run's encoder.safetensors is a plain timm state dict: --weights gives the run's number."""
    root, run_dir = tiny_run
    argv = ["eval", "--timm-model", "vit_tiny_patch16_224", "--model-args", TINY_ARGS, "--weights",
            str(run_dir / "encoder.safetensors"), "--evals", "knn", "--preset", "smoke", "--results",
            str(tmp_path / "res"), "--cache-dir", str(root / "cache")]
    assert main(argv) == 0
    (record,) = _records(tmp_path / "res")
    (trained,) = _records(root / "results")
    assert record["metrics"] == trained["metrics"]


def _bad_sources(tmp_path, run_dir):
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"this is not a checkpoint")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    lonely = tmp_path / "lonely" / "checkpoint.pt"  # a checkpoint with nothing that names its ViT
    lonely.parent.mkdir()
    shutil.copy(run_dir / "checkpoint.pt", lonely)
    return {"missing": (tmp_path / "nope.pt", "nope.pt"),
            "foreign": (foreign, "is not a mugbench checkpoint"),
            "plain-safetensors": (plain, "not a mugbench encoder"),
            "no-architecture": (lonely, "which ViT"),
            "empty-dir": (tmp_path, "without checkpoint.pt")}


@pytest.mark.parametrize("command", ["export", "eval"])
def test_bad_sources_are_one_paragraph_and_exit_2(tiny_run, tmp_path, capsys, command):
    (tmp_path / "in").mkdir()
    for name, (path, needle) in _bad_sources(tmp_path / "in", tiny_run[1]).items():
        argv = ["export", str(path), str(tmp_path / "out")] if command == "export" else ["eval", "--checkpoint", str(path)]
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("\n") == 1, (name, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needle", [
    (["--timm-model", "vit_tiny_patch16_22"], "did you mean vit_tiny_patch16_224"),
    (["--timm-model", "resnet18"], "not a ViT"),
    (["--timm-model", "vit_tiny_patch16_224", "--model-args", "{img_size: 32"], "JSON object"),
    (["--timm-model", "vit_tiny_patch16_224", "--weights", "nope.safetensors"], "nope.safetensors"),
])
def test_bad_timm_models_are_clear_errors(args, needle, capsys, tmp_path):
    assert main(["eval", *args, "--results", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "res").exists()


def test_eval_of_a_run_from_another_version_says_to_pass_a_preset(tiny_run, tmp_path, capsys):
    """A run whose saved study no longer fits the schema (the flat eval keys of mugbench before the
    protocol registry) is refused with what to do, not a bare unknown-key error."""
    import shutil

    _, run_dir = tiny_run
    old = tmp_path / run_dir.name
    shutil.copytree(run_dir, old, symlinks=True)
    info = json.loads((old / "run.json").read_text())
    info["config"]["eval"]["knn_k"] = 20
    (old / "run.json").write_text(json.dumps(info))
    assert main(["eval", "--checkpoint", str(old), "--evals", "knn", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "does not fit this mugbench version" in err and "eval.knn_k" in err and "Pass --preset" in err
