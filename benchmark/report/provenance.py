"""Which table cells average records of different provenance (code commits), and which.

A cell is a mean over seeds. When its seeds were measured by different commits of mugbench (a user's
seed 0 beside seeds 1-2 copied from elsewhere, or a rerun after an upgrade), the mean mixes two
versions of the code; the report shows such a cell with `MIXED_MARK` and names the commits below
the table, so the mixture is never silent. A record without a commit counts as provenance
``unknown``.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd

from mugbench.report.frame import COLUMN_LEVELS

MIXED_MARK = "‡"  # after a cell whose seeds come from more than one commit
UNKNOWN = "unknown"


def mixed_cells(long: pd.DataFrame) -> dict[tuple[str, str], dict[tuple, dict]]:
    """Per table ``(pretrain_data, preset)``: each ``(row, (protocol, dataset, metric))`` cell whose
    records come from more than one commit, as ``{commit: [seeds]}`` (commits shortened to 10 digits).
    ``long`` is the report's `long_frame`: records already counted as the tables count them."""
    out: dict[tuple[str, str], dict[tuple, dict]] = {}
    commits = long["git_commit"].map(lambda c: (c or UNKNOWN)[:10])  # None or "" (a hand-made record): unknown
    for key, part in long.assign(commit=commits).groupby(["pretrain_data", "preset", "row", *COLUMN_LEVELS], sort=True):
        if part["commit"].nunique() > 1:
            seeds = {c: sorted(int(s) for s in g["seed"]) for c, g in part.groupby("commit", sort=True)}
            out.setdefault(key[:2], {})[(key[2], tuple(key[3:]))] = seeds
    return out


def mixed_note(mixed: dict[tuple, dict], rows: Iterable[str], columns: Iterable[tuple]) -> list[str]:
    """Markdown lines below a table naming the commits behind each `MIXED_MARK` cell among ``rows`` x
    ``columns`` (none when no shown cell mixes commits). A record gives every metric of its protocol
    and dataset, so cells are named by protocol and dataset; those of a row with the same mixture are
    listed together."""
    per_row: dict[tuple[str, tuple], list[str]] = {}
    for row in rows:
        for column in columns:
            commits = mixed.get((row, column))
            if commits:
                key = (row, tuple((c, tuple(s)) for c, s in commits.items()))
                found = per_row.setdefault(key, [])
                name = f"{column[0]} ({column[1]})"
                found += [] if name in found else [name]
    if not per_row:
        return []
    lines = [f"{MIXED_MARK} The cell averages seeds measured by different commits of mugbench (each commit's "
             "seeds follow it): compare it with care, or rerun those seeds at one commit.", ""]
    for (row, commits), columns_of in per_row.items():
        where = "; ".join(f"{commit}: seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
                          for commit, seeds in commits)
        lines.append(f"- {row}, {', '.join(columns_of)}: {where}")
    return lines


__all__ = ["MIXED_MARK", "mixed_cells", "mixed_note"]
