"""`mugbench eval --timm-model` with the names timm users write: pretrained tags and hub repositories come
only from the local caches (never downloaded, never silently random), local folders load as timm does."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file
from timm.models import save_for_hf

from mugbench.cli import main
from mugbench.sources import EncoderSourceError, load_timm_source
from mugbench.timm_weights import WeightsNotCachedError

TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache and torch hub folder for this test alone."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    return cache


def cache_repo(cache, repo_id: str, files: dict) -> None:
    """Lay ``files`` (name -> writer(path)) out as huggingface_hub caches a download of ``repo_id``'s main."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, write in files.items():
        write(snapshot / name)


def features(model, size: int) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))


def test_a_pretrained_tag_absent_from_the_cache_stops_with_what_to_do(hub_cache, tmp_path, capsys):
    with pytest.raises(WeightsNotCachedError):
        load_timm_source("vit_small_patch16_224.dino")
    assert main(["eval", "--timm-model", "vit_small_patch16_224.dino", "--results", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert "never downloads" in err and str(hub_cache) in err and "--weights" in err
    assert "vit_small_patch16_224)" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "res").exists()  # nothing written, nothing evaluated


def test_a_pretrained_tag_loads_its_weights_from_the_local_cache(hub_cache):
    released = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    cache_repo(hub_cache, f"timm/{TAG}", {"model.safetensors": lambda p: save_file(released.state_dict(), str(p))})
    source = load_timm_source(TAG)
    assert source.weights.endswith("model.safetensors") and source.origin == f"timm:{TAG}"
    assert torch.equal(features(source.encoder, 224), features(released, 224))  # the classifier is dropped
    assert source.encoder.num_classes == 0


def test_an_unknown_tag_lists_the_real_ones():
    with pytest.raises(EncoderSourceError, match="its tags include vit_tiny_patch16_224.augreg"):
        load_timm_source("vit_tiny_patch16_224.nosuchtag")


def test_hub_and_local_folders_load_as_timm_does(hub_cache, tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY)
    folder = tmp_path / "folder"
    save_for_hf(model, str(folder), safe_serialization=True, model_args=TINY)
    local = load_timm_source(f"local-dir:{folder}")
    assert torch.equal(features(local.encoder, 32), features(model, 32)) and local.weights == str(folder)

    with pytest.raises(WeightsNotCachedError, match="the Hugging Face repository me/tiny"):
        load_timm_source("hf-hub:me/tiny")
    cache_repo(hub_cache, "me/tiny", {name: lambda p, n=name: p.write_bytes((folder / n).read_bytes())
                                      for name in ("config.json", "model.safetensors")})
    hub = load_timm_source("hf-hub:me/tiny")
    assert torch.equal(features(hub.encoder, 32), features(model, 32)) and hub.origin == "timm:hf-hub:me/tiny"
    assert json.loads((folder / "config.json").read_text())["architecture"] == hub.timm_name

    with pytest.raises(EncoderSourceError, match="brings its own weights"):
        load_timm_source("hf-hub:me/tiny", weights=tmp_path / "w.safetensors")


def test_the_console_says_random_init_and_the_resize(tmp_path, capsys):
    argv = ["eval", "--timm-model", "vit_tiny_patch16_224", "--model-args", json.dumps({**TINY, "img_size": 48}),
            "--evals", "knn", "--preset", "smoke", "--results", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "encoder: timm:vit_tiny_patch16_224: random init" in out
    assert "the study's images are 32 px; they are resized to the encoder's 48 px" in out
