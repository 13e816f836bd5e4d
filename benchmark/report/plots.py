"""The report's figures, drawn from result records alone (matplotlib, PNG and PDF).

Every figure stays readable in grayscale: paradigms differ by hatch, methods by marker and by
the lightness of their colour, and each bar carries its seeds as dots beside its error bar.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a window (CI, SSH sessions)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mugbench.report.frame import (  # noqa: E402
    BENCH_PROTOCOLS, METHOD_ORDER, ROW_GROUPS, order_key, paradigm_of,
)
from mugbench.report.tables import RANDOM, column_label, random_row  # noqa: E402
from mugbench.results import ResultRecord, record_figure  # noqa: E402

HATCHES = dict(zip(ROW_GROUPS, ("", "//", "..", "xx", "--", "oo")))  # the paradigms, other, baseline
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")
# Stripped so that regenerating a figure from the same records gives the same bytes.
_PNG_META = {"Software": None}
_PDF_META = {"Creator": None, "Producer": None, "CreationDate": None}


def method_styles(methods: Sequence[str]) -> dict[str, dict]:
    """A colour (spread in lightness, so grayscale keeps them apart) and a marker per method."""
    ordered = sorted(dict.fromkeys(methods), key=order_key(METHOD_ORDER))
    shades = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(len(ordered), 1)))
    return {m: {"color": shades[i], "marker": MARKERS[i % len(MARKERS)]} for i, m in enumerate(ordered)}


def save(fig, path_stem: Path) -> list[Path]:
    """Write ``path_stem``.png and .pdf and close the figure; returns both paths."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = path_stem.with_suffix(".png"), path_stem.with_suffix(".pdf")
    fig.savefig(png, dpi=120, bbox_inches="tight", metadata=_PNG_META)
    fig.savefig(pdf, bbox_inches="tight", metadata=_PDF_META)
    plt.close(fig)
    return [png, pdf]


def _grid(n: int, width: float = 3.2, height: float = 2.8, max_cols: int = 4):
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _seed_values(long: pd.DataFrame, row: str, column: tuple) -> pd.Series:
    """A row's values in a (protocol, dataset, metric) column, one per seed, from the long frame."""
    return long[(long["row"] == row) & (long["protocol"] == column[0]) & (long["dataset"] == column[1])
                & (long["metric"] == column[2])]["value"]


def bar_chart(table: pd.DataFrame, columns: list[tuple], long: pd.DataFrame, methods: dict[str, str],
              title: str, path_stem: Path) -> list[Path]:
    """One panel per main-table column: a bar per method (mean over seeds), ± std, seeds as dots."""
    if not columns:
        return []
    rows = [(paradigm, row) for paradigm, row in table.index]
    styles = method_styles([methods.get(r, r) for _, r in rows])
    fig, axes = _grid(len(columns))
    for ax, column in zip(axes, columns):
        for x, (paradigm, row) in enumerate(rows):
            mean, std = table.at[(paradigm, row), column + ("mean",)], table.at[(paradigm, row), column + ("std",)]
            if not np.isfinite(mean):
                ax.text(x, 0, "—", ha="center", va="bottom")
                continue
            style = styles[methods.get(row, row)]
            ax.bar(x, mean, color=style["color"], hatch=HATCHES.get(paradigm, ""), edgecolor="black", linewidth=0.6,
                   yerr=std if np.isfinite(std) else None, capsize=3)
            values = _seed_values(long, row, column)
            ax.plot([x + 0.28] * len(values), values, linestyle="none", marker=style["marker"], color="black",
                    markersize=3)
        ax.set_xticks(range(len(rows)), [r for _, r in rows], rotation=45, ha="right", fontsize=8)
        ax.set_title(column_label(column), fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch=HATCHES[p])
               for p in dict.fromkeys(p for p, _ in rows)]
    fig.legend(handles, list(dict.fromkeys(p for p, _ in rows)), loc="lower center", ncol=4, fontsize=8,
               bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path_stem)


def gain_chart(table: pd.DataFrame, columns: list[tuple], long: pd.DataFrame, methods: dict[str, str],
               title: str, path_stem: Path) -> list[Path]:
    """One panel per main-table column with a `random` value: each row's bar starts at its `random`
    row's mean (a dashed line: what the protocol gives an untrained encoder) and ends at the row's
    own mean, so its height is what pre-training added (± sample std over seeds, seeds as dots).
    Nothing when the table has no `random` row."""
    plain = table.droplevel("paradigm")
    rows = [(paradigm, row) for paradigm, row in table.index if random_row(row, methods, plain.index)]
    floors = {row: random_row(row, methods, plain.index) for _, row in rows}
    # A column needs one row with a bar: a value of its own and of its floor (a column only `random`
    # has, e.g. a protocol asked for the baseline alone, has none).
    columns = [c for c in columns if any(np.isfinite(plain.at[floors[row], c + ("mean",)])
                                         and np.isfinite(plain.at[row, c + ("mean",)]) for _, row in rows)]
    if not columns or not rows:
        return []
    styles = method_styles([methods.get(r, r) for _, r in rows])
    fig, axes = _grid(len(columns))
    for ax, column in zip(axes, columns):
        span = []  # every floor, mean ± std and seed drawn, to frame the panel around them
        for x, (paradigm, row) in enumerate(rows):
            floor, mean = plain.at[floors[row], column + ("mean",)], plain.at[row, column + ("mean",)]
            std = plain.at[row, column + ("std",)]
            if not (np.isfinite(floor) and np.isfinite(mean)):
                ax.text(x, 0.02, "—", ha="center", va="bottom", transform=ax.get_xaxis_transform())
                continue
            style = styles[methods.get(row, row)]
            ax.bar(x, mean - floor, bottom=floor, color=style["color"], hatch=HATCHES.get(paradigm, ""),
                   edgecolor="black", linewidth=0.6, yerr=std if np.isfinite(std) else None, capsize=3)
            ax.hlines(floor, x - 0.5, x + 0.5, colors="black", linestyles="--", linewidth=0.9)
            values = _seed_values(long, row, column)
            ax.plot([x + 0.28] * len(values), values, linestyle="none", marker=style["marker"], color="black",
                    markersize=3)
            span += [floor, mean + (std if np.isfinite(std) else 0), mean - (std if np.isfinite(std) else 0),
                     *values]
        low, high = min(span), max(span)
        pad = 0.15 * (high - low or abs(high) or 1.0)
        ax.set_ylim(low - pad, high + pad)  # the floor inside the panel, not on its edge
        ax.set_xticks(range(len(rows)), [r for _, r in rows], rotation=45, ha="right", fontsize=8)
        ax.set_title(column_label(column), fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch=HATCHES.get(p, ""))
               for p in dict.fromkeys(p for p, _ in rows)]
    handles.append(plt.Line2D([0], [0], color="black", linestyle="--", linewidth=0.9))
    fig.legend(handles, list(dict.fromkeys(p for p, _ in rows)) + [f"{RANDOM} (the floor)"], loc="lower center",
               ncol=4, fontsize=8, bbox_to_anchor=(0.5, -0.12))
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path_stem)


def loss_curves(records: Iterable[ResultRecord], title: str, path_stem: Path) -> list[Path]:
    """Pre-training loss against step, one panel per method (losses of different methods are on
    different scales); the mean over seeds with the range of the seeds shaded."""
    curves: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in records:
        if r.loss_curve.get("step"):
            curves[r.method][r.seed] = r.loss_curve
    if not curves:
        return []
    methods = sorted(curves, key=order_key(METHOD_ORDER))
    styles = method_styles(methods)
    fig, axes = _grid(len(methods), width=3.0, height=2.4)
    for ax, method in zip(axes, methods):
        seeds = curves[method]
        steps = sorted(set.intersection(*(set(c["step"]) for c in seeds.values())))
        stacked = np.array([[dict(zip(c["step"], c["loss"]))[s] for s in steps] for c in seeds.values()])
        style = styles[method]
        ax.plot(steps, stacked.mean(0), color=style["color"], marker=style["marker"], markevery=max(1, len(steps) // 8),
                markersize=4, label=f"mean of {len(seeds)} seed(s)")
        if len(seeds) > 1:
            ax.fill_between(steps, stacked.min(0), stacked.max(0), color=style["color"], alpha=0.25, linewidth=0)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path_stem)


def throughput_and_memory(records: Iterable[ResultRecord], title: str, path_stem: Path) -> list[Path]:
    """Pre-training images/s, peak memory and the data-loading share of the time per method (mean ±
    std over seeds) from the runs' timings; a panel is empty for records that predate its field."""
    per_run: dict[tuple[str, int], ResultRecord] = {}
    for r in records:
        if r.protocol not in BENCH_PROTOCOLS and "images_per_s" in r.timings:
            per_run.setdefault((r.method, r.seed), r)
    if not per_run:
        return []
    methods = sorted({m for m, _ in per_run}, key=order_key(METHOD_ORDER))
    styles = method_styles(methods)
    panels = [("images_per_s", "pre-training images/s"), ("peak_memory_mb", "peak memory (MB)"),
              ("data_share", "share of time waiting for data")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for ax, (key, label) in zip(axes, panels):
        for x, method in enumerate(methods):
            values = [r.timings[key] for (m, _), r in per_run.items() if m == method and key in r.timings]
            if not values:
                ax.text(x, 0, "—", ha="center", va="bottom")
                continue
            rec = next(r for (m, _), r in per_run.items() if m == method)
            ax.bar(x, np.mean(values), yerr=np.std(values, ddof=1) if len(values) > 1 else None, capsize=3,
                   color=styles[method]["color"], hatch=HATCHES.get(paradigm_of(rec), ""), edgecolor="black",
                   linewidth=0.6)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path_stem)


def bench_chart(records: Iterable[ResultRecord], title: str, path_stem: Path) -> list[Path]:
    """`mugbench bench` train-step records: each step's time as a multiple of the plain ViT step."""
    rows = [r for r in records if r.protocol == "train-step" and "time_ratio_to_plain_vit" in r.metrics]
    if not rows:
        return []
    rows.sort(key=lambda r: order_key(METHOD_ORDER)(r.method))
    fig, ax = plt.subplots(figsize=(6, 3))
    styles = method_styles([r.method for r in rows])
    for x, r in enumerate(rows):
        ax.bar(x, r.metrics["time_ratio_to_plain_vit"], color=styles[r.method]["color"], edgecolor="black",
               linewidth=0.6, hatch=HATCHES.get(paradigm_of(r), ""))
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r.method for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("step time / plain ViT step")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path_stem)


def linear_probe_grid(records: Iterable[ResultRecord], title: str, path_stem: Path) -> list[Path]:
    """Linear-probe top-1 against learning rate per method (mean ± std over seeds), log-x."""
    grids: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        grid = r.protocol_options.get("grid_top1") if r.protocol == "linear" else None
        if isinstance(grid, dict) and len(grid) > 1:
            for lr, top1 in grid.items():
                grids[(r.dataset, r.method)][float(lr)].append(float(top1))
    if not grids:
        return []
    datasets = sorted({d for d, _ in grids})
    styles = method_styles([m for _, m in grids])
    fig, axes = _grid(len(datasets), width=4.2, height=3.0)
    for ax, dataset in zip(axes, datasets):
        for (d, method), grid in sorted(grids.items(), key=lambda kv: order_key(METHOD_ORDER)(kv[0][1])):
            if d != dataset:
                continue
            lrs = sorted(grid)
            means = [np.mean(grid[lr]) for lr in lrs]
            stds = [np.std(grid[lr], ddof=1) if len(grid[lr]) > 1 else 0.0 for lr in lrs]
            ax.errorbar(lrs, means, yerr=stds, label=method, color=styles[method]["color"],
                        marker=styles[method]["marker"], capsize=2)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate", fontsize=8)
        ax.set_ylabel("top-1 (%)", fontsize=8)
        ax.set_title(f"linear probe on {dataset}", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path_stem)


def _grid_cells(png: np.ndarray, columns: int, rows: int = 3, padding: int = 2) -> list[list[np.ndarray]]:
    """Cut a torchvision ``save_image`` grid (``columns`` per row, ``padding`` px) into its cells."""
    size = (png.shape[1] - padding) // columns - padding
    return [[png[padding + r * (size + padding): padding + r * (size + padding) + size,
                 padding + c * (size + padding): padding + c * (size + padding) + size] for c in range(columns)]
            for r in range(rows)]


def examples_figure(records: Sequence[ResultRecord], results_dir: Path, title: str, path_stem: Path,
                    images: int = 4) -> list[Path]:
    """Like the paper's Fig. 4: the same validation images, masked and reconstructed by each
    reconstructing method, with the captions each captioning method generated for them.

    Uses the lowest seed that has a reconstruction figure; images are matched across records by
    key (by position for records that predate keys in the figure's record).
    """
    recon = [r for r in records if r.protocol == "reconstruction" and r.protocol_options.get("figure")]
    if not recon:
        return []
    seed = min(r.seed for r in recon)
    recon = sorted((r for r in recon if r.seed == seed), key=lambda r: order_key(METHOD_ORDER)(r.method))
    captions = sorted((r for r in records if r.protocol == "captioning" and r.seed == seed and r.examples),
                      key=lambda r: order_key(METHOD_ORDER)(r.method))
    grids = []
    for r in recon:
        try:
            path = record_figure(results_dir, r)
        except ValueError:  # leads outside results/: never read (the report lists it)
            continue
        if path is not None and path.is_file():
            png = plt.imread(path)
            keys = [e.get("key") for e in r.examples] or None
            columns = len(keys) if keys else round((png.shape[1] - 2) / (png.shape[0] - 2) * 3)
            grids.append((r.method, _grid_cells(png, columns), keys))
    if not grids:
        return []
    first_method, first_cells, first_keys = grids[0]
    n = min(images, len(first_cells[0]))
    keys = first_keys[:n] if first_keys else [None] * n
    image_rows = [("original", first_cells[0]), (f"masked ({first_method})", first_cells[1])]
    image_rows += [(f"{method} reconstruction", _by_key(cells[2], ks, keys)) for method, cells, ks in grids]
    text_rows = []
    if captions:
        text_rows.append(("reference", _captions(captions[0], keys, "reference")))
        text_rows += [(f"{r.method} caption", _captions(r, keys, "generated")) for r in captions]
    fig = plt.figure(figsize=(2.4 * n + 1.4, 1.9 * len(image_rows) + 0.9 * len(text_rows)))
    heights = [2.0] * len(image_rows) + [1.0] * len(text_rows)
    spec = fig.add_gridspec(len(heights), n, height_ratios=heights, hspace=0.15, wspace=0.05, top=0.93)
    for i, (label, cells) in enumerate(image_rows):
        for j in range(n):
            ax = fig.add_subplot(spec[i, j])
            ax.axis("off")
            if j < len(cells) and cells[j] is not None:
                ax.imshow(cells[j], interpolation="nearest")
            if j == 0:
                ax.text(-0.08, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=8)
    for i, (label, texts) in enumerate(text_rows, start=len(image_rows)):
        for j in range(n):
            ax = fig.add_subplot(spec[i, j])
            ax.axis("off")
            ax.text(0.5, 0.95, textwrap.fill(texts[j] or "—", 30), ha="center", va="top", fontsize=7,
                    transform=ax.transAxes, style="italic" if label == "reference" else "normal")
            if j == 0:
                ax.text(-0.08, 0.8, label, transform=ax.transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{title} (seed {seed})")
    return save(fig, path_stem)


def _by_key(cells: list, cell_keys: list | None, keys: list) -> list:
    if not cell_keys or None in keys:
        return cells[:len(keys)]
    index = {k: i for i, k in enumerate(cell_keys)}
    return [cells[index[k]] if k in index else None for k in keys]


def _captions(record: ResultRecord, keys: list, field: str) -> list[str]:
    by_key = {e.get("key"): e.get(field, "") for e in record.examples}
    if None in keys:
        return [e.get(field, "") for e in record.examples[:len(keys)]]
    return [by_key.get(k, "") for k in keys]
