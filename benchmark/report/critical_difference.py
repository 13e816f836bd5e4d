"""The critical-difference view of a study: all ranked methods over all transfer columns at once.

Demšar (JMLR 2006) compares many methods on many benchmarks with the Friedman test over their
ranks and Nemenyi's post-hoc test, drawn as a critical-difference (CD) diagram: two methods whose
mean ranks differ by less than the CD are not told apart. autorank (Herbold, JOSS 2020) runs both
and draws the diagram; this module only builds its input from the report's long frame and words
its outcome.

A block (one row of autorank's input) is one transfer column on one seed: within it every method
saw the same evaluation set, and the same seed's initialisation and sample stream. Blocks of one
column on other seeds are not independent benchmarks, so the test counts more agreement than a
study of independent benchmarks would show: the report says so, and the per-column tests
(`mugbench.report.resolution`) stay the evidence for any single column.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mugbench.report.frame import is_baseline_row, lower_is_better, transfer_columns

# autorank refuses fewer paired measurements than this ("requires at least five performance estimations").
MIN_BLOCKS = 5
MIN_METHODS = 3  # with two, Friedman's test is a sign test and there is no diagram to draw


@dataclass
class CriticalDifference:
    """The outcome of the Friedman and Nemenyi tests over one study's blocks (column x seed)."""

    blocks: int
    columns: int
    seeds: int
    mean_ranks: dict[str, float]  # 1 = best, best first
    cd: float
    friedman_p: float
    alpha: float
    left_out: list[str] = field(default_factory=list)  # methods without every transfer column
    result: Any = None  # autorank's RankResult, for the diagram

    def resolved_pairs(self) -> list[tuple[str, str]]:
        """(better, worse) pairs whose mean ranks differ by more than the CD, best-ranked first."""
        names = list(self.mean_ranks)
        if not self.friedman_p < self.alpha:  # Nemenyi's test runs only after a significant Friedman test
            return []
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                if self.mean_ranks[b] - self.mean_ranks[a] > self.cd]

    def lines(self, figure: str = "") -> list[str]:
        """The report's paragraph: the test, its blocks, the mean ranks and what the CD resolves."""
        ranks = ", ".join(f"{m} {r:.2f}" for m, r in self.mean_ranks.items())
        pairs = self.resolved_pairs()
        if not self.friedman_p < self.alpha:
            verdict = (f"the Friedman test does not reject equal ranks (p = {self.friedman_p:.3g} ≥ α = "
                       f"{self.alpha:g}), so no pair of methods is told apart")
        elif pairs:
            verdict = ("pairs further apart than the CD (told apart): "
                       + "; ".join(f"{a} ahead of {b}" for a, b in pairs))
        else:
            verdict = "no two mean ranks differ by more than the CD, so no pair of methods is told apart"
        left = (f" Not in it (a transfer column missing): {', '.join(self.left_out)}." if self.left_out else "")
        see = f" ({figure})" if figure else ""
        return [f"Critical difference{see}: the Friedman test over {self.blocks} blocks ({self.columns} transfer "
                f"columns × up to {self.seeds} seeds; a block is one column on one seed, where every method shares "
                f"the evaluation set and the seed) gives p = {self.friedman_p:.3g}; Nemenyi's CD at α = "
                f"{self.alpha:g} is {self.cd:.2f} ranks. Mean ranks (1 = best): {ranks}. {verdict[0].upper()}"
                f"{verdict[1:]}. The seeds of a column are not independent benchmarks, so this summary counts "
                f"more agreement than it has; the per-column tests are the evidence for each column "
                f"(Demšar, JMLR 2006; computed by autorank).{left}"]


def performance_matrix(long: pd.DataFrame, columns: Sequence[tuple]) -> tuple[pd.DataFrame, list[str]]:
    """autorank's input from one study's long frame: a row per block (transfer column, seed), a
    column per ranked (non-baseline) method, higher = better (lower-is-better metrics negated).
    Methods without every transfer column are left out (returned by name), then blocks any remaining
    method lacks (a seed it did not run) are dropped: the test needs complete blocks."""
    wanted = set(transfer_columns(columns))
    keyed = long[~long["paradigm"].map(is_baseline_row)].copy()
    keyed["column"] = list(zip(keyed["protocol"], keyed["dataset"], keyed["metric"]))
    keyed = keyed[keyed["column"].isin(wanted)]
    if keyed.empty:
        return pd.DataFrame(), []
    keyed["score"] = [-v if lower_is_better(c[2]) else v for v, c in zip(keyed["value"], keyed["column"])]
    matrix = keyed.pivot_table(index=["column", "seed"], columns="row", values="score", aggfunc="mean")
    covered = keyed.groupby("row")["column"].nunique()
    left_out = sorted(r for r in matrix.columns if covered.get(r, 0) < len(wanted))
    matrix = matrix.drop(columns=left_out).dropna()
    matrix.columns.name = None
    return matrix, left_out


def critical_difference(long: pd.DataFrame, columns: Sequence[tuple], alpha: float) -> CriticalDifference | str:
    """Friedman + Nemenyi over one study (autorank, nonparametric mode forced: ranks are what a
    leaderboard compares, and a handful of blocks cannot show normality); a sentence saying why
    not where the study has too few blocks or methods."""
    matrix, left_out = performance_matrix(long, columns)
    if matrix.shape[1] < MIN_METHODS:
        return (f"No critical-difference diagram: it needs at least {MIN_METHODS} methods with every transfer "
                f"column, this study has {matrix.shape[1]}.")
    if matrix.shape[0] < MIN_BLOCKS:
        return (f"No critical-difference diagram: the Friedman test needs at least {MIN_BLOCKS} complete blocks "
                f"(a transfer column on one seed, every method present), this study has {matrix.shape[0]}; "
                "more seeds give more.")
    from autorank import autorank  # imports statsmodels: only when a report has something to test

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on forced modes and small samples: the report words its limits
        result = autorank(matrix.reset_index(drop=True), alpha=alpha, verbose=False,
                          force_mode="nonparametric", order="descending")
    if not math.isfinite(result.pvalue):
        return "No critical-difference diagram: every method ranks the same in every block."
    ranks = result.rankdf["meanrank"].sort_values(kind="stable")
    return CriticalDifference(
        blocks=matrix.shape[0], columns=matrix.index.get_level_values("column").nunique(),
        seeds=matrix.index.get_level_values("seed").nunique(), mean_ranks={str(k): float(v) for k, v in ranks.items()},
        cd=float(result.cd), friedman_p=float(result.pvalue), alpha=alpha, left_out=left_out, result=result)


def cd_diagram(cd: CriticalDifference, title: str, path_stem: Path) -> list[Path]:
    """Draw autorank's CD diagram (mean ranks on an axis, bars joining methods within the CD)."""
    from autorank import plot_stats

    from mugbench.report.plots import save

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = plot_stats(cd.result, allow_insignificant=True)
    ax.set_title(title, fontsize=10)
    return save(ax.figure, path_stem)


__all__ = ["CriticalDifference", "MIN_BLOCKS", "MIN_METHODS", "cd_diagram", "critical_difference",
           "performance_matrix"]
