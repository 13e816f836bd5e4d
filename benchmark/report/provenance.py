"""Which table cells average records of different provenance (code commits), and which.

A cell is a mean over seeds. When its seeds were measured by different commits of mugbench (a user's
seed 0 beside seeds 1-2 copied from elsewhere, or a rerun after an upgrade), the mean mixes two
versions of the code; the report shows such a cell with `MIXED_MARK` and names the commits below
the table, so the mixture is never silent. A record without a commit counts as provenance
``unknown``.
"""

from __future__ import annotations

from typing import Iterable

from mugbench.report.frame import ALL_PRESETS, BENCH_PROTOCOLS, _row_label
from mugbench.results import ResultRecord

MIXED_MARK = "‡"  # after a cell whose seeds come from more than one commit
UNKNOWN = "unknown"


def mixed_cells(records: Iterable[ResultRecord], by: str = "method") -> dict[tuple[str, str], dict[tuple, dict]]:
    """Per table ``(pretrain_data, preset)``: each ``(row, (protocol, dataset, metric))`` cell whose
    records come from more than one commit, as ``{commit: [seeds]}`` (commits shortened to 10 digits).
    Records are de-duplicated as the tables count them: the latest per (study, method, protocol,
    dataset, seed)."""
    latest: dict[tuple, ResultRecord] = {}
    for r in sorted((r for r in records if r.protocol not in BENCH_PROTOCOLS), key=lambda r: r.created):
        latest[(r.pretrain_data, r.preset, r.method, r.protocol, r.dataset, r.seed)] = r
    cells: dict[tuple, dict[tuple, dict[str, list[int]]]] = {}
    for r in latest.values():
        table = (r.pretrain_data, ALL_PRESETS if by == "preset" else r.preset)
        commit = (r.git_commit or UNKNOWN)[:10]
        for metric in r.metrics:
            cell = (_row_label(r, by), (r.protocol, r.dataset, metric))
            cells.setdefault(table, {}).setdefault(cell, {}).setdefault(commit, []).append(r.seed)
    return {table: {cell: {c: sorted(s) for c, s in sorted(commits.items())}
                    for cell, commits in found.items() if len(commits) > 1}
            for table, found in cells.items()
            if any(len(commits) > 1 for commits in found.values())}


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
