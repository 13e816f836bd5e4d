"""Which rows of a table were not pre-trained like-for-like with the others, and what differs.

Every record written since the like-for-like fingerprint exists carries it (`mugbench.fingerprint`).
Within one table, records are compared seed by seed (and preset by preset under ``--by preset``):
the seed is itself a condition, and a table averages over seeds on purpose. The fingerprint most
rows share is the table's; a row with a record of another fingerprint is marked, and the parts of
its conditions that differ are named. Records without a fingerprint (written before it existed, or
of an encoder trained elsewhere) are unknown: they neither vote nor get marked.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from mugbench.fingerprint import condition_diff
from mugbench.report.frame import (
    ALL_PRESETS, BENCH_PROTOCOLS, METHOD_ORDER, ROW_GROUPS, _row_label, order_key, paradigm_of,
)
from mugbench.report.tables import MARK
from mugbench.results import ResultRecord

MAX_PARTS = 10  # differences named per row; the rest are counted


def _latest(records: Iterable[ResultRecord]) -> list[ResultRecord]:
    """One record per (study, method, protocol, dataset, seed), the most recent, as the tables count them."""
    latest: dict[tuple, ResultRecord] = {}
    for r in sorted((r for r in records if r.protocol not in BENCH_PROTOCOLS), key=lambda r: r.created):
        latest[(r.pretrain_data, r.preset, r.method, r.protocol, r.dataset, r.seed)] = r
    return list(latest.values())


def unlike_rows(records: Iterable[ResultRecord], by: str = "method") -> dict[tuple[str, str], dict[str, list[str]]]:
    """Per table ``(pretrain_data, preset)``: each row whose records' fingerprint differs from the one
    most rows of the table share, with what differs (``"train.epochs 4.0 vs 2.0"``: the row's value,
    then the table's). A tie between fingerprints goes to the one of the row listed first (paradigm,
    then the paper's method order); a comparison needs at least two rows with a fingerprint."""
    groups: dict[tuple, dict[str, list[ResultRecord]]] = {}
    for r in _latest(records):
        if not r.fingerprint:
            continue
        table = (r.pretrain_data, ALL_PRESETS if by == "preset" else r.preset)
        groups.setdefault((table, r.preset, r.seed), {}).setdefault(_row_label(r, by), []).append(r)
    paradigm_key, method_key = order_key(ROW_GROUPS), order_key(METHOD_ORDER)
    out: dict[tuple[str, str], dict[str, list[str]]] = {}
    for (table, _, _), rows in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1], item[0][2])):
        if len(rows) < 2:
            continue
        order = sorted(rows, key=lambda row: (paradigm_key(paradigm_of(rows[row][0])),
                                              method_key(rows[row][0].method), row))
        votes = Counter(fp for row in order for fp in dict.fromkeys(r.fingerprint for r in rows[row]))
        reference = votes.most_common(1)[0][0]  # equal counts: the one first seen in table order
        ref_conditions = next(r.conditions for row in order for r in rows[row] if r.fingerprint == reference)
        for row in order:
            for r in rows[row]:
                if r.fingerprint == reference:
                    continue
                parts = condition_diff(r.conditions, ref_conditions) or [
                    f"fingerprint {r.fingerprint} vs {reference} (conditions not recorded)"]
                found = out.setdefault(table, {}).setdefault(row, [])
                found.extend(p for p in parts if p not in found)
    return out


def unlike_note(unlike: dict[str, list[str]], rows: Iterable[str]) -> list[str]:
    """Markdown lines below a table explaining its marked rows (none when no row is marked)."""
    marked = [row for row in rows if row in unlike]
    if not marked:
        return []
    lines = [f"{MARK} Not like-for-like: the marked row(s) were pre-trained under other conditions than the "
             "table's other rows (their records' like-for-like fingerprint differs from the one most rows "
             "share). What differs, the row's value first:", ""]
    for row in marked:
        parts = unlike[row]
        more = f"; and {len(parts) - MAX_PARTS} more" if len(parts) > MAX_PARTS else ""
        lines.append(f"- {row}{MARK}: {'; '.join(parts[:MAX_PARTS])}{more}")
    return lines


__all__ = ["MARK", "unlike_note", "unlike_rows"]
