"""`mugbench eval`: the evaluation harness on an encoder that was not trained in this process.

The encoder is an `EncoderSource` (a run's checkpoint or export, an exported timm folder, or any
timm ViT). Its results are written as ordinary result records, so they sit in the same report as
the methods `mugbench run` trained; where the encoder came from is kept in ``protocol_options``.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from .config import ConfigError, StudyConfig, apply_override, from_dict, load_config
from .fingerprint import fingerprint, like_for_like
from .results import ResultRecord, record_location, write_record
from .sources import EncoderSource, encoder_record_fields

EXTERNAL_DATA = "external"  # pretrain_data of encoders whose pre-training mugbench does not know


def eval_config(source: EncoderSource, preset: str | None, overrides: list[str], log=print) -> StudyConfig:
    """The study to evaluate with: ``preset`` if given, else the run's own study, else ``toy``.

    The resolution is always the encoder's own (``log`` says so when that resizes the study's images),
    and a run's seed is kept so that its records land beside the ones `mugbench run` wrote for it.
    """
    from .eval.harness import check_evaluation

    run_cfg = (source.run or {}).get("config")
    if preset is None and isinstance(run_cfg, dict):
        raw = copy.deepcopy(run_cfg)
        for override in overrides:
            apply_override(raw, override)
        try:
            cfg = from_dict(raw)
        except ConfigError as exc:  # a run made by another mugbench version (e.g. flat eval.* keys)
            raise ConfigError(f"The study saved with this run ({source.origin}) does not fit this mugbench version: "
                              f"{exc} Pass --preset (smoke, toy, paper or a YAML file) to evaluate the encoder with "
                              f"that study's settings instead.") from None
    else:
        cfg = load_config(preset or "toy", overrides)
    if isinstance(run_cfg, dict) and not any(o.strip().startswith("seed=") for o in overrides):
        cfg.seed = int(run_cfg.get("seed", cfg.seed))
    if cfg.encoder.img_size != source.img_size:
        log(f"note: the study's images are {cfg.encoder.img_size} px; they are resized to the encoder's "
            f"{source.img_size} px")
    cfg.encoder = dataclasses.replace(cfg.encoder, img_size=source.img_size)
    from .preflight import world_size

    check_evaluation(cfg, world_size=world_size())
    return cfg


def record_identity(source: EncoderSource) -> tuple[str, str]:
    """``(method, pretrain_data)`` of the records: the run's for mugbench encoders, else
    ``timm:<name>`` (or the file's name) pre-trained on ``external`` data."""
    run = source.run or {}
    data = (run.get("config") or {}).get("data", {}).get("name") or run.get("pretrain_data") or EXTERNAL_DATA
    if source.method:
        return source.method, data
    if source.kind == "timm":
        return source.origin, data  # timm:NAME as given (a tag or hub repository tells weights apart)
    if source.kind == "timm-folder":
        return f"timm:{source.timm_name}", data
    return Path(source.origin).stem, data


def rebuild_method(source: EncoderSource, device="cpu"):
    """The whole pre-training method with the checkpoint's weights on ``device``, and its tokenizer.

    ``(None, None)`` when the source holds only an encoder. The tokenizer is the run's: the vocabulary
    kept in run.json (None there: open_clip's full BPE).
    """
    if source.method_state is None or not (source.run or {}).get("config") or not source.method:
        return None, None
    from .data.pretrain import text_spec
    from .data.tokenizer import TextTokenizer
    from .runs import build_method

    train_cfg = from_dict(copy.deepcopy(source.run["config"]))
    tokenizer = TextTokenizer(train_cfg.text.context_length, source.run.get("vocab"))
    method = build_method(source.method, train_cfg, text_spec(train_cfg, tokenizer))
    method.load_state_dict(source.method_state)
    return method.to(device).eval(), tokenizer  # capability protocols expect the method on their device


def evaluate_source(source: EncoderSource, cfg: StudyConfig, *, results_dir: Path, cache_dir: Path,
                    data_root: Path | None = None, overrides: list[str] = (), device=None,
                    log=print) -> list[ResultRecord]:
    """Run ``cfg``'s protocols on ``source``; write and return one record per (protocol, dataset).

    Under torchrun every rank evaluates (each protocol shards its work over them, `mugbench.eval.sharding`)
    and rank 0 alone logs, writes and returns the records (the others return none)."""
    from .eval.harness import evaluate, skipped_protocols
    from .evalset import EvalSets
    from .train.distributed import init_distributed

    info = init_distributed(torch.device(device).type if device is not None else cfg.train.device,
                            cfg.train.dist_timeout_min)
    device = torch.device(device) if device is not None and info.world_size == 1 else info.device
    if not info.is_main:
        log = lambda *args, **kwargs: None  # noqa: E731  (one voice per job)
    name, pretrain_data = record_identity(source)
    _note_source(source, log)
    _note_normalisation(source, log)
    capability = skipped_protocols(cfg, source.encoder)  # those that need the whole method
    method, tokenizer = rebuild_method(source, device) if capability else (None, None)
    if method is None and capability:
        why = ("its run directory has no run.json to rebuild the method from" if source.method_state is not None
               else "capability protocols need the whole pre-training method: pass a run directory or its checkpoint.pt")
        log(f"[{name}] skipped {', '.join(capability)} ({why})")

    def artifact_stem(protocol, dataset):
        return record_location(results_dir, pretrain_data, cfg.preset, name, protocol, dataset, cfg.seed).with_suffix("")

    results = evaluate(method if method is not None else source.encoder, cfg, EvalSets(cfg, cache_dir, data_root),
                       device, artifact_stem=artifact_stem, tokenizer=tokenizer)
    run = source.run or {}
    steps = source.steps if source.steps is not None else run.get("steps", 0)
    epochs = run.get("epochs") or 0.0
    if epochs and run.get("steps") and source.steps is not None:  # an earlier checkpoint of the run
        epochs = epochs * source.steps / run["steps"]
    conditions = pretrain_conditions(source)
    conditions_id, options = fingerprint(conditions), _method_options(source, method)  # the same for every record
    records = []
    for result in results:
        record = ResultRecord(
            method=name, protocol=result.protocol, dataset=result.dataset, pretrain_data=pretrain_data,
            preset=cfg.preset, seed=cfg.seed, metrics=result.metrics, method_options=options,
            protocol_options=dict(result.options, encoder_source=source.describe()),
            encoder=encoder_record_fields(source), epochs=float(epochs), steps=int(steps or 0),
            timings={"eval_s": result.seconds, "eval_world_size": info.world_size}, overrides=list(overrides),
            examples=result.examples,
            per_example=result.per_example, fingerprint=conditions_id, conditions=conditions)
        if info.is_main:
            write_record(record, results_dir)
            records.append(record)
        log(f"{result.protocol:8s} {result.dataset:10s} " + "  ".join(f"{k}={v:.2f}" for k, v in result.metrics.items())
            + f"  ({result.seconds:.1f}s)")
    return records


def pretrain_conditions(source: EncoderSource) -> dict:
    """The like-for-like conditions of the encoder's pre-training (`mugbench.fingerprint`), so its
    records sit in a table like the ones `mugbench run` wrote: those the run recorded, else computed
    from its study config (runs made before conditions were recorded: ``train.precision`` stays as
    configured, the world size unknown), else ``{}``: unknown, as for a timm encoder trained
    elsewhere, which the report then never marks. The evaluation's own preset and ``--set``
    overrides are not conditions of pre-training and do not enter. An earlier checkpoint of a run
    adds ``checkpoint.step`` of ``checkpoint.of`` steps: it has not had the run's whole budget.
    """
    run = source.run or {}
    conditions = run.get("conditions")
    if not isinstance(conditions, dict) or not conditions:
        try:
            conditions = like_for_like(from_dict(copy.deepcopy(run["config"]))) if run.get("config") else {}
        except ConfigError:  # a config from another mugbench version: its conditions are unknown here
            conditions = {}
    if conditions and source.steps is not None and run.get("steps") and source.steps != run["steps"]:
        conditions = dict(conditions, checkpoint={"step": int(source.steps), "of": int(run["steps"])})
    return conditions


def _method_options(source: EncoderSource, method) -> dict:
    """The method's options as `mugbench run` records them; what the run config says otherwise."""
    if method is not None:
        return dataclasses.asdict(method.options)
    options = ((source.run or {}).get("config") or {}).get("methods", {}).get(source.method or "", {})
    try:
        from .registry import get_method

        return dataclasses.asdict(get_method(source.method).parse_options(options))
    except Exception:  # a plugin not installed here must not stop the evaluation of its encoder
        return dict(options or {})


def _note_source(source: EncoderSource, log) -> None:
    """Say which weights were loaded, or that there are none."""
    if source.kind == "timm":
        what = (f"weights from {source.weights}" if source.weights else
                "random init: no weights were given (--weights FILE, or a pretrained tag such as ARCH.TAG)")
    else:
        what = f"{source.kind} weights" + (f" after {source.steps} steps" if source.steps is not None else "")
    log(f"encoder: {source.origin}: {what}")


def _note_normalisation(source: EncoderSource, log) -> None:
    """Say so when the encoder expects other normalisation than the harness's ImageNet mean/std."""
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

    if source.kind not in ("timm", "timm-folder") or (source.kind == "timm" and source.weights is None):
        return
    cfg = getattr(source.encoder, "pretrained_cfg", {}) or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    if any(abs(a - b) > 1e-3 for a, b in zip((*mean, *std), (*IMAGENET_MEAN, *IMAGENET_STD))):
        log(f"note: timm's config for {source.timm_name} normalises with mean={tuple(mean)}, std={tuple(std)}; "
            f"the harness feeds ImageNet-normalised images, which may cost this encoder some accuracy")
