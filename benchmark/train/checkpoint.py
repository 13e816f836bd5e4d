"""Checkpoints (atomic, loaded with ``weights_only=True``) and safetensors encoder export."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..models.vit import EncoderSpec, export_state_dict


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write ``state`` so that a crash mid-write never leaves a truncated checkpoint behind."""
    return _atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by `save_checkpoint` (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def export_encoder(path: Path, encoder: torch.nn.Module, spec: EncoderSpec) -> Path:
    """Save the encoder as safetensors with the timm architecture in the metadata."""
    meta = {"timm_name": spec.timm_name, "timm_kwargs": json.dumps(spec.timm_kwargs()), "format": "mugbench-encoder-v1"}
    return _atomic(path, lambda tmp: save_file(export_state_dict(encoder), tmp, metadata=meta))


def load_encoder(path: Path) -> torch.nn.Module:
    """Rebuild a plain timm ViT (in eval mode) from an exported encoder file; the one loader is
    `mugbench.sources.load_source`, which also checks the file and says what is wrong with it."""
    from ..sources import load_source

    return load_source(Path(path)).encoder
