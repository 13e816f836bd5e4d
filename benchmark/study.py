"""One study end to end: data -> per method (build, pre-train, evaluate) -> result records.

Wiring only: the pre-training data comes from `data.pretrain`, methods and their run folders from
`runs`, training from `train.loop`, evaluation and its resume bookkeeping from `eval.harness`.
Methods, protocols and evaluation sets never import this module.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

import torch

from .config import ConfigError, StudyConfig
from .data.pretrain import PretrainData, build_tokenizer, not_applicable, pretrain_batches, resolve_data, text_spec
from .data.transforms import augmentation_record
from .eval.harness import EvalProgress, EvalResult, evaluate
from .eval.sharding import broadcast_object
from .evalset import EvalSets
from .fingerprint import fingerprint, like_for_like
from .preflight import check_stream_split, check_study
from .registry import get_method
from .results import ResultRecord, record_location, write_record
from .runs import build_method, run_dir_for, set_aside
from .sources import write_run_info
from .study_plan import PRETRAIN, StudyPlan
from .train.checkpoint import export_encoder, load_newest_checkpoint
from .train.distributed import DistInfo, init_distributed, once_per_cache
from .train.loop import TrainSummary, train
from .train.run_lock import run_lock
from .trackers import Tracker, check_report_to


def run_study(cfg: StudyConfig, methods: list[str], *, workdir: Path, results_dir: Path, cache_dir: Path,
              data_root: Path | None = None, overrides: list[str] = (), fresh: bool = False,
              report_to: tuple[str, ...] = (), plan: StudyPlan | None = None, log=print) -> list[ResultRecord]:
    """Pre-train and evaluate each method like-for-like; write and return the result records. With
    ``fresh`` each run starts over: its old folder's contents are moved aside (`runs.set_aside`), never
    deleted, and its records are rewritten. ``report_to`` names experiment trackers (`trackers.Tracker`)
    each run also writes to. Each phase's log line states its place in ``plan`` and the time left (a
    `StudyPlan` of several seeds; default: this seed's methods)."""
    check_study(cfg, methods, data_root)
    check_report_to(report_to)
    plan = plan or StudyPlan(cfg, methods, [cfg.seed])
    info: DistInfo = init_distributed(cfg.train.device, cfg.train.dist_timeout_min)
    if not info.is_main:
        log = lambda *args, **kwargs: None  # noqa: E731  (one voice per job)

    def prepare() -> tuple[PretrainData, object]:
        data = resolve_data(cfg, data_root, cache_dir, log=log)
        return data, build_tokenizer(cfg, data)

    # The embedded data, shard counts and vocabulary are made by one rank per cache folder (per node for
    # node-local caches); the others then find them cached.
    data, tokenizer = once_per_cache(cache_dir, prepare, info)
    check_stream_split(cfg, info.world_size, len(data.urls))  # also: the batch splits over ranks x accum_steps
    steps_per_epoch = data.samples // cfg.train.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"{data.samples} samples make no full batch of {cfg.train.batch_size}")
    eval_sets, records = EvalSets(cfg, cache_dir, data_root), []
    for name in _applicable(methods, data, log, plan):
        method = build_method(name, cfg, text_spec(cfg, tokenizer, data))
        run_dir = run_dir_for(workdir, cfg, name)
        # One run per folder at a time, held through training and evaluation (a second identical
        # command stops here instead of training into the same checkpoints and log).
        with _claim(run_dir, info, fresh, name, log), _tracker(report_to, run_dir, name, cfg, info) as tracker:
            if type(method).pretrains:
                batches = pretrain_batches(cfg, data, type(method), tokenizer, rank=info.rank,
                                           world_size=info.world_size, steps_per_epoch=steps_per_epoch,
                                           pin_memory=cfg.data.pin_memory and info.device.type == "cuda")
                place = plan.begin(cfg.seed, name, PRETRAIN)
                log(f"[{place}] {name} on {data.name} ({data.samples} samples, {cfg.train.epochs} epochs) "
                    f"in {run_dir}; {plan.outlook()}")
                summary = train(method, batches, cfg.train, steps_per_epoch=steps_per_epoch, workdir=run_dir,
                                info=info, seed=cfg.seed, desc=name, max_bad_fraction=cfg.data.max_bad_fraction,
                                on_log=tracker.log_train)
                plan.end(timed=summary.resumed_from < summary.steps)  # a finished checkpoint's load is no estimate
            else:
                log(f"[{name}] not pre-trained: its encoder is evaluated as initialised, in {run_dir}")
                summary = _untrained(method, run_dir, info)
            # Every rank evaluates (each protocol shards its work over them); rank 0 writes the records.
            records += _finish(name, method, summary, cfg, data, tokenizer, eval_sets, run_dir, info,
                               results_dir=results_dir, overrides=overrides, log=log, plan=plan, tracker=tracker)
    return records


@contextlib.contextmanager
def _claim(run_dir: Path, info: DistInfo, fresh: bool, name: str, log) -> Iterator[None]:
    """Hold the run folder's lock; with ``fresh`` (`--fresh`), rank 0 first moves the old run's files
    aside, before anything (a tracker's event file) is opened in the folder, and every rank waits for it."""
    with run_lock(run_dir, info):
        if fresh:
            if info.is_main:
                aside = set_aside(run_dir)
                if aside is not None:
                    log(f"[{name}] --fresh: the previous run's files were moved to {aside}; starting over")
            if info.world_size > 1:
                torch.distributed.barrier()
        yield


def _applicable(methods: list[str], data: PretrainData, log, plan: StudyPlan) -> list[str]:
    """The methods that can pre-train on ``data``; each other one is skipped with one log line and no record
    (a baseline that needs class labels on a set without them is not applicable, not an error), and leaves
    the ``plan``."""
    kept = []
    for name in methods:
        reason = not_applicable(get_method(name), data)
        if reason:
            log(f"[{name}] not applicable: {reason}")
            plan.leave_out(name)
        else:
            kept.append(name)
    return kept


def _tracker(report_to: tuple[str, ...], run_dir: Path, name: str, cfg: StudyConfig, info: DistInfo) -> Tracker:
    """The run's experiment trackers, on rank 0 (the others get one that does nothing)."""
    return Tracker(report_to if info.is_main else (), run_dir, run_name=run_dir.name,
                   config=dict(cfg.to_dict(), method=name))


def _untrained(method, run_dir: Path, info: DistInfo) -> TrainSummary:
    """The summary of a method that declares ``pretrains=False``: no step, no epoch, no time, no loss. Its
    encoder moves to the device the protocols evaluate on, as `train` would have moved it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    method.to(info.device)
    return TrainSummary(steps=0, epochs=0.0, seconds=0.0, images_per_s=0.0, final_loss=float("nan"))


def _finish(name: str, method, summary: TrainSummary, cfg: StudyConfig, data: PretrainData, tokenizer,
            eval_sets: EvalSets, run_dir: Path, info: DistInfo, *, results_dir: Path, overrides, log,
            plan: StudyPlan, tracker: Tracker) -> list:
    """After training, on every rank: rank 0 exports the encoder and describes the run; all ranks evaluate
    (sharded); rank 0 writes the records (and the headline metrics to the ``tracker``) and returns them. Each
    evaluation gets a line with its place in the ``plan``."""
    if cfg.train.strategy == "fsdp" and info.world_size > 1 and type(method).pretrains:
        # Sharded weights are evaluated whole: every rank rebuilds the method from the final checkpoint
        # (written at the last step, always, in the shared run folder), once rank 0 has written it. An
        # untrained method was never sharded.
        torch.distributed.barrier()
        method = build_method(name, cfg, text_spec(cfg, tokenizer, data))
        method.load_state_dict(load_newest_checkpoint(run_dir)[0]["model"])
        method.to(info.device)
    # The like-for-like conditions every record of this run carries (and `mugbench eval` reads back).
    conditions = like_for_like(cfg, device=info.device)
    progress, done = None, frozenset()
    if info.is_main:
        export_encoder(run_dir / "encoder.safetensors", method.encoder, cfg.encoder)
        write_run_info(run_dir, name, cfg, summary=summary, tokenizer=tokenizer, conditions=conditions)  # checkpoint.pt's description
        if summary.steps:
            log(f"[{name}] {summary.steps} steps, {summary.images_per_s:.0f} img/s, final loss {summary.final_loss:.4f}")
        progress = EvalProgress(run_dir / "eval" / "progress.json", cfg, overrides, results_dir=results_dir)
        done = progress.done
    done = broadcast_object(done)  # what rank 0 has recorded is skipped by every rank
    for protocol, dataset in sorted(done):
        log(f"[{name}] {protocol} on {dataset}: recorded before the interruption, not run again")
        plan.mark_done(cfg.seed, name, protocol, dataset)
    records = progress.records() if progress is not None else []
    # The views actually applied and where view 0 came from, in every record of the method.
    augmentation = dict(augmentation_record(type(method), cfg.data.augment), require_caption=cfg.data.require_caption)
    shared = dict(method=name, pretrain_data=data.name, preset=cfg.preset, seed=cfg.seed,
                  method_options=dataclasses.asdict(method.options), encoder=dataclasses.asdict(cfg.encoder),
                  epochs=summary.epochs, steps=summary.steps, loss_curve=summary.loss_curve,
                  paradigm=type(method).paradigm, skipped_samples=summary.skipped, repaired_samples=summary.repaired,
                  overrides=list(overrides), augmentation=augmentation, fingerprint=fingerprint(conditions),
                  conditions=conditions)

    def write_result(result: EvalResult) -> None:
        if info.is_main:
            timings = {"pretrain_s": summary.seconds, "images_per_s": summary.images_per_s,
                       "eval_s": result.seconds, "eval_world_size": info.world_size,
                       "peak_memory_mb": summary.peak_memory_mb, "data_share": summary.data_share}
            record = ResultRecord(protocol=result.protocol, dataset=result.dataset, metrics=result.metrics,
                                  protocol_options=result.options, timings=timings, examples=result.examples,
                                  per_example=result.per_example, **shared)
            progress.mark(record, write_record(record, results_dir))  # a rerun skips it now
            records.append(record)
            log(f"[{name}] {result.protocol} on {result.dataset}: "
                + ", ".join(f"{k}={v:.2f}" for k, v in result.metrics.items()))
            tracker.log_eval(result.protocol, result.dataset, result.metrics, step=summary.steps)
        plan.end()

    def announce(protocol: str, dataset: str) -> None:
        place = plan.begin(cfg.seed, name, protocol, dataset)
        log(f"[{place}] {protocol} on {dataset}; {plan.outlook()}")

    def artifact_stem(protocol: str, dataset: str) -> Path:
        return record_location(results_dir, data.name, cfg.preset, name, protocol, dataset, cfg.seed).with_suffix("")

    evaluate(method, cfg, eval_sets, info.device, workdir=run_dir / "eval", artifact_stem=artifact_stem,
             tokenizer=tokenizer, done=done, on_result=write_result, on_start=announce)
    return records
