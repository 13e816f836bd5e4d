"""Statistical resolution: which rows of a column the records cannot tell apart from its best.

Two tests, each used where the records allow it:

- over seeds: Welch's unequal-variances t-test (B. L. Welch, "The generalization of Student's
  problem when several different population variances are involved", Biometrika 1947;
  `scipy.stats.ttest_ind` with ``equal_var=False``) of the two rows' per-seed values, when both
  rows have at least two seeds;
- over evaluation examples: where every record of both rows kept per-example outcomes of the
  metric (`mugbench.results.pack_outcomes`) on the same number of examples, a paired bootstrap
  (B. Efron, "Bootstrap methods: another look at the jackknife", Annals of Statistics 1979;
  `scipy.stats.bootstrap`) of the difference of the two rows' per-example means, each row's
  outcomes first averaged over its seeds: example indices are resampled, and the 95 % percentile
  interval of the mean difference is read.

A difference is resolved only when every test that applies rejects "no difference" at `ALPHA`
(a two-sided p-value below it; an interval that excludes zero). Where no test applies (one seed
each and no per-example outcomes) the comparison is *unresolved*: the report marks it as such
rather than rank the rows as if they differed. Baseline rows (`random`, `supervised`) are never the
best and never compared with it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from mugbench.report.frame import finite, is_baseline, is_baseline_row, ranked
from mugbench.results import unpack_outcomes

ALPHA = 0.05  # the conventional 5 % level: a difference is resolved when every applicable test rejects at it
RESAMPLES = 9999  # bootstrap resamples (scipy's default): the 2.5 % tails rest on ~250 resamples each
BOOTSTRAP_SEED = 0  # fixed, so a rebuild from the same records gives the same bytes
WELCH = "welch"
BOOTSTRAP = "bootstrap"

BEST, RESOLVED, TIED, UNRESOLVED = "best", "resolved", "tied", "unresolved"
TIED_MARK = "≈"  # after a cell the tests cannot tell apart from its column's best
UNRESOLVED_MARK = "?"  # after a cell no test could compare with its column's best


@dataclass(frozen=True)
class Sample:
    """One row's results in one column: a value per seed and, when every record kept them, the
    per-example outcomes (seeds × examples) of the metric."""

    values: np.ndarray
    outcomes: np.ndarray | None = None

    @property
    def mean(self) -> float:
        """The mean over seeds, as the table shows it."""
        return float(np.mean(self.values))


def sample_of(values: Sequence[float], packed: Sequence[dict | None]) -> Sample:
    """A `Sample` from per-seed values and their packed outcomes; outcomes only when every seed has
    them, well formed and of one length (else the bootstrap does not apply to this row)."""
    outcomes = None
    if packed and all(isinstance(p, dict) for p in packed):
        try:
            unpacked = [unpack_outcomes(p) for p in packed]
        except ValueError:
            unpacked = []
        if unpacked and len({u.size for u in unpacked}) == 1 and unpacked[0].size > 0:
            outcomes = np.stack(unpacked).astype(float)
    return Sample(np.asarray(values, dtype=float), outcomes)


def welch_p(a: Sample, b: Sample) -> float | None:
    """Two-sided p-value of Welch's t-test between two rows' per-seed values; None unless both have
    at least two seeds. Seeds that agree exactly (no spread in either row) give 0 when the means
    differ and 1 when they do not: the t statistic is infinite or undefined there."""
    if a.values.size < 2 or b.values.size < 2:
        return None
    if np.ptp(a.values) == 0 and np.ptp(b.values) == 0:
        return 0.0 if a.mean != b.mean else 1.0
    with warnings.catch_warnings():  # near-identical seeds: scipy warns of precision loss, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        p = stats.ttest_ind(a.values, b.values, equal_var=False).pvalue
    return float(p) if np.isfinite(p) else 1.0


def bootstrap_interval(a: Sample, b: Sample, confidence: float = 1 - ALPHA, resamples: int = RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile interval of the mean over examples of (row a's outcome − row b's), each row's
    outcomes averaged over its seeds, from a bootstrap over example indices (paired: one index
    draws both rows' outcomes of that example); None unless both rows kept outcomes of one length."""
    if a.outcomes is None or b.outcomes is None or a.outcomes.shape[1] != b.outcomes.shape[1]:
        return None
    diff = a.outcomes.mean(axis=0) - b.outcomes.mean(axis=0)
    if np.ptp(diff) == 0:  # every resample gives the same mean: the interval is that value
        return float(diff[0]), float(diff[0])
    result = stats.bootstrap((diff,), np.mean, n_resamples=resamples, confidence_level=confidence,
                             method="percentile", vectorized=True, batch=1000, rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


@dataclass(frozen=True)
class Comparison:
    """What the tests that applied say about the difference between two rows of a column."""

    tests: tuple[str, ...]  # WELCH and/or BOOTSTRAP: the tests that applied
    resolved: bool  # every test that applied rejected at ALPHA (False when none applied)
    detail: str = ""  # "Welch p = 0.064; bootstrap 95 % interval [-0.01, 0.03]"

    @property
    def status(self) -> str:
        """`RESOLVED`, `TIED` (tests applied, not all rejected) or `UNRESOLVED` (no test applied)."""
        if not self.tests:
            return UNRESOLVED
        return RESOLVED if self.resolved else TIED


def compare(a: Sample, b: Sample, alpha: float = ALPHA) -> Comparison:
    """Compare two rows of one column with every test their records allow (see the module's docstring)."""
    tests, rejected, detail = [], [], []
    p = welch_p(a, b)
    if p is not None:
        tests.append(WELCH)
        rejected.append(p < alpha)
        detail.append(f"Welch p = {p:.2g}")
    interval = bootstrap_interval(a, b, confidence=1 - alpha)
    if interval is not None:
        tests.append(BOOTSTRAP)
        rejected.append(interval[0] > 0 or interval[1] < 0)
        detail.append(f"bootstrap {100 * (1 - alpha):g} % interval [{interval[0]:.3g}, {interval[1]:.3g}]")
    return Comparison(tuple(tests), bool(tests) and all(rejected), "; ".join(detail))


@dataclass
class ColumnResolution:
    """One column: its best row (by mean, baselines excluded) and every other ranked row's comparison with it."""

    best: str | None = None
    versus_best: dict[str, Comparison] = field(default_factory=dict)


@dataclass
class TableResolution:
    """The statistical resolution of one table: per (protocol, dataset, metric) column, each row's
    `Sample`, the column's best and every other non-baseline row's `Comparison` with it."""

    samples: dict[tuple, dict[str, Sample]]
    baselines: frozenset[str]
    columns: dict[tuple, ColumnResolution]
    alpha: float = ALPHA
    # comparisons other than with a column's best, by (column, a, b): the notes of summary.md and
    # README.md ask for the same pairs, and a bootstrap over a large evaluation set is worth running once
    _compared: dict[tuple, Comparison] = field(default_factory=dict, init=False, repr=False)

    def status(self, column: tuple, row: str) -> str | None:
        """`BEST`, `RESOLVED`, `TIED` or `UNRESOLVED` for a row of a column; None for a baseline row, an
        empty cell or a column nothing is compared in (a trivial predictor's score, a single row)."""
        col = self.columns.get(tuple(column))
        if col is None or col.best is None:
            return None
        if row == col.best:
            return BEST
        found = col.versus_best.get(row)
        return found.status if found is not None else None

    def compare(self, column: tuple, a: str, b: str) -> Comparison | None:
        """The comparison of rows ``a`` and ``b`` of a column (None when either has no value there)."""
        column = tuple(column)
        samples = self.samples.get(column, {})
        if a not in samples or b not in samples:
            return None
        col = self.columns.get(column)
        if col is not None and col.best == a and b in col.versus_best:
            return col.versus_best[b]
        if (column, a, b) not in self._compared:
            self._compared[column, a, b] = compare(samples[a], samples[b], self.alpha)
        return self._compared[column, a, b]

    def tests_used(self) -> list[str]:
        """The tests that applied to any comparison with a column's best, in `WELCH`, `BOOTSTRAP` order."""
        used = {t for col in self.columns.values() for c in col.versus_best.values() for t in c.tests}
        return [t for t in (WELCH, BOOTSTRAP) if t in used]

    def statuses(self) -> set[str]:
        """Every status given to a row compared with its column's best."""
        return {c.status for col in self.columns.values() for c in col.versus_best.values()}

    def note(self, seeds: int) -> str:
        """The sentence under a table: what its marks mean, which tests, at what level, over how many
        seeds; empty when nothing was compared."""
        if not any(col.versus_best for col in self.columns.values()):
            return ""
        tests = []
        if WELCH in self.tests_used():
            tests.append(f"Welch's t-test over the seeds (the table has {seeds}; a row needs at least 2)")
        if BOOTSTRAP in self.tests_used():
            tests.append(f"a paired bootstrap over evaluation examples (Efron; {RESAMPLES:,} resamples of the "
                         "examples, 95 % percentile interval of the difference of per-example means)")
        used = " and ".join(tests) if tests else "no test (every comparison lacked seeds and per-example outcomes)"
        text = (f"{TIED_MARK} = tied with the column's best (bold): the difference is not resolved by {used}, "
                f"a difference counting as resolved only when every test that applies rejects at α = {self.alpha:g}; "
                "an unmarked cell is resolved from the best")
        if UNRESOLVED in self.statuses():
            text += (f"; {UNRESOLVED_MARK} = unresolved, no test applies (one seed and no per-example outcomes), "
                     "so the row is not told apart from the best")
        if self.baselines:
            text += (f"; baseline rows ({', '.join(sorted(self.baselines))}) are reference points: never bold, "
                     "compared or ranked")
        return text + "."


def _column_samples(long: pd.DataFrame) -> dict[tuple, dict[str, Sample]]:
    samples: dict[tuple, dict[str, Sample]] = {}
    by_seed = long.sort_values("seed", kind="stable")  # once: a group keeps its rows' order
    for (protocol, dataset, metric, row), part in by_seed.groupby(["protocol", "dataset", "metric", "row"],
                                                                  sort=False):
        samples.setdefault((protocol, dataset, metric), {})[row] = sample_of(
            part["value"].tolist(), part["outcomes"].tolist() if "outcomes" in part else [])
    return samples


def resolve_table(long: pd.DataFrame, table: pd.DataFrame, alpha: float = ALPHA) -> TableResolution:
    """Resolve every column of one table. ``long`` is the table's part of `long_frame` (one row per
    record and metric, with ``outcomes``); ``table`` its summary, indexed by (paradigm, row), which
    gives the rows' order (earlier wins a tie of means) and which rows are baselines."""
    order = [row for _, row in table.index]
    baselines = frozenset(row for paradigm, row in table.index if is_baseline_row(paradigm))
    samples = _column_samples(long[long["row"].isin(order)]) if not long.empty else {}
    columns = {}
    for column, rows in samples.items():
        col = ColumnResolution()
        candidates = {row: s.mean for row, s in rows.items() if row not in baselines and finite(s.mean)}
        if len(candidates) >= 2 and not is_baseline(column[2]):
            ranked_rows = ranked(pd.Series({row: candidates[row] for row in order if row in candidates}), column[2])
            col.best = ranked_rows[0]
            col.versus_best = {row: compare(rows[col.best], rows[row], alpha) for row in ranked_rows[1:]}
        columns[column] = col
    return TableResolution(samples, baselines, columns, alpha)


__all__ = ["ALPHA", "BEST", "BOOTSTRAP", "Comparison", "RESOLVED", "Sample", "TIED", "TIED_MARK", "TableResolution",
           "UNRESOLVED", "UNRESOLVED_MARK", "WELCH", "bootstrap_interval", "compare", "resolve_table", "sample_of",
           "welch_p"]
