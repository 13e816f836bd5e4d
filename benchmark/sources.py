"""Where an encoder to evaluate or export comes from, and the ``run.json`` that describes a run.

An encoder can be given as a run directory of `mugbench run`, its ``checkpoint.pt`` (the whole
method, so capability protocols can run too), its ``encoder.safetensors``, a folder written by
`mugbench export` (timm's Hugging Face layout), or any timm ViT by name with optional weights.
Each becomes an `EncoderSource`: a plain timm ViT plus what is known of its provenance.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used, so a wrong path is reported in milliseconds
    import torch

RUN_INFO = "run.json"
RUN_FORMAT = "mugbench-run-v1"
# Run directories are named <method>-seed<S>-<hash> (study.run_dir_for); used when run.json is absent.
_RUN_DIR_NAME = re.compile(r"^(?P<method>.+)-seed(?P<seed>\d+)-[0-9a-f]{10}$")


class EncoderSourceError(ValueError):
    """A path, timm model name or weights file that does not give an encoder the harness can use."""


def write_run_info(run_dir: Path, method: str, cfg, summary=None, tokenizer=None, conditions=None) -> Path:
    """Write ``run_dir/run.json``: the method, the whole study config and the encoder architecture.

    With it a ``checkpoint.pt`` is self-describing: `load_source` rebuilds the encoder (and the
    method) without the preset it was trained with. The tokenizer's compact vocabulary is kept
    too, so that captioning and retrieval can be evaluated without the pre-training shards, and the
    run's like-for-like ``conditions`` (`mugbench.fingerprint`), so its later records carry the same ones.
    """
    from .files import atomic_write_text
    from .results import git_commit

    info = {
        "format": RUN_FORMAT, "method": method, "config": cfg.to_dict(),
        "encoder": {"timm_name": cfg.encoder.timm_name, "timm_kwargs": cfg.encoder.timm_kwargs()},
        "git_commit": git_commit(),
    }
    if summary is not None:
        info.update(steps=summary.steps, epochs=summary.epochs)
    if tokenizer is not None:
        info["vocab"] = tokenizer.vocab  # None for the full BPE vocabulary
    if conditions:
        info["conditions"] = conditions
    return atomic_write_text(Path(run_dir) / RUN_INFO, json.dumps(info, indent=2, default=str) + "\n")


def read_run_info(run_dir: Path) -> dict | None:
    """The ``run.json`` of ``run_dir``, or None when there is none (runs made before it existed)."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EncoderSourceError(f"{path} is not readable JSON ({exc}); delete it or restore it from the run.") from None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT or not all(
            isinstance(info.get(k), t) for k, t in (("method", str), ("config", dict), ("encoder", dict))):
        raise EncoderSourceError(f"{path} is not a mugbench run description (format {RUN_FORMAT!r} with the "
                                 f"method, config and encoder); restore it from the run or delete it.")
    return info


@dataclass
class EncoderSource:
    """A timm ViT ready to evaluate or export, with what is known of where it came from.

    ``kind`` is ``run`` / ``checkpoint`` (a whole method's weights), ``encoder`` (an
    ``encoder.safetensors``), ``timm-folder`` (a `mugbench export` or timm hub folder) or ``timm``.
    """

    encoder: torch.nn.Module
    kind: str
    origin: str
    timm_name: str
    timm_kwargs: dict
    method: str | None = None
    run: dict | None = None  # run.json, or the provenance block of an exported folder
    method_state: dict | None = None  # the whole method's state dict (checkpoints only)
    steps: int | None = None
    weights: str | None = None  # for kind == "timm": the weights file, None = random init

    @property
    def img_size(self) -> int:
        """The side of the square images the encoder takes."""
        return int(self.encoder.patch_embed.img_size[0])

    def describe(self) -> dict[str, Any]:
        """Where the encoder came from, for result records and model cards."""
        out = {"kind": self.kind, "origin": self.origin, "timm_name": self.timm_name}
        if self.kind == "timm":
            out.update(weights=self.weights or "random init", model_args=self.timm_kwargs)
        if self.steps is not None:
            out["steps"] = self.steps
        return out


def _not_found(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"No run directory, checkpoint or encoder at {path}. Pass a run directory of `mugbench run` "
        f"(runs/<data>/<preset>/<method>-seed<S>-<hash>/), its checkpoint.pt or encoder.safetensors, or a "
        f"folder written by `mugbench export`.")


def load_source(path: Path) -> EncoderSource:
    """Find the encoder in ``path``: a run directory, ``checkpoint.pt``, ``encoder.safetensors`` or
    an exported timm folder. Raises FileNotFoundError or `EncoderSourceError` with what to pass instead."""
    path = Path(path)
    if not path.exists():
        raise _not_found(path)
    path = path.resolve()  # records and model cards name the source unambiguously
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_timm_folder(path)
        for name, loader in (("checkpoint.pt", _load_checkpoint), ("encoder.safetensors", _load_encoder_file)):
            if (path / name).is_file():
                return loader(path / name, kind="run", origin=path)
        raise EncoderSourceError(
            f"{path} is a directory without checkpoint.pt, encoder.safetensors or config.json: it is not a run "
            f"directory of `mugbench run` nor a folder written by `mugbench export`.")
    if path.suffix == ".safetensors":
        if (path.parent / "config.json").is_file() and not _safetensors_meta(path).get("timm_name"):
            return _load_timm_folder(path.parent)  # model.safetensors of an exported folder
        return _load_encoder_file(path)
    return _load_checkpoint(path)


def _safetensors_meta(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise EncoderSourceError(f"{path} is not a readable safetensors file ({exc}).") from None


def _build_timm(name: str, kwargs: dict, state: dict, where: Path) -> torch.nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise EncoderSourceError(
            f"The weights in {where} do not fit a {name} with {kwargs} ({detail}): the architecture recorded "
            f"beside them (run.json, or the encoder file's metadata) belongs to another run.") from None
    return model.eval()


def _load_encoder_file(path: Path, kind: str = "encoder", origin: Path | None = None) -> EncoderSource:
    from safetensors.torch import load_file

    meta = _safetensors_meta(path)
    if "timm_name" not in meta:
        raise EncoderSourceError(
            f"{path} is a safetensors file but not a mugbench encoder: its metadata names no timm "
            f"architecture. Evaluate a plain state dict with --timm-model NAME --weights {path}.")
    kwargs = json.loads(meta.get("timm_kwargs") or "{}")
    run = read_run_info(path.parent)
    method = run["method"] if run else _method_from_dir(path.parent)
    encoder = _build_timm(meta["timm_name"], kwargs, load_file(str(path)), path)
    return EncoderSource(encoder, kind, str(origin or path), meta["timm_name"], kwargs, method=method, run=run,
                         steps=run.get("steps") if run else None)


def _load_checkpoint(path: Path, kind: str = "checkpoint", origin: Path | None = None) -> EncoderSource:
    from .train.checkpoint import load_checkpoint

    foreign = EncoderSourceError(
        f"{path} is not a mugbench checkpoint: expected the checkpoint.pt of a `mugbench run` directory "
        f"(a dict with the method's weights under 'model'), an encoder.safetensors, or a folder written by "
        f"`mugbench export`.")
    try:
        ckpt = load_checkpoint(path)
    except Exception:  # pickle, zip and weights_only errors all mean the same thing here
        raise foreign from None
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, dict) or not any(k.startswith("encoder.") for k in model):
        raise foreign
    state = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
    run = read_run_info(path.parent)
    if run is not None:
        name, kwargs = run["encoder"]["timm_name"], run["encoder"]["timm_kwargs"]
    elif (path.parent / "encoder.safetensors").is_file():  # runs made before run.json: the export knows
        meta = _safetensors_meta(path.parent / "encoder.safetensors")
        name, kwargs = meta.get("timm_name"), json.loads(meta.get("timm_kwargs") or "{}")
    else:
        name = None
    if not name:
        raise EncoderSourceError(
            f"{path} holds a method's weights, but nothing beside it says which ViT they belong to: there is "
            f"no run.json (written when a run finishes) nor encoder.safetensors in {path.parent}. Let the run "
            f"finish (rerunning `mugbench run` resumes it), or pass the run directory of a finished run.")
    step = (ckpt.get("state") or {}).get("step")
    return EncoderSource(_build_timm(name, kwargs, state, path), kind, str(origin or path), name, kwargs,
                         method=run["method"] if run else _method_from_dir(path.parent), run=run,
                         method_state=model, steps=step if step is not None else (run or {}).get("steps"))


def _method_from_dir(run_dir: Path) -> str | None:
    match = _RUN_DIR_NAME.match(run_dir.name)
    return match["method"] if match else None


def _load_timm_folder(path: Path) -> EncoderSource:
    import timm

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        name = config["architecture"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise EncoderSourceError(f"{path / 'config.json'} is not a timm model config ({exc!r}).") from None
    try:
        model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True)
    except RuntimeError as exc:
        raise EncoderSourceError(f"timm could not load the model folder {path}: {exc}") from None
    provenance = config.get("mugbench") or None
    return EncoderSource(model.eval(), "timm-folder", str(path), name, dict(config.get("model_args") or {}),
                         method=(provenance or {}).get("method"), run=provenance,
                         steps=(provenance or {}).get("steps"))


# timm.create_model arguments that read a file or download one; weights come only from --weights.
_LOADING_ARGS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                 "cache_dir")


def _parse_model_args(model_args: str | dict | None) -> dict:
    """``--model-args`` as a dict of architecture arguments; anything else is an `EncoderSourceError`."""
    if isinstance(model_args, str):
        try:
            model_args = json.loads(model_args)
        except ValueError as exc:
            raise EncoderSourceError(f"--model-args must be a JSON object, e.g. '{{\"img_size\": 32}}' ({exc}).") from None
    if model_args is None:
        return {}
    if not isinstance(model_args, dict):
        raise EncoderSourceError(f"--model-args must be a JSON object of timm.create_model keyword arguments, e.g. "
                                 f"'{{\"img_size\": 32}}', not {json.dumps(model_args)}.")
    loading = [k for k in model_args if k in _LOADING_ARGS]
    if loading:
        raise EncoderSourceError(
            f"--model-args may not set {', '.join(loading)}: that makes timm load or download weights, and "
            f"`mugbench eval` only reads the weights you pass. Give them with --weights FILE (a .safetensors or "
            f".pth state dict) and keep --model-args to the architecture (img_size, patch_size, ...).")
    return dict(model_args)


def load_timm_source(name: str, weights: Path | None = None, model_args: str | dict | None = None) -> EncoderSource:
    """A timm ViT by the name a timm user writes, with ``weights`` (a .safetensors or .pth state dict) if given.

    ``ARCH`` alone is randomly initialised; ``ARCH.TAG`` loads timm's pretrained weights of that tag and
    ``hf-hub:REPO`` a hub repository, both only from the local caches (`mugbench.timm_weights`: a
    `WeightsNotCachedError` when absent); ``local-dir:FOLDER`` a timm folder. Never downloads anything.
    """
    import timm
    from timm.models import split_model_name_tag

    from .timm_weights import cached_hub_folder, cached_tag_weights, not_cached

    model_args = _parse_model_args(model_args)
    kwargs = dict({"num_classes": 0}, **model_args)  # features only: no classifier to fit or load
    if name.startswith(("hf-hub:", "local-dir:")):
        if weights is not None:
            raise EncoderSourceError(f"--timm-model {name} brings its own weights; --weights goes with an "
                                     f"architecture name (e.g. --timm-model vit_small_patch16_224 --weights FILE).")
        scheme, _, where = name.partition(":")
        folder = cached_hub_folder(where) if scheme == "hf-hub" else Path(where).expanduser()
        if folder is None:
            raise not_cached(name, f"the Hugging Face repository {where}")
        if not (folder / "config.json").is_file():
            raise EncoderSourceError(f"--timm-model {name}: {folder} has no config.json, so it is not a timm model "
                                     f"folder (one written by timm's save_for_hf, `mugbench export` or the hub).")
        model = _create(f"local-dir:{folder.resolve()}", True, kwargs, name, model_args)
        return _vit_source(model, name, model.pretrained_cfg.get("architecture") or name, kwargs, str(folder))
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise EncoderSourceError(f"timm has no model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "."))
    if tag and name not in timm.list_pretrained(name):  # get_pretrained_cfg raises on a tag timm lacks
        tags = timm.list_pretrained(f"{arch}.*")[:6]
        raise EncoderSourceError(f"timm has no pretrained tag {tag!r} for {arch}" + (
            f"; its tags include {', '.join(tags)}." if tags else f"; {arch} has no released weights in timm."))
    if tag and weights is None:
        found = cached_tag_weights(name)
        if found is None:
            raise not_cached(name, f"timm's pretrained weights {name}")
        # timm's own filter (key renames, position-embedding resize) on a state dict read without pickles
        overlay = {"pretrained_cfg_overlay": {"state_dict": _read_weights_file(found)}}
        model = _create(name, True, {**kwargs, **overlay}, name, model_args)
        model.pretrained_cfg.pop("state_dict", None)  # timm keeps the overlay: a second copy of every weight
        return _vit_source(model, name, name, kwargs, str(found))
    model = _create(name, False, kwargs, name, model_args)
    if weights is not None:
        try:
            model.load_state_dict(_read_state_dict(Path(weights), model, name))
        except RuntimeError as exc:  # shapes that differ from the architecture
            raise EncoderSourceError(f"{weights} does not fit timm model {name!r}: {str(exc).splitlines()[-1].strip()} "
                                     f"Pass the architecture with --model-args.") from None
    return _vit_source(model, name, name, kwargs, str(weights) if weights is not None else None)


def _create(spec: str, pretrained: bool, kwargs: dict, name: str, model_args: dict) -> torch.nn.Module:
    """``timm.create_model`` with its argument errors turned into `EncoderSourceError`."""
    import timm

    try:
        return timm.create_model(spec, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise EncoderSourceError(f"timm model {name!r} does not take these --model-args {model_args}: {exc}") from None
    except RuntimeError as exc:  # weights that do not fit the architecture asked for
        raise EncoderSourceError(f"timm could not load {name!r}: {str(exc).splitlines()[0]}") from None


def _vit_source(model: torch.nn.Module, name: str, timm_name: str, kwargs: dict, weights: str | None) -> EncoderSource:
    if not (hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")):
        raise EncoderSourceError(f"timm model {name!r} is not a ViT: the harness reads ViT tokens (patch_embed, class token).")
    return EncoderSource(model.eval(), "timm", f"timm:{name}", timm_name, kwargs, weights=weights)


def _read_weights_file(path: Path) -> dict:
    """A state dict from a .safetensors file, or a torch file read with ``weights_only`` (no pickled code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        _safetensors_meta(path)  # a clear error for a file that is not safetensors
        state = load_file(str(path))
    else:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise EncoderSourceError(f"{path} is not a torch state dict (loaded with weights_only=True).") from None
        for key in ("state_dict", "model"):  # common training-script wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise EncoderSourceError(f"{path} holds no state dict.")
    return state


def _read_state_dict(path: Path, model: torch.nn.Module, name: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {path}: pass a .safetensors or .pth state dict of {name}.")
    state = _read_weights_file(path)
    # A classifier head is not part of the features; the model is built without one.
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = (sorted(set(model.state_dict()) - set(state)), sorted(set(state) - set(model.state_dict())))
    if missing or unexpected:
        raise EncoderSourceError(
            f"{path} does not fit timm model {name!r} with these --model-args: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}. Pass the architecture with --model-args.")
    return state


def encoder_record_fields(source: EncoderSource) -> dict[str, Any]:
    """The ``encoder`` field of a result record: the run's own spec, else the ViT's actual shape."""
    if source.run and isinstance(source.run.get("config"), dict) and source.run["config"].get("encoder"):
        return dict(source.run["config"]["encoder"])
    m = source.encoder
    out = {"timm_name": source.timm_name, "img_size": source.img_size,
           "patch_size": int(m.patch_embed.patch_size[0]), "embed_dim": int(m.embed_dim), "depth": len(m.blocks)}
    attn, fc1 = getattr(m.blocks[0], "attn", None), getattr(getattr(m.blocks[0], "mlp", None), "fc1", None)
    if hasattr(attn, "num_heads"):  # ViT variants differ in block internals; report what is there
        out["num_heads"] = int(attn.num_heads)
    if hasattr(fc1, "out_features"):
        out["mlp_ratio"] = fc1.out_features / m.embed_dim
    return out
