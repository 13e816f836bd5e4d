"""`mugbench export`: a pre-trained encoder as a timm Hugging Face folder (config.json + model.safetensors).

The folder loads offline with ``timm.create_model("local-dir:FOLDER", pretrained=True)`` and with
transformers' ``AutoModel.from_pretrained(FOLDER)`` (its ``TimmWrapperModel``): timm's own
``save_for_hf`` writes it, with the architecture arguments (``model_args``) that rebuild the exact
ViT and a ``pretrained_cfg`` holding the preprocessing the encoder was trained with. A whole CLIP-style
method (a run of clip, slip or flip, or its checkpoint.pt) also gets its image and text towers as an
open_clip model in the same folder (`mugbench.export_open_clip`). The README.md model card says what
the encoder is, how to load it with each library, and what mugbench measured of it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .encoder_eval import pretrain_conditions, rebuild_method
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


def export_timm(source: Path | EncoderSource, out_dir: Path, verify: bool = True, force: bool = False,
                results: Path | None = None, open_clip: bool = True, log: Callable[[str], None] = print) -> Path:
    """Write ``source``'s encoder to ``out_dir`` in timm's hub layout, plus a README.md model card.

    ``source`` is anything `load_source` accepts. With ``verify`` the folder is loaded back through
    timm and transformers and must give the same features as the encoder, so a broken export never goes
    unnoticed. ``out_dir`` must be new or empty, or ``force`` given (see `check_destination`).
    ``results``: a results folder whose records of this run (method, data, preset, seed) make the
    card's results table. With ``open_clip``, a source that holds a whole CLIP-style method also gets
    the open_clip files; ``log`` is told when a method with a text tower gets none, and why.
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
    _drop_num_classes_arg(out_dir / "config.json")
    from .export_open_clip import OPEN_CLIP_FILES, write_open_clip

    towers = _open_clip_towers(src, log) if open_clip else None
    if towers is not None:
        try:
            write_open_clip(*towers, out_dir, src.img_size, mean, std)
        except ExportError as exc:  # an image-tower layout open_clip has no place for (it writes nothing then)
            log(f"open_clip: not written: {exc}")
            towers = None
    if towers is None:  # open_clip files of an earlier export (--force) would pair another model's towers with this one
        for name in OPEN_CLIP_FILES:
            (out_dir / name).unlink(missing_ok=True)
    atomic_write_text(out_dir / "README.md", model_card(src, out_dir, data_config, results_dir=results,
                                                        open_clip=towers is not None, provenance=provenance))
    if verify:
        _verify(model, out_dir, src.img_size)
        if towers is not None:
            from .export_open_clip import verify_open_clip

            diffs = verify_open_clip(*towers, out_dir, src.img_size)
            log(f"open_clip: both towers written; open_clip's embeddings differ from mugbench's by at most "
                f"{max(diffs['image'], diffs['text']):.1e}")
    return out_dir


def _drop_num_classes_arg(config_path: Path) -> None:
    """Remove ``num_classes`` from the config's ``model_args``, where timm's ``save_for_hf`` always puts it.

    transformers' ``TimmWrapperModel`` calls ``timm.create_model(..., num_classes=0, **model_args)``, so a
    second ``num_classes`` there is a TypeError and the folder would not load in transformers at all. timm
    itself still builds the encoder without a classifier: it takes ``num_classes`` from the config's top
    level (0, also written by ``save_for_hf``) when ``model_args`` has none.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("model_args"), dict) and "num_classes" in config["model_args"]:
        del config["model_args"]["num_classes"]
        atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")


def _open_clip_towers(src: EncoderSource, log: Callable[[str], None]):
    """``(method, tokenizer)`` when ``src`` holds a whole method open_clip can express, else None; a
    method with a text tower that gets no open_clip files is logged with the reason."""
    from .config import ConfigError
    from .export_open_clip import open_clip_problem
    from .registry import UnknownNameError, get_method

    try:
        caps = get_method(src.method).capabilities() if src.method else []
    except UnknownNameError:  # a plugin's run, the plugin not installed here: nothing to rebuild it with
        caps = []
    if not {"encode_image", "encode_text"} <= set(caps):
        return None
    if src.method_state is None:
        log(f"open_clip: not written: {src.origin} holds only the encoder; export the run directory or its "
            f"checkpoint.pt to get {src.method}'s text tower as an open_clip model too.")
        return None
    try:
        method, tokenizer = rebuild_method(src)
    except (ConfigError, RuntimeError) as exc:
        log(f"open_clip: not written: {src.method} could not be rebuilt from {src.origin} ({exc}).")
        return None
    if method is None:
        log(f"open_clip: not written: {src.origin} has no run.json beside it to rebuild {src.method} from.")
        return None
    problem = open_clip_problem(method)
    if problem:
        log(f"open_clip: not written: {problem}.")
        return None
    return method, tokenizer


def check_destination(out_dir: Path, force: bool = False) -> None:
    """Raise `ExportError` unless an export may write into ``out_dir``; nothing is written.

    An export writes config.json, model.safetensors and README.md (and open_clip_config.json and
    open_clip_model.safetensors for a CLIP-style method), overwriting files of those names: a
    non-empty folder needs ``force``. A run folder (run.json, metrics.jsonl or
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
            f"writes config.json, model.safetensors and README.md (and the open_clip files of a CLIP-style method) "
            f"and would overwrite files of those names. Nothing "
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


def model_card(src: EncoderSource, out_dir: Path, data_config: dict, results_dir: Path | None = None,
               open_clip: bool = False, provenance: dict | None = None) -> str:
    """The README.md: Hugging Face front matter, what the encoder is and how it was trained, the results
    mugbench recorded for its run (its records in ``results_dir``; None: no results folder was given),
    and how to load it in timm, transformers and, with ``open_clip``, open_clip. ``provenance``: the
    source's `provenance_block`, when already built."""
    from .results import git_commit

    p = provenance if provenance is not None else provenance_block(src)
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
    tags = ["image-feature-extraction", "timm", "transformers", "mugbench"] + ([p["method"]] if p.get("method") else [])
    tags = list(dict.fromkeys(tags + (["open_clip", "clip"] if open_clip else [])))
    libraries = "timm and transformers" + (", and its image and text towers for open_clip" if open_clip else "")
    return f"""---
library_name: timm
pipeline_tag: image-feature-extraction
license: {_license()}
tags: {json.dumps(tags)}
---
# {method} ViT encoder (mugbench)

An image encoder pre-trained by mugbench with `{method}`, exported for {libraries}.
The image encoder has no classifier (`num_classes=0`): use its features.

| | |
|---|---|
{table}
{_results_section(results_dir, p)}
## Loading

timm:

```python
import timm
model = timm.create_model("local-dir:{out_dir}", pretrained=True).eval()
tokens = model.forward_features(images)  # [B, 1 + patches, {int(src.encoder.embed_dim)}]; class token first
```

transformers (its `TimmWrapperModel`, transformers >= 4.53):

```python
from transformers import AutoImageProcessor, AutoModel, pipeline
processor = AutoImageProcessor.from_pretrained("{out_dir}")
model = AutoModel.from_pretrained("{out_dir}").eval()
out = model(**processor(image, return_tensors="pt"))  # last_hidden_state: the tokens; pooler_output: the class token
features = pipeline("image-feature-extraction", model="{out_dir}")(image, pool=True)
```
{_open_clip_section(out_dir) if open_clip else ""}
`mugbench eval --checkpoint {out_dir}` evaluates the image encoder with the benchmark's protocols.
"""


def _open_clip_section(out_dir: Path) -> str:
    return f"""
open_clip (both towers, the logit scale and open_clip's own tokenizer):

```python
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out_dir}")
tokenizer = open_clip.get_tokenizer("local-dir:{out_dir}")
image_embedding = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)
text_embedding = model.encode_text(tokenizer(["a photo of a dog."]), normalize=True)
```

`open_clip_config.json` says under "mugbench" which vocabulary the text tower was trained on: ids it never
saw share the embedding of its unknown token.
"""


def run_records(results_dir: Path, provenance: dict) -> list:
    """The result records of the exported run under ``results_dir``: its method, pre-training data,
    preset and seed, and, where both the run and the record know them, its step count (a record of an
    earlier checkpoint describes other weights) and its like-for-like conditions (a record of another
    run of the same name, e.g. other epochs, does not describe these weights). Empty when the run's
    identity is not known."""
    from .fingerprint import fingerprint
    from .results import load_records, record_location

    method, data, preset, seed = (provenance.get(k) for k in ("method", "pretrain_data", "preset", "seed"))
    if None in (method, data, preset, seed):
        return []
    folder = record_location(results_dir, data, preset, method, "-", "-", seed).parent
    steps, conditions = provenance.get("steps"), provenance.get("conditions")
    ours = fingerprint(conditions)  # "" when the run recorded none
    return [r for r in load_records(folder) if (r.method, r.pretrain_data, r.preset, r.seed) == (method, data, preset, seed)
            and (not steps or not r.steps or r.steps == steps) and (not ours or not r.fingerprint or r.fingerprint == ours)]


def _results_section(results_dir: Path | None, p: dict) -> str:
    """The card's results table: the run's records in ``results_dir`` (`run_records`; an empty string
    when no results folder was given), ordered and labelled as the report shows protocols."""
    from .report.frame import headline_metrics, protocol_label, protocol_order_key

    if results_dir is None:
        return ""
    records = run_records(results_dir, p)
    who = f"`{p.get('method')}` on {p.get('pretrain_data')} ({p.get('preset')} preset), seed {p.get('seed')}"
    if not records:
        return f"\n## Results\n\nNo result records of {who} were found in `{results_dir}`.\n"
    lines = []
    for r in sorted(records, key=lambda r: (protocol_order_key(r.protocol), r.dataset)):
        headline = [m for m in headline_metrics(r.protocol) if m in r.metrics]
        names = headline + sorted(m for m in r.metrics if m not in headline)
        result = ", ".join(f"{m} {_number(r.metrics[m])}" for m in names)
        lines.append(f"| {protocol_label(r.protocol)} | {r.dataset} | {result} |")
    table = "\n".join(lines)
    return f"""
## Results

Measured by mugbench for {who} (result records in `{results_dir}`):

| evaluation | dataset | result |
|---|---|---|
{table}
"""


def _number(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4g}"


def _license() -> str:
    """mugbench's licence as a Hugging Face licence id (``other`` when the installed metadata has none)."""
    from importlib import metadata

    try:
        meta = metadata.metadata("mugbench")
        text = meta.get("License-Expression") or meta.get("License")
    except metadata.PackageNotFoundError:
        text = None
    return text.strip().lower() if text and len(text.split()) == 1 else "other"


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


@torch.no_grad()
def _verify(model: torch.nn.Module, out_dir: Path, img_size: int) -> None:
    """Load ``out_dir`` back through timm and transformers: both must give the encoder's features."""
    import timm

    reloaded = timm.create_model(f"local-dir:{out_dir.resolve()}", pretrained=True).eval()
    images = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    tokens = model.forward_features(images)
    if reloaded.num_classes != 0 or not torch.allclose(tokens, reloaded.forward_features(images), rtol=0, atol=1e-5):
        raise RuntimeError(f"The export in {out_dir} does not reproduce the encoder's features when loaded "
                           f"through timm; please report this with the timm version.")
    hf = _transformers_features(out_dir, images)
    if hf is None:
        return
    pooled = model.forward_head(tokens, pre_logits=True)
    if not (torch.allclose(tokens, hf.last_hidden_state, rtol=0, atol=1e-6)
            and torch.allclose(pooled, hf.pooler_output, rtol=0, atol=1e-6)):
        raise RuntimeError(f"The export in {out_dir} does not reproduce the encoder's features when loaded "
                           f"through transformers' AutoModel; please report this with the transformers version.")


def _transformers_features(out_dir: Path, images: torch.Tensor):
    """transformers' ``AutoModel`` output for ``images`` from the folder, or None without transformers."""
    try:
        import transformers
        from transformers import AutoModel
    except ImportError:
        return None
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a weights-loading bar per export is noise
    try:
        return AutoModel.from_pretrained(str(out_dir.resolve())).eval()(pixel_values=images)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
