"""The paper-style tables, from a `summary_frame`: Markdown, LaTeX (booktabs) and a tidy CSV.

One main table per study (pre-training data + preset): rows are methods grouped by paradigm
(the paper's single-/multi-modal, discriminative/generative), columns each protocol's headline
metric per dataset, cells mean ± sample std over seeds, the best per column in bold, a mark after
each cell the tests cannot tell apart from it (`mugbench.report.resolution`), then the
best-vs-runner-up margin. Baseline rows (`random`, `supervised`) come last as a group of their own:
reference points, never bold, marked, ranked or counted in a margin; the full table shows each
cell's gain over the `random` row. Published figures appear only as labelled reference rows or in the
claims section, never as cells of ours. The Markdown is written by hand: pandas' ``to_markdown``
needs ``tabulate``, which is not a dependency.
"""

from __future__ import annotations

from typing import Any, Collection, Iterable, Sequence

import pandas as pd

from mugbench.report.frame import (
    COLUMN_LEVELS, STATS, _row_label, finite, headline_columns, is_baseline, is_baseline_row, lower_is_better,
    protocol_applies, protocol_label, protocol_order_key, ranked, transfer_columns,
)
from mugbench.report.resolution import (
    ALPHA, BEST, RESOLVED, TIED, TIED_MARK, UNRESOLVED, UNRESOLVED_MARK, TableResolution,
)
from mugbench.report.provenance import MIXED_MARK
from mugbench.results import ResultRecord

MISSING = "—"
MARK = "†"  # after a row not pre-trained like-for-like with the rest of its table (report.likeness)
RANDOM = "random"  # the baseline method whose row is each column's floor (the encoder as initialised)


def fmt(value: float) -> str:
    """One decimal (the paper's unit is the percentage point); 3 significant digits below 1, where
    an MSE or a small CIDEr would otherwise all read 0.0."""
    if value != 0 and abs(value) < 1:
        return f"{value:.3g}"
    return f"{value:.1f}"


def fmt_spread(std: float, mean: float) -> str:
    """``std`` to as many decimals as `fmt` gives ``mean`` (``36.0 ± 0.9``, ``0.177 ± 0.008``): a
    spread is not known more precisely than the value it spreads."""
    shown = fmt(mean)
    if "e" in shown:  # a tiny mean in exponent notation: the spread in two significant digits
        return f"{std:.2g}"
    return f"{std:.{len(shown.split('.')[1]) if '.' in shown else 0}f}"


def column_label(column: tuple[str, str, str]) -> str:
    """``k-NN top1 (toy-cls)`` for a (protocol, dataset, metric) column."""
    protocol, dataset, metric = column
    return f"{protocol_label(protocol)} {metric} ({dataset})"


def cell_text(mean: float, std: float, n: float, seeds: int, pm: str = " ± ") -> str:
    """``mean ± std`` (one seed: the value alone); ``(n=k)`` when fewer seeds than the table's;
    `MISSING` when there is no value: an absent result is never shown as a number."""
    if not finite(n) or n == 0:
        return MISSING
    text = f"{fmt(mean)}{pm}{fmt_spread(std, mean)}" if n > 1 and finite(std) else fmt(mean)
    return text + (f" (n={int(n)})" if n < seeds else "")


def ahead_by(a: float, b: float, metric: str) -> float:
    """How far a value ``a`` of ``metric`` is ahead of ``b``: positive = ``a`` is the better one."""
    return b - a if lower_is_better(metric) else a - b


def baseline_rows(frame: pd.DataFrame) -> set[str]:
    """The rows of a table (indexed by paradigm, row) that are baselines: shown, never ranked."""
    return {row for paradigm, row in frame.index if is_baseline_row(paradigm)}


def best_rows(means: pd.Series, metric: str, exclude: Collection[str] = ()) -> set:
    """Rows holding the best mean of a column, compared as displayed (cells that read the same
    are both bold); none for a column with fewer than two values or of a baseline score. Rows in
    ``exclude`` (baselines) never count."""
    present = means.dropna()
    present = present[~present.index.isin(list(exclude))]
    if len(present) < 2 or is_baseline(metric):
        return set()
    shown = present.map(lambda v: float(fmt(v)))
    best = shown.min() if lower_is_better(metric) else shown.max()
    return set(shown.index[shown == best])


def margin(frame: pd.DataFrame, column: tuple[str, str, str], methods: dict[str, str],
           exclude: Collection[str] = ()) -> dict[str, Any] | None:
    """Best minus runner-up of one column (positive = the best leads), or None with under two rows;
    rows in ``exclude`` (baselines) are neither."""
    order = [row for row in ranked(frame[column + ("mean",)], column[2]) if row not in exclude]
    if len(order) < 2:
        return None
    first, second = order[0], order[1]
    lead = ahead_by(frame.at[first, column + ("mean",)], frame.at[second, column + ("mean",)], column[2])
    return {"best": methods.get(first, first), "runner_up": methods.get(second, second), "margin": float(lead)}


def _rows_by_paradigm(frame: pd.DataFrame) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for paradigm, row in frame.index:
        groups.setdefault(paradigm, []).append(row)
    return list(groups.items())


def _escape_md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def resolution_mark(resolution: TableResolution | None, column: tuple, row: str) -> str:
    """The mark after a cell that is not bold: `TIED_MARK` (not resolved from its column's best),
    `UNRESOLVED_MARK` (no test could compare them), else nothing."""
    status = resolution.status(column, row) if resolution is not None else None
    return {TIED: TIED_MARK, UNRESOLVED: UNRESOLVED_MARK}.get(status, "")


def random_row(row: str, methods: dict[str, str], rows: Collection[str]) -> str | None:
    """The `random` row that is ``row``'s floor: ``random`` itself, ``random · seed S`` beside a row
    of seed S (``--by seed``), ``random · P`` beside a row of preset P; None when the table has none
    or ``row`` is a random row."""
    method = methods.get(row, row)
    if method == RANDOM or not row.startswith(method):
        return None
    floor = RANDOM + row[len(method):]
    return floor if floor in rows else None


def gain_over_random(plain: pd.DataFrame, row: str, column: tuple, methods: dict[str, str]) -> float | None:
    """How much better ``row`` does than its `random` row in a column (mean difference in the metric's
    unit, positive = better; for a lower-is-better metric random's mean minus the row's); None without
    a random row, a value on either side, or for a trivial predictor's score."""
    floor = random_row(row, methods, plain.index)
    if floor is None or is_baseline(column[2]):
        return None
    value, base = plain.at[row, column + ("mean",)], plain.at[floor, column + ("mean",)]
    if not (finite(value) and finite(base)):
        return None
    return float(ahead_by(value, base, column[2]))


def signed(value: float) -> str:
    """``+1.5`` or ``−0.25``: a difference with its sign, to `fmt`'s precision."""
    return f"{'+' if value >= 0 else '−'}{fmt(abs(value))}"


def markdown_table(frame: pd.DataFrame, columns: list[tuple[str, str, str]], seeds: int,
                   methods: dict[str, str], references: Sequence[dict] = (), with_margin: bool = True,
                   marked: Collection[str] = (), resolution: TableResolution | None = None,
                   gains: bool = False, mixed: Collection[tuple] = ()) -> list[str]:
    """Markdown lines of one study's table. ``frame`` is indexed by (paradigm, row); rows in ``marked``
    (not pre-trained like-for-like with the rest) get a dagger after their name. The best of each
    column is bold (never a baseline row); with a ``resolution``, a cell not resolved from the best
    gets `TIED_MARK` and one no test could compare `UNRESOLVED_MARK`. With ``gains``, each cell also
    shows its gain over the table's `random` row, ``36.0 ± 0.9 (+12.3)``. A ``(row, column)`` in ``mixed``
    (its seeds measured by different commits) gets `MIXED_MARK`."""
    header = ["paradigm", "method"] + [column_label(c) for c in columns]
    lines = ["| " + " | ".join(_escape_md(h) for h in header) + " |", "|---|---|" + "---:|" * len(columns)]
    plain = frame.droplevel("paradigm")
    baselines = baseline_rows(frame)
    bold = {c: best_rows(plain[c + ("mean",)], c[2], baselines) for c in columns}
    for paradigm, rows in _rows_by_paradigm(frame):
        for i, row in enumerate(rows):
            cells = [paradigm if i == 0 else "", f"{row}{MARK}" if row in marked else row]
            for c in columns:
                text = cell_text(*(plain.at[row, c + (s,)] for s in STATS), seeds)
                text += MIXED_MARK if (row, c) in mixed else ""
                text = f"**{text}**" if row in bold[c] else " ".join(filter(None, (
                    text, resolution_mark(resolution, c, row))))
                gain = gain_over_random(plain, row, c, methods) if gains else None
                cells.append(text if gain is None else f"{text} ({signed(gain)})")
            lines.append("| " + " | ".join(_escape_md(x) for x in cells) + " |")
    if with_margin:
        margins = [margin(plain, c, methods, baselines) for c in columns]
        if any(margins):
            cells = ["", "*best − runner-up*"] + [
                f"+{fmt(m['margin'])} ({m['best']} over {m['runner_up']})" if m else "" for m in margins]
            lines.append("| " + " | ".join(_escape_md(x) for x in cells) + " |")
    for ref in references:
        cells = ["*published*", f"[reference] {ref['label']}"] + [
            fmt(ref["value"]) if (ref["protocol"], ref["dataset"], ref["metric"]) == c else "" for c in columns]
        lines.append("| " + " | ".join(_escape_md(x) for x in cells) + " |")
    return lines


def absolute_references(references: Sequence[dict], columns: Sequence[tuple]) -> list[dict]:
    """Published absolute figures for a column of this table (same protocol, dataset and metric)."""
    wanted = set(columns)
    return [r for r in references if r.get("kind") == "absolute" and finite(r.get("value"))
            and (r.get("protocol"), r.get("dataset"), r.get("metric")) in wanted]


def resolution_words(resolution: TableResolution | None, column: tuple, a: str, b: str) -> str:
    """Whether the difference between rows ``a`` and ``b`` of a column is resolved, in words with the
    tests' figures: ``resolved (Welch p = 0.003)``, ``within noise (...)`` or ``unresolved (no test
    applies: ...)``."""
    found = resolution.compare(column, a, b) if resolution is not None else None
    if found is None:
        return MISSING
    if found.status == UNRESOLVED:
        return "unresolved (no test applies: one seed each, no per-example outcomes)"
    return f"{'resolved' if found.status == RESOLVED else 'within noise'} ({found.detail})"


def claims_section(tables: dict, references: Sequence[dict]) -> list[str]:
    """The paper's relative claims beside the same margin measured in each of our tables.

    For a claim "method M beats the previous best by X on protocol P", ours is M's mean minus
    the best other non-baseline row's mean on every (P, dataset, metric) column a table has, and
    whether that margin is resolved or within noise by the tests of `mugbench.report.resolution`
    between the two rows. ``tables`` maps a study to (frame, methods, seeds[, resolution]).
    """
    claims = [r for r in references if r.get("kind") == "relative" and r.get("method")]
    if not claims:
        return []
    lines = ["## The paper's margins beside ours", "",
             "| claim (published) | paper | ours: study · column | ours: margin | resolved? | seeds |",
             "|---|---:|---|---:|---|---:|"]
    for ref in claims:
        found = False
        for (data, preset), (frame, methods, seeds, *rest) in tables.items():
            resolution = rest[0] if rest else None
            plain = frame.droplevel("paradigm")
            baselines = baseline_rows(frame)
            for column in [c for c in dict.fromkeys(x[:3] for x in plain.columns)
                           if c[0] == ref.get("protocol") and c[2] == ref.get("metric")]:
                means = plain[column + ("mean",)].dropna()
                own = [row for row in means.index if methods.get(row) == ref["method"]]
                others = means.drop(own)
                others = others[~others.index.isin(list(baselines))]
                if len(own) != 1 or others.empty:
                    continue
                found = True
                mine = means[own[0]]
                rival = others.idxmin() if lower_is_better(column[2]) else others.idxmax()
                lead = ahead_by(mine, others[rival], column[2])
                verdict = "leads" if lead > 0 else "does not lead"
                n = int(plain.at[own[0], column + ("n",)])
                lines.append(f"| {_escape_md(ref['claim'])} | +{fmt(ref['value'])} | `{data}`/`{preset}` · "
                             f"{column_label(column)} | {'+' if lead >= 0 else ''}{fmt(lead)} ({ref['method']} "
                             f"{verdict}; next best {methods.get(rival, rival)}) | "
                             f"{_escape_md(resolution_words(resolution, column, own[0], rival))} | {n} of {seeds} |")
        if not found:
            lines.append(f"| {_escape_md(ref['claim'])} | +{fmt(ref['value'])} | no matching column in these "
                         f"results | {MISSING} | | |")
    lines += ["", "The paper's figures are for ViT-B/16 pre-trained on CC3M and transferred to ADE20K and "
              "ImageNet-1k; ours are for the studies named, so only the sign and rough size compare. "
              "Resolved: every test that applies (Welch's t-test over seeds; a paired bootstrap over evaluation "
              "examples where both rows kept per-example outcomes) rejects \"no difference\" at "
              f"α = {ALPHA:g}."]
    return lines


# The paper's qualitative claims, as pairwise comparisons on transfer: multi-modal methods do not beat
# their single-modal counterparts (CLIP vs MAE and SimCLR), and MUG leads.
CLAIM_PAIRS = (("clip", "mae"), ("clip", "simclr"), ("mug", "mae"), ("mug", "clip"))


def _transfer_names(protocols) -> str:
    """The transfer protocols a ranking covers, in words: ``a, b and c`` of their labels in display order."""
    names = sorted(set(protocols), key=protocol_order_key)
    labels = [protocol_label(n) for n in names]
    return " and ".join([", ".join(labels[:-1]), labels[-1]]) if len(labels) > 1 else labels[0]


def column_places(plain: pd.DataFrame, column: tuple, baselines: Collection[str],
                  resolution: TableResolution | None) -> dict[str, int]:
    """Competition ranks of one column's non-baseline rows (1 = best): the best, the rows shown
    equal to it (bold) and, with a ``resolution``, the rows tied with it share place 1; every other
    row comes after all rows ahead of it by mean."""
    order = [row for row in ranked(plain[column + ("mean",)], column[2]) if row not in baselines]
    shared = best_rows(plain[column + ("mean",)], column[2], baselines)
    if resolution is not None:
        shared |= {row for row in order if resolution.status(column, row) in (BEST, TIED)}
    return {row: 1 if row in shared else i for i, row in enumerate(order, start=1)}


def ranking_section(frame: pd.DataFrame, columns: list[tuple], methods: dict[str, str],
                    resolution: TableResolution | None = None) -> list[str]:
    """Mean rank of each row over the transfer columns (1 = best), and the paper's pairwise claims
    counted column by column. A row is ranked on the columns it has, and says how many. Baseline
    rows are never ranked. With a ``resolution``, rows tied with a column's best share its rank
    there, and a mean rank resting on a comparison no test could make is marked `UNRESOLVED_MARK`;
    rows of equal mean rank share a place."""
    plain = frame.droplevel("paradigm")
    baselines = baseline_rows(frame)
    transfer = transfer_columns(columns)
    if not transfer or len(plain.index.difference(list(baselines))) < 2:
        return []
    ranks: dict[str, list[int]] = {row: [] for row in plain.index if row not in baselines}
    unresolved: set[str] = set()
    for c in transfer:
        for row, place in column_places(plain, c, baselines, resolution).items():
            ranks[row].append(place)
            if resolution is not None and resolution.status(c, row) == UNRESOLVED:
                unresolved.add(row)
    # Mean ranks over different columns do not compare: rows with every column come first and alone
    # get a place (shared by equal mean ranks: "1, 1, 3"); the others follow, unplaced.
    complete = {r: sum(ranks[r]) for r in ranks if len(ranks[r]) == len(transfer)}
    places = pd.Series(complete, dtype=float).rank(method="min")
    order = sorted((r for r in ranks if ranks[r]),
                   key=lambda r: (r not in complete, sum(ranks[r]) / len(ranks[r]), r))
    tied = (f"rows tied with a column's best ({TIED_MARK} in the table) share its rank there; "
            if resolution is not None else "")
    untested = (f"; {UNRESOLVED_MARK} = a rank rests on a column where no test could compare the row with the best"
                if unresolved else "")
    lines = [f"Ranking on transfer (mean rank over the {_transfer_names(c[0] for c in transfer)} columns; "
             f"1 = best; {tied}rows of equal mean rank share a place; baseline rows are not ranked; "
             f"a row without every column is not placed{untested}):", "",
             "| place | method | mean rank | columns ranked |", "|---:|---|---:|---:|"]
    lines += [f"| {int(places[row]) if row in complete else MISSING} | {row} | "
              f"{sum(ranks[row]) / len(ranks[row]):.2f}{' ' + UNRESOLVED_MARK if row in unresolved else ''} | "
              f"{len(ranks[row])} of {len(transfer)} |"
              for row in order]
    by_method = {methods.get(row, row): row for row in plain.index}
    checks = []
    for a, b in CLAIM_PAIRS:
        if a in by_method and b in by_method:
            shared = [c for c in transfer if finite(plain.at[by_method[a], c + ("mean",)])
                      and finite(plain.at[by_method[b], c + ("mean",)])]
            wins = sum(ahead_by(plain.at[by_method[a], c + ("mean",)], plain.at[by_method[b], c + ("mean",)], c[2]) > 0
                       for c in shared)
            if shared:
                checks.append(f"{a} ahead of {b} on {wins} of {len(shared)}")
    if checks:
        lines += ["", "Pairwise, on the transfer columns both have: " + "; ".join(checks) + "."]
    return lines


def missing_cells(frame: pd.DataFrame, columns: list[tuple], methods: dict[str, str], seeds: list[int],
                  by: str) -> list[str]:
    """One line per row with empty or under-seeded cells, then the cells that cannot exist (the
    method lacks the capability the protocol needs), so a reader can tell a gap from a design."""
    lines, not_applicable = [], {}
    plain = frame.droplevel("paradigm")
    for row in plain.index:
        method = methods.get(row, row)
        absent, short = [], []
        for c in columns:
            n = plain.at[row, c + ("n",)]
            if not finite(n) or n == 0:
                if protocol_applies(method, c[0]) is False:
                    not_applicable.setdefault(c[0], []).append(row)
                else:
                    absent.append(column_label(c))
            elif by == "method" and n < len(seeds):
                short.append(f"{column_label(c)} ({int(n)} of {len(seeds)} seeds)")
        if absent:
            lines.append(f"- {row}: no result for {', '.join(absent)}")
        if short:
            lines.append(f"- {row}: too few seeds for {', '.join(short)}")
    for protocol, rows in not_applicable.items():
        lines.append(f"- not applicable, {protocol}: {', '.join(dict.fromkeys(rows))} (the method lacks the "
                     "capability the protocol needs)")
    return lines


def grid_edge_note(records: Iterable[ResultRecord], rows: Collection[str], by: str = "method") -> list[str]:
    """Markdown lines below a table naming the rows whose best learning rate is the smallest or largest
    of the grid it was picked from (``protocol_options["best_lr"]`` against ``["lrs"]``, as the linear
    probe records them): the optimum is not bracketed, so the column may be capped by the grid rather
    than by the features. None when every best rate lies inside its grid."""
    edges: dict[tuple, dict[str, set[int]]] = {}  # (protocol, dataset, best, edge, grid) -> row -> seeds
    for r in records:
        best, grid = r.protocol_options.get("best_lr"), r.protocol_options.get("lrs")
        if not isinstance(grid, list) or len(grid) < 2 or not isinstance(best, (int, float)):
            continue
        try:
            grid = sorted(float(lr) for lr in grid)
        except (TypeError, ValueError):
            continue
        edge = "smallest" if best <= grid[0] else "largest" if best >= grid[-1] else ""
        row = _row_label(r, by)
        if edge and row in rows:
            key = (r.protocol, r.dataset, float(best), edge, tuple(grid))
            edges.setdefault(key, {}).setdefault(row, set()).add(r.seed)
    if not edges:
        return []
    lines = [("Learning rate at an edge of its grid (the optimum is not bracketed: a wider grid may score higher, "
              "so the column may measure the grid rather than the features):"), ""]
    order = list(rows)
    for (protocol, dataset, best, edge, grid), found in sorted(
            edges.items(), key=lambda kv: (protocol_order_key(kv[0][0]), kv[0][1:3])):
        by_seeds: dict[tuple, list[str]] = {}  # rows with the same seeds at this edge, named together
        for row in sorted(found, key=order.index):
            by_seeds.setdefault(tuple(sorted(found[row])), []).append(row)
        who = "; ".join(f"{', '.join(named)} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
                        for seeds, named in by_seeds.items())
        lines.append(f"- {protocol_label(protocol)} ({dataset}): best rate {best:g}, the {edge} of the grid "
                     f"{', '.join(f'{lr:g}' for lr in grid)}, for {who}")
    return lines


def latex_table(frame: pd.DataFrame, columns: list[tuple], seeds: int, caption: str, references=(),
                marked: Collection[str] = (), resolution: TableResolution | None = None) -> str:
    """One study's main table as a booktabs ``table`` (bold best, never a baseline row; $\\pm$ std; ---
    when missing; a dagger after the rows in ``marked``, not pre-trained like-for-like with the rest;
    with a ``resolution``, the marks of `markdown_table` after cells tied with or untested against the best)."""
    plain = frame.droplevel("paradigm")
    bold = {c: best_rows(plain[c + ("mean",)], c[2], baseline_rows(frame)) for c in columns}
    head = " & ".join(["Paradigm", "Method"] + [_tex(column_label(c)) for c in columns])
    lines = ["\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{_tex(caption)}}}",
             f"\\begin{{tabular}}{{ll{'r' * len(columns)}}}", "\\toprule", head + " \\\\", "\\midrule"]
    groups = _rows_by_paradigm(frame)
    for g, (paradigm, rows) in enumerate(groups):
        for i, row in enumerate(rows):
            cells = [_tex(paradigm) if i == 0 else "", _tex(f"{row}{MARK}" if row in marked else row)]
            for c in columns:
                text = cell_text(*(plain.at[row, c + (s,)] for s in STATS), seeds, pm=" $\\pm$ ")
                text = "---" if text == MISSING else text
                mark = _tex(resolution_mark(resolution, c, row))
                cells.append(f"\\textbf{{{text}}}" if row in bold[c] else f"{text} {mark}" if mark else text)
            lines.append(" & ".join(cells) + " \\\\")
        if g < len(groups) - 1:
            lines.append("\\midrule")
    if references:
        lines.append("\\midrule")
        for ref in references:
            cells = ["Published", _tex(f"{ref['label']}")] + [
                fmt(ref["value"]) if (ref["protocol"], ref["dataset"], ref["metric"]) == c else "" for c in columns]
            lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


_TEX = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "#": "\\#", "_": "\\_", "$": "\\$", "{": "\\{",
        "}": "\\}", "·": "$\\cdot$", "†": "$^\\dagger$", "×": "$\\times$", "−": "--", "—": "---", "±": "$\\pm$",
        "≈": "$\\approx$", "α": "$\\alpha$"}


def _tex(text: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """The summary in long form: one row per (study, row, protocol, dataset, metric)."""
    columns = ["pretrain_data", "preset", "paradigm", "row", *COLUMN_LEVELS, *STATS]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    long = frame.stack(COLUMN_LEVELS, future_stack=True).dropna(subset=["n"]).reset_index()
    long["n"] = long["n"].astype(int)
    return long[columns].rename(columns={"row": "method"})


def study_tables(frame: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """The frame split per (pretrain_data, preset), each indexed by (paradigm, row), empty columns dropped;
    without the frame's ``attrs`` (they describe every table, and pandas deep-copies them into each
    frame and series derived from a part: every cell read)."""
    out = {}
    if frame.empty:
        return out
    for key, part in frame.groupby(level=["pretrain_data", "preset"], sort=False):
        part = part.droplevel(["pretrain_data", "preset"])
        part.attrs = {}
        counts = part.xs("n", axis=1, level="stat")
        keep = {c for c in counts.columns if counts[c].notna().any()}
        out[key] = part[[c for c in part.columns if c[:3] in keep]]
    return out


__all__ = ["MISSING", "RANDOM", "absolute_references", "baseline_rows", "best_rows", "cell_text", "claims_section",
           "column_label", "column_places", "fmt", "gain_over_random", "grid_edge_note", "headline_columns",
           "latex_table", "margin", "markdown_table", "missing_cells", "random_row", "ranking_section",
           "resolution_mark", "resolution_words", "signed", "study_tables", "tidy"]
