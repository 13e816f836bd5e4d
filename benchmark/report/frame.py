"""Result records as pandas frames: selection, grouping and aggregation over seeds.

Everything here reads records only (`mugbench.results.load_records`); the registry is asked
what a record may not say itself: the paradigm of a method whose records predate the
``paradigm`` field (``baseline`` for the reference rows `random` and `supervised`, shown as a
group of their own after the paradigms and never ranked), whether a protocol applies to a method
at all (so that a missing zero-shot cell of MAE reads "not applicable" rather than "missing"), and
how a protocol is shown (its display position, label, headline metrics and whether it counts as
transfer). A protocol not registered here (a plugin not installed, the bench records'
``train-step``) is shown by name, after the registered ones, with every metric as headline, and
never ranked as transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pandas as pd

from mugbench.method import BASELINE, METHOD_PARADIGMS, PARADIGMS
from mugbench.results import ResultRecord

# Benchmark records (`mugbench bench`) measure speed, not representations: plotted, never ranked.
BENCH_PROTOCOLS = ("train-step", "input-pipeline")

# Display order: the paper's (single-modal, then multi-modal), then anything else by name.
METHOD_ORDER = ("simclr", "mae", "clip", "slip", "flip", "coca", "cap", "mug")
OTHER_PARADIGM = "other"
# Row groups of a table, in display order: the paper's paradigms, any other method, then the baselines
# (reference rows, set apart below the methods they frame).
ROW_GROUPS = tuple(p for p in PARADIGMS if p != BASELINE) + (OTHER_PARADIGM, BASELINE)
# Metrics where smaller is better, matched as substrings ("recon_mse", "val_loss").
LOWER_IS_BETTER = ("loss", "mse", "error", "perplexity", "ppl", "nll", "fid")
# Scores a protocol reports beside its metric (what a trivial predictor gets): context, never
# ranked. Matched as prefixes of the metric name.
BASELINE_PREFIXES = ("background_", "flat_patch_")

GROUPINGS = ("method", "seed", "preset")
ALL_PRESETS = "all presets"
STATS = ("mean", "std", "n")
ROW_LEVELS = ["pretrain_data", "preset", "paradigm", "row"]
COLUMN_LEVELS = ["protocol", "dataset", "metric"]


def order_key(order: Sequence[str]):
    """Sort key placing names of ``order`` first, in that order, then the rest by name."""
    def key(name: str) -> tuple[int, str]:
        return (order.index(name), "") if name in order else (len(order), str(name))

    return key


def _protocol_class(protocol: str):
    """The class registered as ``protocol``, or None for a name not registered here."""
    from mugbench.registry import registered_protocols

    return registered_protocols().get(protocol)


def protocol_order_key(protocol: str) -> tuple[int, int, str]:
    """Sort key for protocols: registered ones by `Protocol.order` (the paper's transfer protocols,
    then its multi-modal ones), then any other name alphabetically."""
    cls = _protocol_class(protocol)
    return (0, cls.order, protocol) if cls is not None else (1, 0, str(protocol))


def headline_metrics(protocol: str) -> tuple[str, ...]:
    """The metrics a main table shows for ``protocol`` (`Protocol.headline`); empty, meaning every
    non-baseline metric, for a protocol that declares none or is not registered here."""
    cls = _protocol_class(protocol)
    return tuple(cls.headline) if cls is not None else ()


def protocol_label(protocol: str) -> str:
    """The column title of ``protocol`` (`Protocol.display_label`), else its name."""
    cls = _protocol_class(protocol)
    return cls.display_label() if cls is not None else str(protocol)


def is_transfer(protocol: str) -> bool:
    """Whether ``protocol`` measures the encoder's representation (`Protocol.transfer`), so the report
    ranks methods on it; False for a protocol not registered here."""
    cls = _protocol_class(protocol)
    return cls is not None and bool(cls.transfer)


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is the better one."""
    return any(token in metric.lower() for token in LOWER_IS_BETTER)


def is_baseline(metric: str) -> bool:
    """Whether ``metric`` is a trivial predictor's score shown for context."""
    return metric.lower().startswith(BASELINE_PREFIXES)


def transfer_columns(columns: Iterable[tuple]) -> list[tuple]:
    """The columns a ranking covers: transfer protocols' metrics, never a trivial predictor's score."""
    return [c for c in columns if is_transfer(c[0]) and not is_baseline(c[2])]


@dataclass(frozen=True)
class Selection:
    """Which records a report covers; an empty field selects everything.

    ``studies`` are preset names (the study file), ``data`` pre-training sets.
    """

    studies: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()

    def keeps(self, record: ResultRecord) -> bool:
        """Whether ``record`` is inside the selection."""
        return all(not allowed or value in allowed for allowed, value in (
            (self.studies, record.preset), (self.data, record.pretrain_data),
            (self.protocols, record.protocol), (self.methods, record.method)))

    def keeps_study(self, study: tuple[str, str]) -> bool:
        """Whether a (pretrain_data, preset) study is inside the selection."""
        return (not self.data or study[0] in self.data) and (not self.studies or study[1] in self.studies)

    def describe(self) -> str:
        """The selection as the command-line flags that make it ('' for everything)."""
        parts = [f"--{flag} {','.join(values)}" for flag, values in (
            ("study", self.studies), ("data", self.data), ("protocols", self.protocols),
            ("methods", self.methods)) if values]
        return " ".join(parts)


def paradigm_of(record: ResultRecord) -> str:
    """The record's paradigm (one of `PARADIGMS` or ``baseline``), else the installed method's, else ``other``."""
    if record.paradigm in METHOD_PARADIGMS:
        return record.paradigm
    from mugbench.registry import registered_methods

    cls = registered_methods().get(record.method)
    return cls.paradigm if cls is not None and cls.paradigm in METHOD_PARADIGMS else OTHER_PARADIGM


def is_baseline_row(paradigm: str) -> bool:
    """Whether a row of this paradigm is a reference row (``random``, ``supervised``): shown, never
    bold, ranked or counted in a margin."""
    return paradigm == BASELINE


def protocol_applies(method: str, protocol: str) -> bool | None:
    """Whether ``protocol`` can evaluate ``method``; ``None`` when the method is not installed here."""
    from mugbench.registry import registered_methods, registered_protocols

    cls = registered_methods().get(method)
    if cls is None:
        return None
    protocol_cls = registered_protocols().get(protocol)
    return True if protocol_cls is None else protocol_cls.applies_to(cls)


def _row_label(record: ResultRecord, by: str) -> str:
    if by == "seed":
        return f"{record.method} · seed {record.seed}"
    if by == "preset":
        return f"{record.method} · {record.preset}"
    return record.method


def _outcomes(record: ResultRecord, metric: str) -> dict | None:
    """The record's packed per-example outcomes of ``metric``, None when it kept none."""
    kept = record.per_example if isinstance(record.per_example, dict) else {}
    return kept.get(metric) if isinstance(kept.get(metric), dict) else None


def long_frame(records: Iterable[ResultRecord], by: str = "method") -> pd.DataFrame:
    """One row per (record, metric) with the table and row each lands in under grouping ``by``, the
    record's per-example outcomes of that metric (``outcomes``: `pack_outcomes`' dict, or None) and its
    ``git_commit``.

    A (study, method, protocol, dataset, seed) seen twice (files copied around) counts once,
    the most recent: counting it twice would shrink the std and inflate n.
    """
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}: use one of {', '.join(GROUPINGS)}")
    rows = [
        {"pretrain_data": r.pretrain_data, "preset": ALL_PRESETS if by == "preset" else r.preset,
         "record_preset": r.preset, "paradigm": paradigm_of(r), "row": _row_label(r, by), "method": r.method,
         "protocol": r.protocol, "dataset": r.dataset, "metric": metric, "seed": r.seed, "created": r.created,
         "value": float(value), "outcomes": _outcomes(r, metric), "git_commit": r.git_commit}
        for r in records if r.protocol not in BENCH_PROTOCOLS
        for metric, value in r.metrics.items()
    ]
    columns = ["pretrain_data", "preset", "record_preset", "paradigm", "row", "method", *COLUMN_LEVELS,
               "seed", "created", "value", "outcomes", "git_commit"]
    long = pd.DataFrame(rows, columns=columns).sort_values("created", kind="stable")
    identity = ["pretrain_data", "record_preset", "method", *COLUMN_LEVELS, "seed"]
    return long.drop_duplicates(identity, keep="last").reset_index(drop=True)


def summary_frame(records: Iterable[ResultRecord], by: str = "method",
                  long: pd.DataFrame | None = None) -> pd.DataFrame:
    """Aggregate records over seeds (``long``: their `long_frame` under ``by``, when already built).

    Index: (pretrain_data, preset, paradigm, row), where ``row`` is the method (``by="method"``),
    ``method · seed S`` (``"seed"``: no aggregation) or ``method · preset`` (``"preset"``: one
    table per pre-training set, ``preset`` = ``all presets``). Columns: (protocol, dataset,
    metric, stat) with stat ``mean``, ``std`` (sample std, ddof=1; NaN for one seed) and ``n``
    (seeds). ``frame.attrs``: ``studies`` (records, seeds, encoders, epochs per table) and
    ``methods`` (row -> method).
    """
    if long is None:
        long = long_frame(records, by)
    methods = dict(zip(long["row"], long["method"]))
    if long.empty:
        frame = pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=ROW_LEVELS),
                             columns=pd.MultiIndex.from_tuples([], names=COLUMN_LEVELS + ["stat"]), dtype=float)
    else:
        agg = long.groupby(ROW_LEVELS + COLUMN_LEVELS)["value"].agg(mean="mean", std="std", n="count")
        frame = agg.unstack(COLUMN_LEVELS)
        frame.columns = frame.columns.reorder_levels([1, 2, 3, 0]).set_names(COLUMN_LEVELS + ["stat"])
        frame = frame[sorted(frame.columns, key=lambda c: (protocol_order_key(c[0]), c[1], c[2], STATS.index(c[3])))]
        seeds = dict(zip(long["row"], long["seed"]))
        paradigm_key, method_key = order_key(ROW_GROUPS), order_key(METHOD_ORDER)
        frame = frame.reindex(sorted(frame.index, key=lambda ix: (
            ix[0], ix[1], paradigm_key(ix[2]), method_key(methods[ix[3]]), seeds[ix[3]], ix[3])))
    frame.attrs["methods"] = methods
    frame.attrs["studies"] = _study_info(long)
    frame.attrs["by"] = by
    return frame


def _study_info(long: pd.DataFrame) -> dict[tuple[str, str], dict[str, Any]]:
    info = {}
    for (data, preset), part in long.groupby(["pretrain_data", "preset"], sort=True):
        info[(data, preset)] = {"seeds": sorted(int(s) for s in part["seed"].unique()),
                                "presets": sorted(part["record_preset"].unique())}
    return info


def study_details(records: Iterable[ResultRecord]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (pretrain_data, preset): record count, encoders, epoch budgets, commits and commands."""
    details: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r.protocol in BENCH_PROTOCOLS:
            continue
        d = details.setdefault((r.pretrain_data, r.preset), {"records": 0, "encoders": set(), "epochs": set(),
                                                              "commits": set(), "commands": set()})
        d["records"] += 1
        d["encoders"].add(describe_encoder(r.encoder))
        d["epochs"].add(r.epochs)
        d["commits"].add(r.git_commit or "unknown")
        d["commands"].add(r.command or "(not recorded)")
    return {key: {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()} for key, d in details.items()}


def describe_encoder(encoder: dict[str, Any]) -> str:
    """``timm_name (k=v, ...)`` for an encoder config recorded in a result."""
    if not encoder:
        return ""
    arch = encoder.get("timm_name", encoder.get("arch", "encoder"))
    rest = ", ".join(f"{k}={v}" for k, v in sorted(encoder.items()) if k not in ("arch", "timm_name"))
    return f"{arch} ({rest})" if rest else str(arch)


def headline_columns(columns: Iterable[tuple]) -> list[tuple[str, str, str]]:
    """The (protocol, dataset, metric) columns of a main table: the protocol's headline metrics,
    or every non-baseline metric of a protocol without declared ones."""
    seen = list(dict.fromkeys(c[:3] for c in columns))
    keep = []
    for protocol, dataset, metric in seen:
        wanted = headline_metrics(protocol)
        if (metric in wanted) if wanted else not is_baseline(metric):
            keep.append((protocol, dataset, metric))
    return keep


def ranked(means: pd.Series, metric: str) -> list:
    """Row labels with a value, best first (never for a baseline score)."""
    present = means.dropna()
    if is_baseline(metric):
        return []
    return list(present.sort_values(ascending=lower_is_better(metric), kind="stable").index)


def finite(value: Any) -> bool:
    """A real, finite number (pandas gives NaN for an absent cell)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))
