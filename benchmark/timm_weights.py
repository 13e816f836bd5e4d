"""Find a timm model's released weights on this machine, never downloading them.

`mugbench eval --timm-model` takes the names a timm user writes: ``vit_small_patch16_224`` (an
architecture: random init unless ``--weights`` is given), ``vit_small_patch16_224.dino`` (a pretrained
tag), ``hf-hub:timm/vit_small_patch16_224.dino`` (a Hugging Face repository) and ``local-dir:FOLDER``
(a timm folder on disk). A tag or a hub name is looked up in the local Hugging Face cache (and, for
weights timm fetches by URL, torch hub's checkpoint folder); when it is not there the command stops with
what to do, instead of evaluating an untrained ViT under a pretrained name.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

# What timm reads from a hub repository, in its order of preference (timm's _hub.load_state_dict_from_hf).
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Weight files mugbench reads without running pickled code (safetensors, or torch.load with weights_only).
READABLE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsNotCachedError(FileNotFoundError):
    """A pretrained name whose weights are not on this machine (mugbench never downloads)."""


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache (``HF_HUB_CACHE`` / ``HF_HOME``), as huggingface_hub resolves it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of the hub repository ``repo_id`` in the local cache (its ``main`` snapshot), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir())
    return Path(found) if isinstance(found, str) else None


def cached_tag_weights(name: str) -> Path | None:
    """The weights file of timm's pretrained config ``name`` (``arch.tag``) on this machine, or None: its
    hub repository's file in the Hugging Face cache first, then the URL's file in torch hub's checkpoints."""
    import torch
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        names = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else HUB_WEIGHT_FILES
        for filename in names:
            found = cached_hub_file(cfg.hf_hub_id, filename)
            if found is not None:
                return found
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file() and path.suffix in READABLE_SUFFIXES:
            return path
    return None


def cached_hub_folder(repo_id: str) -> Path | None:
    """The cached snapshot folder of a timm hub repository (its config.json and a weights file), or None."""
    config = cached_hub_file(repo_id, "config.json")
    if config is None or not any((config.parent / f).exists() for f in HUB_WEIGHT_FILES):
        return None
    return config.parent


def not_cached(name: str, what: str) -> WeightsNotCachedError:
    """The paragraph for a pretrained name whose weights are not on this machine."""
    return WeightsNotCachedError(
        f"--timm-model {name} names {what}, which are not on this machine: mugbench never downloads weights, "
        f"and it will not evaluate an untrained ViT under a pretrained name. Looked in the Hugging Face cache "
        f"({hub_cache_dir()}; set HF_HUB_CACHE or HF_HOME to use another) and in torch hub's checkpoints. Fetch "
        f"them once where there is internet (e.g. `python -c \"import timm; timm.create_model('{name}', "
        f"pretrained=True)\"` or `hf download <repo>`) and copy the cache here, or pass the file with --weights; "
        f"for a randomly initialised ViT, give the architecture alone ({name.split(':')[-1].split('/')[-1].split('.')[0]}).")


__all__ = ["WeightsNotCachedError", "cached_hub_folder", "cached_tag_weights", "hub_cache_dir", "not_cached"]
