"""Result records: one self-describing JSON file per (study, method, protocol, dataset, seed).

A record carries everything needed to rebuild the report from ``results/`` alone: the
method and its options, the study (pre-training data + preset), the encoder, the
evaluation protocol, metrics, timings, skipped-sample counts and provenance (package
versions, git commit, host, time). Records are written atomically so that concurrent
runs never corrupt or lose each other's results, and reading is forgiving so that one
bad file never takes the report down.

Published numbers from papers are *not* records: they live under
``results/references/`` and are loaded separately by :func:`load_references`, so they
can never be mistaken for something this benchmark measured.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write_text

SCHEMA_VERSION = 1

# Sub-folder of the results dir holding published claims; never read as records.
REFERENCES_DIR = "references"
SHIPPED_REFERENCES = Path(__file__).parent / "references"

# Distributions whose versions make a result reproducible; keys are the short names
# used in the record, values the installed distribution names.
_VERSIONED_DISTRIBUTIONS = {
    "torch": "torch",
    "timm": "timm",
    "open_clip": "open_clip_torch",
}

# A record without these cannot be placed in a table, so loading one is an error.
_REQUIRED_KEYS = ("method", "protocol", "dataset", "pretrain_data", "preset", "seed", "metrics")


class MalformedRecordWarning(UserWarning):
    """Emitted when a file under the results dir cannot be read as a record or reference."""


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class ResultRecord:
    """One evaluation result of one pre-trained encoder on one dataset with one seed.

    Provenance fields (``versions``, ``git_commit``, ``created``, ``run_id``, ``host``, ``command``)
    are filled automatically when a record is constructed in a run; :meth:`from_dict`
    never invents them for a file that lacks them.
    """

    method: str
    protocol: str
    dataset: str
    pretrain_data: str
    preset: str
    seed: int
    metrics: dict[str, float]
    method_options: dict[str, Any] = field(default_factory=dict)
    protocol_options: dict[str, Any] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=dict)
    epochs: float = 0.0
    steps: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    skipped_samples: dict[str, int] = field(default_factory=dict)
    repaired_samples: dict[str, int] = field(default_factory=dict)  # images converted to RGB, kept
    # Like-for-like conditions of pre-training (mugbench.fingerprint) and their short hash; empty when
    # unknown (records written before them, encoders mugbench did not train). The report compares them.
    fingerprint: str = ""
    conditions: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)  # e.g. generated captions beside references
    # Per evaluation example, for paired statistics between methods on the same examples: metric ->
    # `pack_outcomes` of a boolean per example in the set's order (e.g. "top1": each val image right or not).
    per_example: dict[str, dict[str, Any]] = field(default_factory=dict)
    loss_curve: dict[str, list[float]] = field(default_factory=dict)  # pre-training {"step": [...], "loss": [...]}
    paradigm: str = ""  # the method's family (mugbench.method.PARADIGMS), so a report can group rows
    # Pre-training views as applied: the study's base view (or the method's declared override and its
    # reason), the extra views, the policy, the caption filter (mugbench.data.transforms.augmentation_record).
    augmentation: dict[str, Any] = field(default_factory=dict)
    command: str = field(default_factory=lambda: current_command())
    versions: dict[str, str | None] = field(default_factory=lambda: collect_versions())
    git_commit: str | None = field(default_factory=lambda: git_commit())
    created: str = field(default_factory=_now_iso)
    run_id: str = field(default_factory=_new_run_id)
    host: str = field(default_factory=socket.gethostname)
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (deep copy) of this record."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResultRecord":
        """Build a record from :meth:`to_dict` output, validating what the report relies on.

        Raises ``ValueError`` for a missing required key, a wrong type, or a schema newer
        than this code understands. Unknown keys are ignored so that additive changes
        within a schema version stay readable.
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        schema = data.get("schema", SCHEMA_VERSION)
        if not _is_int(schema) or schema > SCHEMA_VERSION:
            raise ValueError(f"unsupported record schema {schema!r} (this mugbench reads <= {SCHEMA_VERSION})")
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise ValueError(f"missing required field(s): {', '.join(missing)}")
        for key in ("method", "protocol", "dataset", "pretrain_data", "preset"):
            if not isinstance(data[key], str) or not data[key]:
                raise ValueError(f"field {key!r} must be a non-empty string")
        if not _is_int(data["seed"]):
            raise ValueError(f"field 'seed' must be an integer, got {data['seed']!r}")
        metrics = data["metrics"]
        if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and _is_number(v) for k, v in metrics.items()
        ):
            raise ValueError("field 'metrics' must map names to numbers")
        # Python's json reads NaN/Infinity; such a value is a failed run, never a result to average or rank.
        bad = [f"{k}={v!r}" for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"metric(s) {', '.join(bad)} not finite")

        # The report compares these across rows; records written before them have none (the defaults).
        for key, kind in (("fingerprint", str), ("conditions", dict), ("augmentation", dict)):
            if key in data and not isinstance(data[key], kind):
                raise ValueError(f"field {key!r} must be a {kind.__name__}, got {data[key]!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        # Absent provenance stays absent: filling it from *this* process would be a lie.
        kwargs.setdefault("versions", {})
        kwargs.setdefault("git_commit", None)
        kwargs.setdefault("created", "")
        kwargs.setdefault("run_id", "")
        kwargs.setdefault("host", "")
        kwargs.setdefault("command", "")
        kwargs["metrics"] = {k: float(v) for k, v in metrics.items()}
        return cls(**kwargs)


def _is_int(value: Any) -> bool:
    # bool is an int subclass; a seed of True is a bug, not a seed.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def collect_versions() -> dict[str, str | None]:
    """Versions of Python and the packages that shape results; ``None`` for one not installed.

    Reads installed distribution metadata instead of importing the packages, so it is
    cheap even in a process that never imported torch.
    """
    from mugbench import __version__  # local import: mugbench/__init__ must stay import-light

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in _VERSIONED_DISTRIBUTIONS.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = None
    versions["mugbench"] = __version__
    return versions


@functools.lru_cache(maxsize=8)
def _git_commit_cached(path: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def current_command() -> str:
    """This process's command line as a shell could rerun it: ``mugbench ...`` for the console script
    and for ``python -m mugbench.cli``."""
    argv = list(sys.argv) or [""]
    program = Path(argv[0])
    if program.name == "mugbench" or (program.name == "cli.py" and program.resolve().parent == Path(__file__).parent):
        argv[0] = "mugbench"
    return shlex.join(argv)


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """Commit hash of the git checkout containing ``path`` (default: mugbench's source dir).

    Best effort and never raises: ``None`` outside a checkout, without git, or on timeout.
    Cached per path because the code a process runs is the code it loaded at start, so a
    commit made mid-sweep must not relabel later records of the same process.
    """
    if path is None:
        path = Path(__file__).resolve().parent
    path = Path(path)
    if not path.is_dir():
        path = path.parent
    return _git_commit_cached(str(path))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_name(name: str) -> str:
    """A filesystem-safe, collision-free path component for ``name``.

    Names that are already safe are kept verbatim (readable paths for the common case);
    others are cleaned and suffixed with a short hash of the original so that e.g.
    ``a/b`` and ``a_b`` (or two long shard URL patterns) never share a file.
    """
    cleaned = _UNSAFE.sub("_", name).strip("._")[:60]
    if cleaned == name:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned}-{digest}" if cleaned else digest


def record_path(results_dir: str | os.PathLike, record: ResultRecord) -> Path:
    """Where ``record`` lives: ``<results_dir>/<pretrain_data>/<preset>/<method>/<protocol>-<dataset>-seed<seed>.json``."""
    return record_location(results_dir, record.pretrain_data, record.preset, record.method, record.protocol,
                           record.dataset, record.seed)


def record_location(results_dir: str | os.PathLike, pretrain_data: str, preset: str, method: str, protocol: str,
                    dataset: str, seed: int) -> Path:
    """`record_path` from the identifying fields alone (figures are saved beside their record)."""
    filename = f"{_safe_name(protocol)}-{_safe_name(dataset)}-seed{int(seed)}.json"
    return Path(results_dir) / _safe_name(pretrain_data) / _safe_name(preset) / _safe_name(method) / filename


def record_figure(results_dir: str | os.PathLike, record: ResultRecord) -> Path | None:
    """The file named by ``record.protocol_options["figure"]`` (relative to the record's folder), or
    None when the record names none.

    Raises ``ValueError`` when the name is not a string or leads outside ``results_dir`` (``..``,
    an absolute path, a symbolic link): a record is data from whoever wrote the file, and the
    report must never read, draw or copy a file elsewhere on the machine because one says so.
    """
    figure = record.protocol_options.get("figure")
    if figure is None or figure == "":
        return None
    where = f"figure path {figure!r} of {record.method}/{record.protocol}/{record.dataset} seed {record.seed}"
    if not isinstance(figure, str):
        raise ValueError(f"{where} is not a string: ignored")
    root = Path(results_dir).resolve()
    folder = record_location(results_dir, record.pretrain_data, record.preset, record.method, record.protocol,
                             record.dataset, record.seed).parent
    path = (folder / figure).resolve()  # follows links and "..", so what is checked is what would be read
    if not path.is_relative_to(root):
        raise ValueError(f"{where} leads outside the results folder {root}: ignored, never read")
    return path


def write_record(record: ResultRecord, results_dir: str | os.PathLike) -> Path:
    """Atomically write ``record`` to :func:`record_path` and return that path.

    Non-finite numbers are rejected (``ValueError``) because they are not valid JSON and
    would make the file unreadable to strict JSON tools; a non-finite metric is named, since it
    means the evaluation itself failed.
    """
    bad = [f"{k!r} of {record.method}/{record.protocol}/{record.dataset} seed {record.seed} is {v}"
           for k, v in record.metrics.items() if _is_number(v) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"not writing a result with a non-finite metric: metric {'; metric '.join(bad)} "
                         f"(the evaluation diverged or divided by zero upstream)")
    text = json.dumps(record.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(record_path(results_dir, record), text)


def _record_files(results_dir: Path) -> list[Path]:
    files = []
    for p in results_dir.rglob("*.json"):
        rel = p.relative_to(results_dir)
        if rel.parts[0] == REFERENCES_DIR or any(part.startswith(".") for part in rel.parts):
            continue
        files.append(p)
    return sorted(files)


def load_records(results_dir: str | os.PathLike) -> list[ResultRecord]:
    """Every record under ``results_dir`` (excluding ``references/``), in path order.

    A file that is not valid JSON or not a valid record is skipped with a
    :class:`MalformedRecordWarning` naming it; a missing directory yields ``[]``.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    records = []
    for path in _record_files(results_dir):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            records.append(ResultRecord.from_dict(data))
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
            warnings.warn(f"skipping malformed result record {path}: {exc}", MalformedRecordWarning, stacklevel=2)
    return records


def load_references(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Published claims, each marked ``reference: True``: the ones shipped with mugbench
    (``mugbench/references/*.json``) plus any under ``<results_dir>/references/`` (a file of the
    same name there replaces the shipped one).

    A file holds ``{"references": [...]}`` (or a bare list) of dicts with at least
    ``claim`` and ``source``. Malformed files or entries are skipped with a warning.
    """
    files = {p.name: p for p in sorted(SHIPPED_REFERENCES.glob("*.json"))}
    ref_dir = Path(results_dir) / REFERENCES_DIR
    if ref_dir.is_dir():
        files.update({p.name: p for p in sorted(ref_dir.glob("*.json"))})
    references = []
    for path in files.values():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            warnings.warn(f"skipping malformed reference file {path}: {exc}", MalformedRecordWarning, stacklevel=2)
            continue
        entries = data.get("references") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            warnings.warn(f"skipping reference file {path}: no 'references' list", MalformedRecordWarning, stacklevel=2)
            continue
        for i, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("claim"), str) and isinstance(entry.get("source"), str)):
                warnings.warn(
                    f"skipping reference #{i} in {path}: needs string 'claim' and 'source'",
                    MalformedRecordWarning,
                    stacklevel=2,
                )
                continue
            value = entry.get("value")
            if value is not None and not (_is_number(value) and math.isfinite(value)):
                warnings.warn(f"skipping reference #{i} in {path}: bad 'value'", MalformedRecordWarning, stacklevel=2)
                continue
            # Always labelled, whatever the file says: these were not produced by a run.
            references.append({**entry, "reference": True, "file": path.name})
    return references


def pack_outcomes(outcomes) -> dict[str, Any]:
    """A boolean per evaluation example, kept compactly in a record: ``{"n": count, "bits": base64}``
    (numpy's ``packbits``, big-endian bit order; 1,000 examples take 168 characters)."""
    flags = np.asarray(outcomes, dtype=bool).ravel()
    return {"n": int(flags.size), "bits": base64.b64encode(np.packbits(flags).tobytes()).decode("ascii")}


def unpack_outcomes(packed: dict[str, Any]) -> np.ndarray:
    """The booleans `pack_outcomes` kept, as a numpy array of ``packed["n"]`` values; `ValueError` for a
    malformed entry (a hand-edited or truncated record)."""
    try:
        n, raw = int(packed["n"]), base64.b64decode(packed["bits"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed per-example outcomes {str(packed)[:80]!r}: {exc}") from None
    if n < 0 or len(raw) != (n + 7) // 8:
        raise ValueError(f"per-example outcomes say n={n} but hold {len(raw)} bytes")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n).astype(bool)
