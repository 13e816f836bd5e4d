"""Comparison tables built from result records alone: a pandas summary, Markdown and CSV.

The Markdown is written by hand (pandas' ``to_markdown`` needs ``tabulate``, which is
not a dependency) and follows the paper's layout: one table per study (pre-training
data + preset), methods as rows, protocol/dataset/metric as columns, mean ± std over
seeds, the best method per column in bold, and the published claims listed below,
labelled as such.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from mugbench.results import ResultRecord, atomic_write_text, load_records, load_references

ROW_KEYS = ["pretrain_data", "preset", "method"]
COLUMN_KEYS = ["protocol", "dataset", "metric"]
STATS = ["mean", "std", "n"]

# Display order: the paper's (single-modal, then multi-modal), then anything else by name.
_METHOD_ORDER = ("mae", "simclr", "clip", "slip", "flip", "coca", "cap", "mug")
_PROTOCOL_ORDER = (
    "knn", "linear", "finetune", "segmentation", "zeroshot", "retrieval", "captioning", "reconstruction",
)

# Metrics where smaller is better; matched as substrings of the metric name so that
# e.g. "recon_mse" or "val_loss" are ranked the right way round.
_LOWER_IS_BETTER = ("loss", "mse", "error", "perplexity", "ppl", "nll", "fid")
# Reference scores a protocol reports beside its metric (what a trivial predictor gets): context,
# not a result, so never ranked. Matched as prefixes of the metric name.
_BASELINES = ("background_", "flat_patch_")

_MISSING = "–"


def _order_key(order: Sequence[str]):
    def key(name: str) -> tuple[int, str]:
        return (order.index(name), "") if name in order else (len(order), name)

    return key


def _long_frame(records: Iterable[ResultRecord]) -> pd.DataFrame:
    rows = [
        {
            "pretrain_data": r.pretrain_data,
            "preset": r.preset,
            "method": r.method,
            "protocol": r.protocol,
            "dataset": r.dataset,
            "metric": metric,
            "seed": r.seed,
            "created": r.created,
            "value": float(value),
        }
        for r in records
        for metric, value in r.metrics.items()
    ]
    columns = ROW_KEYS + COLUMN_KEYS + ["seed", "created", "value"]
    long = pd.DataFrame(rows, columns=columns)
    # The same (study, method, protocol, dataset, seed) can appear twice only if files
    # were copied around; counting it twice would shrink the std and inflate n, so keep
    # the most recent one.
    long = long.sort_values("created", kind="stable")
    return long.drop_duplicates(ROW_KEYS + COLUMN_KEYS + ["seed"], keep="last")


def summary_frame(records: Iterable[ResultRecord]) -> pd.DataFrame:
    """Aggregate records over seeds.

    Index: (pretrain_data, preset, method). Columns: a 4-level MultiIndex
    (protocol, dataset, metric, stat) with stat in ``mean``, ``std`` (sample std,
    ddof=1; NaN for a single seed) and ``n`` (number of seeds). Every metric present in
    the records gets a column. Per-study details used by :func:`render_markdown`
    (record count, seeds, encoders, epochs) are kept in ``frame.attrs["studies"]``.
    """
    records = list(records)
    long = _long_frame(records)
    if long.empty:
        columns = pd.MultiIndex.from_tuples([], names=COLUMN_KEYS + ["stat"])
        index = pd.MultiIndex.from_tuples([], names=ROW_KEYS)
        frame = pd.DataFrame(index=index, columns=columns, dtype=float)
    else:
        agg = long.groupby(ROW_KEYS + COLUMN_KEYS)["value"].agg(mean="mean", std="std", n="count")
        frame = agg.unstack(COLUMN_KEYS)  # columns: (stat, protocol, dataset, metric)
        frame.columns = frame.columns.reorder_levels([1, 2, 3, 0]).set_names(COLUMN_KEYS + ["stat"])
        frame = frame[_sorted_columns(frame.columns)]
        frame = frame.reindex(sorted(frame.index, key=lambda ix: (ix[0], ix[1], _order_key(_METHOD_ORDER)(ix[2]))))
    frame.attrs["studies"] = _study_info(records)
    return frame


def _sorted_columns(columns: pd.MultiIndex) -> list[tuple]:
    proto_key = _order_key(_PROTOCOL_ORDER)
    return sorted(columns, key=lambda c: (proto_key(c[0]), c[1], c[2], STATS.index(c[3])))


def _study_info(records: list[ResultRecord]) -> dict[tuple[str, str], dict[str, Any]]:
    info: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        study = info.setdefault(
            (r.pretrain_data, r.preset), {"records": 0, "seeds": set(), "encoders": set(), "epochs": set()}
        )
        study["records"] += 1
        study["seeds"].add(r.seed)
        study["encoders"].add(_describe_encoder(r.encoder))
        study["epochs"].add(r.epochs)
    return {
        key: {
            "records": s["records"],
            "seeds": sorted(s["seeds"]),
            "encoders": sorted(e for e in s["encoders"] if e),
            "epochs": sorted(s["epochs"]),
        }
        for key, s in info.items()
    }


def _describe_encoder(encoder: dict[str, Any]) -> str:
    if not encoder:
        return ""
    arch = encoder.get("arch", "encoder")
    rest = ", ".join(f"{k}={v}" for k, v in sorted(encoder.items()) if k != "arch")
    return f"{arch} ({rest})" if rest else str(arch)


def _fmt(value: float) -> str:
    # One decimal suits percentages (the paper's unit); small-valued metrics such as an
    # MSE or a CIDEr below 1 would all print as "0.0", so they keep 3 significant digits.
    if value != 0 and abs(value) < 1:
        return f"{value:.3g}"
    return f"{value:.1f}"


def _cell(mean: float, std: float, n: float) -> str:
    if n is None or math.isnan(n) or n == 0:
        return _MISSING
    if n > 1:
        return f"{_fmt(mean)} ± {_fmt(std)} (n={int(n)})"
    return _fmt(mean)


def _lower_is_better(metric: str) -> bool:
    name = metric.lower()
    return any(token in name for token in _LOWER_IS_BETTER)


def _best_rows(means: pd.Series, metric: str) -> set:
    """Rows holding the best mean in a column, compared at the displayed precision.

    Comparing displayed values means two cells that *read* the same are both bold.
    A column with fewer than two values, or of a baseline score, has no winner to show.
    """
    present = means.dropna()
    if len(present) < 2 or metric.lower().startswith(_BASELINES):
        return set()
    shown = present.map(lambda v: float(_fmt(v)))
    best = shown.min() if _lower_is_better(metric) else shown.max()
    return set(shown.index[shown == best])


def _escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _study_table(frame: pd.DataFrame) -> list[str]:
    """Markdown lines for one study's rows (index: method)."""
    metric_columns = [c[:3] for c in frame.columns if c[3] == "mean"]
    header = ["method"] + [f"{p} · {d} · {m}" for p, d, m in metric_columns]
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    best = {col: _best_rows(frame[col + ("mean",)], col[2]) for col in metric_columns}
    for method in frame.index:
        cells = [_escape(method)]
        for col in metric_columns:
            text = _cell(*(frame.at[method, col + (stat,)] for stat in STATS))
            cells.append(f"**{text}**" if method in best[col] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _drop_empty_columns(frame: pd.DataFrame) -> pd.DataFrame:
    # Keep a metric's std column even when it is all NaN (single seed): drop a metric
    # only when no method in this study has a value for it.
    counts = frame.xs("n", axis=1, level="stat")
    keep = {col for col in counts.columns if counts[col].notna().any()}
    return frame[[c for c in frame.columns if c[:3] in keep]]


def _study_header(pretrain_data: str, preset: str, info: dict[str, Any], n_methods: int) -> list[str]:
    seeds = info.get("seeds", [])
    lines = [
        f"## Pre-training data `{pretrain_data}`, preset `{preset}`",
        "",
        f"{n_methods} method(s), {info.get('records', 0)} record(s), "
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds)) or 'none'}). "
        "Cells: mean ± sample std over seeds (n = seeds); best per column in **bold**.",
    ]
    encoders, epochs = info.get("encoders", []), info.get("epochs", [])
    if encoders:
        lines.append(f"Encoder: {'; '.join(encoders)}.")
    if epochs:
        lines.append(f"Pre-training epochs: {', '.join(f'{e:g}' for e in epochs)}.")
    # A like-for-like study has exactly one encoder and one budget; say so loudly if not.
    if len(encoders) > 1 or len(epochs) > 1:
        lines.append("**Warning: this study mixes encoders or epoch budgets; rows are not like-for-like.**")
    return lines


def _references_section(references: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["## Published reference claims (not produced by this run)", ""]
    if not references:
        return lines + ["No reference claims found."]
    for ref in references:
        label = ref.get("label", "reference")
        setting = f" Setting: {ref['setting']}." if ref.get("setting") else ""
        lines.append(f"- **[reference] {_escape(label)}** — {_escape(ref['claim'])}{setting} Source: {ref['source']}.")
    return lines


def render_markdown(
    frame: pd.DataFrame,
    references: Sequence[dict[str, Any]] = (),
    results_dir: str | os.PathLike | None = None,
) -> str:
    """Markdown report: one methods × protocols table per study, then the reference claims.

    ``frame`` is :func:`summary_frame` output. ``results_dir`` only names the source
    directory in the text (and in the message shown when there are no records).
    """
    source = f" under `{results_dir}`" if results_dir is not None else ""
    lines = ["# mugbench results", ""]
    if frame.empty:
        lines += [f"No result records found{source}.", ""]
    else:
        if source:
            lines += [f"Built from the result records{source}.", ""]
        studies = frame.attrs.get("studies", {})
        for (pretrain_data, preset), study in frame.groupby(level=["pretrain_data", "preset"], sort=False):
            study = _drop_empty_columns(study.droplevel(["pretrain_data", "preset"]))
            lines += _study_header(pretrain_data, preset, studies.get((pretrain_data, preset), {}), len(study))
            lines += [""] + _study_table(study) + [""]
    lines += _references_section(references)
    return "\n".join(lines) + "\n"


def tidy_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`summary_frame` in long form: one row per (study, method, protocol, dataset, metric)."""
    columns = ROW_KEYS + COLUMN_KEYS + STATS
    if frame.empty:
        return pd.DataFrame(columns=columns)
    tidy = frame.stack(COLUMN_KEYS, future_stack=True).dropna(subset=["n"]).reset_index()
    tidy["n"] = tidy["n"].astype(int)
    return tidy[columns]


def write_report(results_dir: str | os.PathLike, reports_dir: str | os.PathLike) -> str:
    """Rebuild ``reports/summary.md`` and ``reports/summary.csv`` from ``results_dir`` alone.

    Both files are replaced atomically. Returns the Markdown text. The CSV is the tidy
    (long) form of the summary, which is easier to load and plot than a wide table.
    """
    records = load_records(results_dir)
    references = load_references(results_dir)
    frame = summary_frame(records)
    markdown = render_markdown(frame, references, results_dir=results_dir)
    reports_dir = Path(reports_dir)
    atomic_write_text(reports_dir / "summary.md", markdown)
    atomic_write_text(reports_dir / "summary.csv", tidy_summary(frame).to_csv(index=False))
    return markdown
