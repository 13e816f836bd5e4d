"""A method's run: the method built around the study's shared encoder, and the folder its training
lives in, keyed by everything that changes training (so a rerun resumes it)."""
from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import torch

from .config import DataConfig, StudyConfig, TrainConfig
from .method import Method, TextSpec
from .models.vit import build_encoder
from .registry import get_method
from .train.run_lock import LOCK_NAME


def build_method(name: str, cfg: StudyConfig, spec: TextSpec) -> Method:
    """The method around a freshly built shared encoder; the encoder init depends only on the seed."""
    encoder = build_encoder(cfg.encoder, seed=cfg.seed)
    torch.manual_seed(cfg.seed + 1)  # heads: same per seed, independent of the encoder's draws
    return get_method(name).build(encoder, spec, cfg.methods.get(name))


def run_dir_for(workdir: Path, cfg: StudyConfig, name: str) -> Path:
    """Run directory keyed by everything that changes training, so a rerun resumes the same run."""
    key = {k: v for k, v in cfg.to_dict().items() if k not in ("eval", "preset")}
    key["train"] = {k: v for k, v in key["train"].items() if k not in TrainConfig.PERFORMANCE_ONLY}
    key["data"] = {k: v for k, v in key["data"].items() if k not in DataConfig.LOADING_ONLY}
    key["method"] = name
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return workdir / _safe(cfg.data.name) / cfg.preset / f"{name}-seed{cfg.seed}-{digest}"


def set_aside(run_dir: Path) -> Path | None:
    """Move everything in ``run_dir`` except the run lock (`LOCK_NAME`, which its caller holds) into a new
    sibling folder ``<name>.old-<time>``, so the run starts over without losing the old one (`--fresh`);
    returns that folder, or None when there was nothing to move."""
    entries = [p for p in sorted(run_dir.iterdir()) if p.name != LOCK_NAME] if run_dir.is_dir() else []
    if not entries:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    for n in range(1, 1000):  # two fresh starts within a second
        if not aside.exists():
            break
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    aside.mkdir()
    for entry in entries:
        entry.rename(aside / entry.name)
    return aside


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]
