"""Checkpoints (atomic, loaded with ``weights_only=True``) and safetensors encoder export."""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

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


# A run directory keeps its last checkpoints as checkpoint-<step>.pt; checkpoint.pt links to the newest.
CHECKPOINT_LINK = "checkpoint.pt"
_STEP_FILE = re.compile(r"^checkpoint-(\d+)\.pt$")


def run_checkpoints(workdir: Path) -> list[Path]:
    """The run's checkpoint files, newest first (a plain ``checkpoint.pt`` of older runs last)."""
    steps = sorted(((int(m.group(1)), p) for p in Path(workdir).glob("checkpoint-*.pt")
                    if (m := _STEP_FILE.match(p.name))), reverse=True)
    files = [p for _, p in steps]
    link = Path(workdir) / CHECKPOINT_LINK
    if link.is_file() and not link.is_symlink():
        files.append(link)
    return files


def save_run_checkpoint(workdir: Path, state: dict, step: int, keep: int = 2) -> Path:
    """Write ``checkpoint-<step>.pt`` atomically, point ``checkpoint.pt`` at it, keep the newest ``keep``.

    Keeping more than one means a checkpoint that turns out unreadable (a disk that filled up,
    a file system that lost the last write) costs ``ckpt_every`` steps, not the run.
    """
    workdir = Path(workdir)
    for stale in workdir.glob(".checkpoint-*.tmp"):  # left by a write that a kill cut off (one writer: rank 0)
        stale.unlink(missing_ok=True)
    path = save_checkpoint(workdir / f"checkpoint-{step:08d}.pt", state)
    link = workdir / CHECKPOINT_LINK
    tmp = workdir / f".{CHECKPOINT_LINK}.{os.getpid()}.link"
    tmp.unlink(missing_ok=True)
    os.symlink(path.name, tmp)
    os.replace(tmp, link)  # atomic: readers see the old target or the new one
    for old in run_checkpoints(workdir)[max(1, keep):]:
        if old != link:
            old.unlink(missing_ok=True)
    return path


def load_newest_checkpoint(workdir: Path, warn=None) -> tuple[dict, Path] | None:
    """The newest checkpoint of a run that loads, and its path; None when there is none.

    An unreadable newest file is reported through ``warn`` (default: `warnings.warn`) and the
    previous one is tried, so a corrupt last write falls back instead of failing or restarting.
    """
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    for path in run_checkpoints(workdir):
        try:
            ckpt = load_checkpoint(path)
            if not isinstance(ckpt, dict) or not {"model", "optimizer", "state"} <= ckpt.keys():
                raise ValueError("it lacks the model, optimizer or state entries")
            return ckpt, path
        except Exception as exn:  # truncated zip, bad pickle, missing keys: all mean "not this one"
            warn(f"checkpoint {path} is unreadable ({exn!r:.200}); falling back to the previous one")
    return None


def export_encoder(path: Path, encoder: torch.nn.Module, spec: EncoderSpec) -> Path:
    """Save the encoder as safetensors with the timm architecture in the metadata."""
    meta = {"timm_name": spec.timm_name, "timm_kwargs": json.dumps(spec.timm_kwargs()), "format": "mugbench-encoder-v1"}
    return _atomic(path, lambda tmp: save_file(export_state_dict(encoder), tmp, metadata=meta))


def load_encoder(path: Path) -> torch.nn.Module:
    """Rebuild a plain timm ViT (in eval mode) from an exported encoder file; the one loader is
    `mugbench.sources.load_source`, which also checks the file and says what is wrong with it."""
    from ..sources import load_source

    return load_source(Path(path)).encoder
