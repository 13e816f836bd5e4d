"""`mugbench export`: a pre-trained encoder as a timm Hugging Face folder (config.json + model.safetensors).

The folder loads offline with ``timm.create_model("local-dir:FOLDER", pretrained=True)``: timm's own
``save_for_hf`` writes it, with the architecture arguments (``model_args``) that rebuild the exact
ViT and a ``pretrained_cfg`` holding the preprocessing the encoder was trained with.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .encoder_eval import pretrain_conditions
from .files import atomic_write_text
from .sources import EncoderSource, load_source

# Provenance keys copied from run.json into the exported config's "mugbench" block.
_RUN_KEYS = ("method", "steps", "epochs", "git_commit")
# Fields of a timm default config that describe timm's released weights, not these.
_FOREIGN_CFG_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "hf_hub_id", "url")
# Files that make a folder a `mugbench run` directory (besides checkpoint*.pt).
_RUN_FILES = ("run.json", "metrics.jsonl")


class ExportError(ValueError):
    """An export destination that cannot be written."""


def export_timm(source: Path | EncoderSource, out_dir: Path, verify: bool = True, force: bool = False) -> Path:
    """Write ``source``'s encoder to ``out_dir`` in timm's hub layout, plus a README.md model card.

    ``source`` is anything `load_source` accepts. With ``verify`` the folder is loaded back through
    timm and must give the same features as the encoder, so a broken export never goes unnoticed.
    ``out_dir`` must be new or empty, or ``force`` given (see `check_destination`).
    """
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    check_destination(out_dir, force)
    src = source if isinstance(source, EncoderSource) else load_source(Path(source))
    model = src.encoder.cpu().eval()
    # The default pretrained_cfg of the timm architecture describes timm's released weights
    # (their tag, licence, normalisation); none of that is true of these weights.
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _FOREIGN_CFG_KEYS}
    mean, std = _normalisation(src)
    data_config = {"input_size": (3, src.img_size, src.img_size), "mean": tuple(mean), "std": tuple(std),
                   "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"}
    provenance = provenance_block(src)
    save_for_hf(model, str(out_dir), safe_serialization=True, model_args=dict(src.timm_kwargs),
                data_config=data_config,
                model_config={"pretrained_cfg": {"tag": f"mugbench-{provenance.get('method') or 'encoder'}"},
                              "mugbench": provenance})
    atomic_write_text(out_dir / "README.md", model_card(src, out_dir, data_config))
    if verify:
        _verify(model, out_dir, src.img_size)
    return out_dir


def check_destination(out_dir: Path, force: bool = False) -> None:
    """Raise `ExportError` unless an export may write into ``out_dir``; nothing is written.

    An export writes config.json, model.safetensors and README.md, overwriting files of those
    names: a non-empty folder needs ``force``. A run folder (run.json, metrics.jsonl or
    checkpoint*.pt) is refused even with ``force``: its files would be overwritten, and
    `mugbench eval` would then read the run as a plain timm folder.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file: pass a folder to export into (it is created if missing).")
    if not out_dir.is_dir():
        return
    marks = [name for name in _RUN_FILES if (out_dir / name).exists()] + sorted(p.name for p in out_dir.glob("checkpoint*.pt"))
    if marks:
        raise ExportError(
            f"{out_dir} is a mugbench run folder (it holds {', '.join(marks[:3])}): exporting into it would overwrite "
            f"its files and make `mugbench eval` take the run for a plain timm folder, so it is refused even with "
            f"--force. Nothing was written. Export into a folder of its own, e.g. {out_dir.parent / (out_dir.name + '-timm')}.")
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries and not force:
        raise ExportError(
            f"{out_dir} is not empty (it holds {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}): an export "
            f"writes config.json, model.safetensors and README.md and would overwrite files of those names. Nothing "
            f"was written. Export into a new or empty folder, or pass --force to write into this one anyway.")


def _normalisation(src: EncoderSource) -> tuple[list[float], list[float]]:
    """Mean/std of the images the encoder saw: the harness's for mugbench runs, else the model's own."""
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

    if src.kind in ("timm-folder", "timm"):
        cfg = src.encoder.pretrained_cfg
        return list(cfg.get("mean", IMAGENET_MEAN)), list(cfg.get("std", IMAGENET_STD))
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def provenance_block(src: EncoderSource) -> dict:
    """What the exported config says about the encoder's pre-training (read back by `load_source`)."""
    run = src.run or {}
    config = run.get("config") or {}
    out = {k: run[k] for k in _RUN_KEYS if run.get(k) is not None}
    # The encoder's own like-for-like conditions, as `mugbench eval` gives them (an earlier checkpoint's
    # included), so that evaluating the export records what evaluating the source would.
    out.update(method=src.method, source=src.describe(), conditions=pretrain_conditions(src) or None)
    if config:
        out.update(pretrain_data=config.get("data", {}).get("name"), preset=config.get("preset"),
                   seed=config.get("seed"), config=config)
    for key in ("pretrain_data", "preset", "seed"):  # a re-export of an exported folder keeps them
        if key in run and key not in out:
            out[key] = run[key]
    if src.steps is not None:
        out["steps"] = src.steps
    return {k: v for k, v in out.items() if v is not None}


def model_card(src: EncoderSource, out_dir: Path, data_config: dict) -> str:
    """A short README.md: what the encoder is, how it was trained, how to load it."""
    from .results import git_commit

    p = provenance_block(src)
    method = p.get("method") or "unknown method"
    epochs = p.get("epochs") or (p.get("config") or {}).get("train", {}).get("epochs")
    rows = [("method", f"`{method}`"), ("pre-training data", p.get("pretrain_data")), ("preset", p.get("preset")),
            ("seed", p.get("seed")), ("epochs", f"{epochs:g}" if isinstance(epochs, (int, float)) else epochs),
            ("optimiser steps", p.get("steps")),
            ("architecture", f"`{src.timm_name}` with `{json.dumps(src.timm_kwargs, sort_keys=True)}`"),
            ("input", f"{src.img_size}x{src.img_size} RGB, bicubic resize + centre crop, "
                      f"mean {_fmt(data_config['mean'])}, std {_fmt(data_config['std'])}"),
            ("trained at commit", p.get("git_commit")), ("exported at commit", git_commit()),
            ("exported from", f"`{src.origin}`")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    return f"""---
library_name: timm
tags: [image-feature-extraction, timm, mugbench]
---
# {method} ViT encoder (mugbench)

An image encoder pre-trained by mugbench with `{method}`, exported for timm.
It has no classifier (`num_classes=0`): use its features.

| | |
|---|---|
{table}

```python
import timm
model = timm.create_model("local-dir:{out_dir}", pretrained=True).eval()
tokens = model.forward_features(images)  # [B, 1 + patches, {int(src.encoder.embed_dim)}]; class token first
```

`mugbench eval --checkpoint {out_dir}` evaluates it with the benchmark's protocols.
"""


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


@torch.no_grad()
def _verify(model: torch.nn.Module, out_dir: Path, img_size: int) -> None:
    import timm

    reloaded = timm.create_model(f"local-dir:{out_dir.resolve()}", pretrained=True).eval()
    images = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    if not torch.allclose(model.forward_features(images), reloaded.forward_features(images), rtol=0, atol=1e-5):
        raise RuntimeError(f"The export in {out_dir} does not reproduce the encoder's features when loaded "
                           f"through timm; please report this with the timm version.")
