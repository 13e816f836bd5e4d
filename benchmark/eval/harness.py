"""The uniform evaluation harness: every configured protocol on every set of its kind, one encoder or
method at a time, with the bookkeeping that lets an interrupted run go on where it stopped.

Protocols and sets are registered plugins (`mugbench.protocol`, `mugbench.evalset`); nothing here
names one. Protocols that read frozen features share one extraction pass per set.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError, StudyConfig
from ..data.catalog import DataNotFoundError
from ..evalset import EvalSets
from ..method import Method
from ..protocol import EvalContext, Features, Protocol
from ..registry import UnknownNameError, get_eval_set, get_protocol
from ..files import atomic_write_text
from ..results import ResultRecord, pack_outcomes, record_path
from .features import extract_features

# The order protocols run in: one feature pass serves every feature protocol of a set first.
_READ_ORDER = ("features", "encoder", "method")


@dataclass
class EvalResult:
    """One protocol's outcome on one set, with the seconds it took (a feature protocol's share of the
    extraction pass included)."""

    protocol: str
    dataset: str
    metrics: dict[str, float]
    options: dict[str, Any]
    seconds: float
    examples: list = field(default_factory=list)
    per_example: dict = field(default_factory=dict)  # metric -> `pack_outcomes` form, as records keep it


def check_evaluation(cfg: StudyConfig, methods: list[type] = (), world_size: int = 1) -> None:
    """Refuse, before any training, unknown protocols and sets, any method that a configured protocol
    would apply to but could not evaluate (`Protocol.method_problems`), and protocol options that cannot
    run over ``world_size`` ranks (`Protocol.world_problems`)."""
    for kind, names, lookup in (("protocol", cfg.eval.protocols, get_protocol),
                                ("evaluation set", cfg.eval.datasets, get_eval_set)):
        for name in names:
            try:
                lookup(name)
            except UnknownNameError as exc:
                raise ConfigError(f"{exc} (in the study's eval.{'protocols' if kind == 'protocol' else 'datasets'})") \
                    from None
    for name in cfg.eval.protocols:
        problems = get_protocol(name).world_problems(cfg.eval.options_for(name), world_size)
        if problems:
            raise ConfigError(f"The {name!r} protocol of this study cannot run on {world_size} process(es): "
                              f"{'; '.join(problems)}")
    for method in methods:
        for name in cfg.eval.protocols:
            problems = get_protocol(name).method_problems(method)
            if problems:
                raise ConfigError(f"Method {method.name!r} cannot be evaluated by the {name!r} protocol of this study: "
                                  f"{'; '.join(problems)}. Fix the method, or leave {name} out with --evals.")


def locate_eval_sets(cfg: StudyConfig, data_root: Path | None) -> None:
    """Check that every evaluation set read from the data root is there (a few stats), so a missing one
    fails now, not after hours of training: `DataNotFoundError` with the first missing set's own message
    (where it looked, how to get it) and the names of the others, so one attempt reports every set to fetch."""
    missing = []
    for name in cfg.eval.datasets:
        try:
            get_eval_set(name).locate(data_root)
        except DataNotFoundError as exc:
            missing.append((name, str(exc)))
    if missing:
        others = [name for name, _ in missing[1:]]
        also = f" The evaluation sets {', '.join(others)} of this study are missing too." if others else ""
        raise DataNotFoundError(missing[0][1] + also)


def evaluate(subject: torch.nn.Module, cfg: StudyConfig, eval_sets: EvalSets, device, *,
             workdir: Path | None = None, artifact_stem: Callable[[str, str], Path] | None = None,
             tokenizer=None, done: frozenset = frozenset(),
             on_result: Callable[[EvalResult], None] | None = None,
             on_start: Callable[[str, str], None] | None = None) -> list[EvalResult]:
    """Run every configured protocol on every configured set of its kind.

    ``subject`` is a `Method` (every protocol that applies to it) or a bare encoder (protocols that read
    features or the encoder only). Encoder protocols keep their checkpoints and logs under
    ``workdir/<protocol>-<set>`` (a temporary folder when None); ``artifact_stem(protocol, set)`` places
    figures (default: in the work folder). ``on_start(protocol, set)`` is called as each evaluation
    begins (its feature extraction included), each result is handed to ``on_result`` as soon as it exists;
    ``(protocol, set)`` pairs in ``done`` are skipped.

    In a torchrun job every rank calls it with the same arguments and every rank works in every protocol
    (each shards its part over the ranks, `mugbench.eval.sharding`); every rank gets every result, through
    ``on_result`` and in the returned list, and only rank 0 should write them.
    """
    method = subject if isinstance(subject, Method) else None
    encoder = subject.encoder if method is not None else subject
    out: list[EvalResult] = []
    features: tuple[str, Features] | None = None  # (set, its features): one set at a time
    with _workdir(workdir) as workdir:
        for protocol, dataset in _plan(cfg, method, done):
            if on_start is not None:
                on_start(protocol.name, dataset)
            data = eval_sets.get(dataset)
            extra = 0.0
            if protocol.reads == "features" and (features is None or features[0] != dataset):
                # One extraction pass per set, timed into the first protocol that reads it; the plan is
                # set-major, so the previous set's features are dropped here, never needed again.
                t0 = time.perf_counter()
                features = (dataset, _features(encoder, data, cfg, device))
                extra = time.perf_counter() - t0
            read = {"features": features[1] if features else None, "encoder": encoder, "method": method}
            t0 = time.perf_counter()
            stem = artifact_stem(protocol.name, dataset) if artifact_stem else None
            result = _run(protocol, read[protocol.reads], data, cfg, device, workdir / f"{protocol.name}-{dataset}", stem,
                          tokenizer)
            options = dict(result.options, pool=cfg.eval.pool) if protocol.reads == "features" else result.options
            item = EvalResult(protocol.name, dataset, result.metrics, options,
                              time.perf_counter() - t0 + extra, list(result.examples),
                              {metric: pack_outcomes(flags) for metric, flags in result.per_example.items()})
            out.append(item)
            if on_result is not None:
                on_result(item)
    return out


def run_protocol(name: str, subject, data, cfg: StudyConfig, *, device="cpu", tokenizer=None,
                 workdir: Path | None = None, artifact: Path | None = None):
    """One protocol on one loaded set, outside a study (tests, notebooks): its `ProtocolResult`.

    ``subject`` as the protocol reads it (`Features`, an encoder or a `Method`); options, seed, read-out
    and batch come from ``cfg``; ``workdir`` (checkpoints of encoder protocols) defaults to a temporary
    folder, ``artifact`` (figure stem) to one inside it."""
    with _workdir(workdir) as workdir:
        return _run(get_protocol(name), subject, data, cfg, device, workdir, artifact, tokenizer)


def _run(protocol: type[Protocol], subject, data, cfg: StudyConfig, device, workdir: Path, artifact: Path | None,
         tokenizer):
    """``protocol`` on ``subject`` and ``data`` with the study's options, seed, read-out and batch."""
    ctx = EvalContext(seed=cfg.seed, device=torch.device(device), workdir=workdir,
                      artifact=artifact or workdir / "figure", pool=cfg.eval.pool, batch_size=cfg.eval.batch_size,
                      tokenizer=tokenizer)
    return protocol().run(subject, data, cfg.eval.options_for(protocol.name), ctx)


@contextlib.contextmanager
def _workdir(workdir: Path | None):
    """``workdir`` as a path, or a temporary folder removed afterwards when it is None."""
    if workdir is not None:
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="mugbench-eval-") as tmp:
        yield Path(tmp)


def skipped_protocols(cfg: StudyConfig, subject: torch.nn.Module) -> list[str]:
    """Configured protocols that read the method, when ``subject`` is a bare encoder: they are skipped."""
    if isinstance(subject, Method):
        return []
    return [p for p in cfg.eval.protocols if get_protocol(p).reads == "method"]


def planned(cfg: StudyConfig, method: Method | type[Method] | None) -> list[tuple[str, str]]:
    """``(protocol, set)`` names `evaluate` runs on ``method`` (a `Method` or its class; None: a bare
    encoder), in its order, before any is done: what a study's plan counts."""
    return [(protocol.name, dataset) for protocol, dataset in _plan(cfg, method, frozenset())]


def _plan(cfg: StudyConfig, method: Method | type[Method] | None,
          done: frozenset) -> list[tuple[type[Protocol], str]]:
    """``(protocol, set)`` pairs to run, in the harness's order: feature protocols set by set (each set's
    features extracted once), then encoder protocols, then method protocols, each in the study's order."""
    protocols = [get_protocol(p) for p in cfg.eval.protocols]
    kinds = {d: get_eval_set(d).kind for d in cfg.eval.datasets}
    plan = []
    for reads in _READ_ORDER:
        pairs = [(p, d) for p in protocols for d in cfg.eval.datasets if p.reads == reads]
        if reads == "features":  # set-major: the features of one set are used, then dropped
            pairs = [(p, d) for d in cfg.eval.datasets for p in protocols if p.reads == reads]
        for protocol, dataset in pairs:
            if kinds[dataset] != protocol.set_kind or (protocol.name, dataset) in done:
                continue
            if reads == "method" and (method is None or not protocol.applies_to(method)):
                continue
            plan.append((protocol, dataset))
    return plan


def _features(encoder: torch.nn.Module, data, cfg: StudyConfig, device) -> Features:
    """Frozen features of the set's train and val images (sharded over the ranks of a torchrun job)."""
    def extract(images, split: str):
        return extract_features(encoder, images, pool=cfg.eval.pool, batch_size=cfg.eval.batch_size, device=device,
                                desc=f"features of {data.name} {split}")

    return Features(extract(data.train.image, "train"), extract(data.val.image, "val"))


class EvalProgress:
    """Which evaluations of a run already have their record, so a rerun after a kill goes on from
    the protocol it reached instead of starting the evaluation over.

    Kept in ``run_dir/eval/progress.json`` and tied to the evaluation settings: a rerun with other
    ``eval.*`` settings or overrides evaluates everything again. An evaluation counts as done only
    where its record lies in ``results_dir``, the folder this run writes to: a rerun with another
    ``--results`` evaluates again and fills that folder too.
    """

    def __init__(self, path: Path, cfg: StudyConfig, overrides=(), *, results_dir: Path):
        self.path, self.results_dir = path, Path(results_dir)
        self.key = hashlib.sha1(json.dumps([cfg.to_dict()["eval"], list(overrides)], sort_keys=True,
                                           default=str).encode()).hexdigest()[:12]
        saved = json.loads(path.read_text()) if path.exists() else {}
        entries = {}
        if saved.get("key") == self.key:  # {record file: run id}
            entries = saved.get("records") or {}
        self._entries: dict[str, str] = {}  # the records of this run still on disk, in any results folder
        self._done: dict[tuple[str, str], ResultRecord] = {}  # those in results_dir, by (protocol, dataset)
        for record_file, run_id in entries.items():
            try:
                record = ResultRecord.from_dict(json.loads(Path(record_file).read_text()))
            except (OSError, ValueError):
                continue
            if record.run_id == run_id:  # still this run's, not overwritten by another
                self._entries[str(Path(record_file).resolve())] = run_id
                if Path(record_file).resolve() == record_path(self.results_dir, record).resolve():
                    self._done[(record.protocol, record.dataset)] = record

    @property
    def done(self) -> frozenset:
        """``(protocol, dataset)`` pairs whose records exist in the results folder."""
        return frozenset(self._done)

    def records(self) -> list[ResultRecord]:
        """The records of the evaluations already done."""
        return list(self._done.values())

    def mark(self, record: ResultRecord, record_file: Path) -> None:
        """Note one more evaluation as recorded, in ``record_file``."""
        self._done[(record.protocol, record.dataset)] = record
        self._entries[str(Path(record_file).resolve())] = record.run_id  # absolute: the cwd may differ next time
        atomic_write_text(self.path, json.dumps({"key": self.key, "records": dict(sorted(self._entries.items()))},
                                                indent=1))
