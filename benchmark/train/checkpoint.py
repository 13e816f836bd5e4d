"""Checkpoints (atomic, loaded with ``weights_only=True``) and safetensors encoder export."""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import atomic_write
from ..models.vit import EncoderSpec, export_state_dict


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write ``state`` so that a crash mid-write never leaves a truncated checkpoint behind.

    A write that fails (a full disk: OSError, or torch's zip writer's RuntimeError "unexpected
    pos ...") is an `OutputError` naming the file, the checkpoint kept and how to resume.
    """
    try:
        return atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as exc:
        from ..preflight import OutputError  # a user error: the CLI prints it, no traceback

        kept = next((p for p in run_checkpoints(path.parent) if p != path), None)
        raise OutputError(
            f"Writing the checkpoint {path} failed ({exc!s:.200}); most likely the disk holding {path.parent} is "
            f"full. The half-written file was removed and the previous checkpoint is kept "
            f"({kept or 'none: this was the first'}). Free space on that disk (or move the work folder and pass "
            f"--workdir), then rerun the same command to resume from the kept checkpoint.") from exc


def load_checkpoint(path: Path, within: Path | None = None) -> dict:
    """Load a checkpoint written by `save_checkpoint` (tensors and plain data only).

    The harness's one loader of checkpoints: always ``weights_only=True``, so a crafted pickle
    is refused instead of run. ``within``: the run folder the file must lie in once links are
    resolved (ValueError otherwise), so that a name read from a file there, or a link placed
    there, cannot make a run load something from elsewhere.
    """
    if within is not None:
        resolved, folder = Path(path).resolve(), Path(within).resolve()
        if not resolved.is_relative_to(folder):
            raise ValueError(f"{path} resolves to {resolved}, outside the run folder {folder}")
        path = resolved  # read what was checked, even if the link changes meanwhile
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


class UnreadableCheckpointError(RuntimeError):
    """A run folder holds checkpoint files but none of them loads; nothing was changed."""


def load_newest_checkpoint(workdir: Path, warn=None) -> tuple[dict, Path] | None:
    """The newest checkpoint of a run that loads, and its path; None when there is none.

    An unreadable newest file is reported through ``warn`` (default: `warnings.warn`) and the
    previous one is tried, so a corrupt last write falls back instead of failing or restarting.
    When every file is unreadable, `UnreadableCheckpointError`: restarting from step 0 would
    rotate them away, so that choice is left to the user.
    """
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    files, failures = run_checkpoints(workdir), []
    for path in files:
        try:
            ckpt = load_checkpoint(path, within=workdir)
            if not isinstance(ckpt, dict) or not {"model", "optimizer", "state"} <= ckpt.keys():
                raise ValueError("it lacks the model, optimizer or state entries")
            return ckpt, path
        except Exception as exn:  # truncated zip, bad pickle, missing keys: all mean "not this one"
            failures.append(f"{path} ({exn!r:.120})")
            if path != files[-1]:
                warn(f"checkpoint {path} is unreadable ({exn!r:.200}); falling back to the previous one")
    if failures:
        raise UnreadableCheckpointError(
            f"Run folder {workdir} holds {len(files)} checkpoint file(s) and none can be read: {'; '.join(failures)}. "
            f"Nothing was changed. If they can be restored (a disk that filled up, a file system that comes back), "
            f"do that and rerun to resume; to start this run's pre-training over from step 0 instead, move them out "
            f"of the folder (e.g. mkdir {workdir}/unreadable && mv {workdir}/checkpoint*.pt {workdir}/unreadable/) "
            f"or remove them, then rerun.")
    return None


def export_encoder(path: Path, encoder: torch.nn.Module, spec: EncoderSpec) -> Path:
    """Save the encoder as safetensors with the timm architecture in the metadata."""
    meta = {"timm_name": spec.timm_name, "timm_kwargs": json.dumps(spec.timm_kwargs()), "format": "mugbench-encoder-v1"}
    return atomic_write(path, lambda tmp: save_file(export_state_dict(encoder), tmp, metadata=meta))
