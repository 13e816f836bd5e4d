"""`mugbench report`: rebuild everything under ``reports/`` from ``results/`` alone.

Writes ``summary.md`` (every table, margins, what is missing, the paper's claims beside ours,
the reference list and any skipped file), ``summary.csv`` (tidy), ``summary.tex`` (booktabs),
``figures/`` (PNG + PDF) and ``README.md`` (the index: main tables, figures, and the commands
and commits that produced the records). Tables are deterministic, so a rebuild from the same
records gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd

from mugbench.report import plots
from mugbench.report.critical_difference import CriticalDifference, cd_diagram, critical_difference
from mugbench.report.frame import (
    BENCH_PROTOCOLS, Selection, describe_encoder, headline_columns, long_frame, study_details, summary_frame,
)
from mugbench.report.likeness import unlike_note, unlike_rows
from mugbench.report.provenance import mixed_cells, mixed_note
from mugbench.report.resolution import (
    ALPHA, RESOLVED, TIED, TIED_MARK, UNRESOLVED, UNRESOLVED_MARK, resolve_table,
)
from mugbench.report.tables import (
    RANDOM, _escape_md as _md, absolute_references, baseline_rows, claims_section, column_label, gain_over_random,
    grid_edge_note, latex_table, markdown_table, missing_cells, random_row, ranking_section, signed, study_tables, tidy,
)
from mugbench.files import atomic_write_text
from mugbench.results import (
    MalformedRecordWarning, ResultRecord, load_records, load_references, record_figure,
)

FIGURE_NOTES = {
    "bars": "each panel is one column of the main table: a bar per method (mean over seeds, ± sample std), its "
            "seeds as dots; hatching marks the paradigm",
    "loss": "pre-training loss against step per method (mean over seeds, range of the seeds shaded); the scales "
            "differ because the losses differ",
    "throughput": "pre-training images/s, peak memory (CUDA: max allocated; CPU: resident set) and the share of "
                  "time spent waiting for data, per method, as measured by the runs themselves",
    "examples": "the same validation images masked and reconstructed by each reconstructing method, and the "
                "captions each captioning method generated for them (as the paper's Fig. 4)",
    "linear-lr": "linear-probe top-1 against the learning rate of the probe's grid, per method",
    "gain": "each panel is one column of the main table: each method's bar starts at the `random` row's mean (the "
            "dashed line: what the protocol gives an untrained encoder) and shows what pre-training added (± sample "
            "std over seeds; seeds as dots)",
    "cd": "critical-difference diagram: each method at its mean rank over the transfer columns and seeds (1 = best, "
          "on the right); a bar joins methods whose mean ranks differ by less than Nemenyi's critical difference "
          "(the CD span above the axis), which the test cannot tell apart",
    "bench": "`mugbench bench` train steps: each method's step time as a multiple of a plain ViT step",
}


def _load(results_dir: Path) -> tuple[list[ResultRecord], list[dict], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MalformedRecordWarning)
        records, references = load_records(results_dir), load_references(results_dir)
    skipped = [str(w.message) for w in caught if issubclass(w.category, MalformedRecordWarning)]
    return records, references, skipped


def _confine_figures(records: list[ResultRecord], results_dir: Path) -> tuple[list[ResultRecord], list[str]]:
    """The records with every figure path that leads outside ``results_dir`` dropped, and a line per
    one dropped: its numbers still count, its figure is never read."""
    kept, problems = [], []
    for record in records:
        try:
            record_figure(results_dir, record)
        except ValueError as exc:
            problems.append(str(exc))
            options = {k: v for k, v in record.protocol_options.items() if k != "figure"}
            record = dataclasses.replace(record, protocol_options=options)
        kept.append(record)
    return kept, problems


def _slug(*parts: str) -> str:
    return "-".join("".join(ch if ch.isalnum() or ch in "._" else "_" for ch in p) for p in parts)


class Report:
    """The tables and figures of one selection of records, rendered to text and files."""

    def __init__(self, records: list[ResultRecord], references: list[dict], skipped: Sequence[str],
                 results_dir: Path, by: str = "method", selection: Selection = Selection()):
        self.records, figure_problems = _confine_figures([r for r in records if selection.keeps(r)], results_dir)
        self.references, self.by, self.selection = references, by, selection
        self.skipped = list(skipped) + figure_problems
        self.results_dir = results_dir
        self.long = long_frame(self.records, by)
        self.frame = summary_frame(self.records, by, long=self.long)
        self.tables = study_tables(self.frame)
        self.details = study_details(self.records)
        self.methods = self.frame.attrs["methods"]
        self.studies = self.frame.attrs["studies"]
        self.unlike = unlike_rows(self.records, by)  # per table: rows not pre-trained like-for-like, and why
        self.mixed = mixed_cells(self.long)  # per table: cells whose seeds come from several commits
        # per table: each column's best, and which rows the tests cannot tell apart from it
        self.resolutions = {key: resolve_table(self._long_of(key), table) for key, table in self.tables.items()}
        # per table: the Friedman and Nemenyi tests over every ranked method and transfer column (or why not)
        self.critical = {key: critical_difference(self._long_of(key), headline_columns(table.columns), ALPHA)
                         for key, table in self.tables.items()} if by == "method" else {}

    def _long_of(self, key) -> pd.DataFrame:
        """The part of the long frame that makes table ``key``."""
        return self.long[(self.long["pretrain_data"] == key[0]) & (self.long["preset"] == key[1])]

    def _seeds(self, key) -> list[int]:
        return self.studies.get(key, {}).get("seeds", [])

    def _records_of(self, data: str, preset: str) -> list[ResultRecord]:
        return [r for r in self.records if r.pretrain_data == data and (preset == r.preset or self.by == "preset")]

    def main_table(self, key) -> list[str]:
        """Markdown lines of one study's main table (headline metrics)."""
        table = self.tables[key]
        columns = headline_columns(table.columns)
        seeds = 1 if self.by == "seed" else len(self._seeds(key))
        refs = absolute_references(self.references, columns)
        return markdown_table(table, columns, seeds, self.methods, refs, with_margin=self.by == "method",
                              marked=self.unlike.get(key, {}), resolution=self.resolutions[key],
                              mixed=self.mixed.get(key, {}))

    def full_table(self, key) -> list[str]:
        """Markdown lines of one study's table of every metric, each cell with its gain over `random`."""
        table = self.tables[key]
        all_columns = list(dict.fromkeys(c[:3] for c in table.columns))
        seeds = 1 if self.by == "seed" else len(self._seeds(key))
        lines = markdown_table(table, all_columns, seeds, self.methods, with_margin=False,
                               marked=self.unlike.get(key, {}), resolution=self.resolutions[key], gains=True,
                               mixed=self.mixed.get(key, {}))
        rows = table.index.get_level_values("row")
        if any(random_row(row, self.methods, rows) for row in rows):
            lines += ["", f"(+x) after a cell: its gain over the `{RANDOM}` row (the encoder as initialised, not "
                          "pre-trained), the difference of the means in the metric's unit; positive = better than "
                          f"`{RANDOM}` (for a lower-is-better metric, `{RANDOM}`'s value minus the row's)."]
        return lines

    def notes(self, key) -> list[str]:
        """The notes below a main table: what its marks mean, columns that measure nothing here, best
        learning rates at a grid's edge, and rows not pre-trained like-for-like."""
        rows = list(self.tables[key].index.get_level_values("row"))
        seeds = 1 if self.by == "seed" else len(self._seeds(key))
        lines = []
        sentence = self.resolutions[key].note(seeds)
        if sentence:
            lines += [sentence, ""]
        for part in (self.floor_lines(key), grid_edge_note(self._records_of(*key), rows, self.by),
                     unlike_note(self.unlike.get(key, {}), rows),
                     mixed_note(self.mixed.get(key, {}), rows, [c[:3] for c in self.tables[key].columns])):
            lines += part + [""] if part else []
        return lines

    def floor_lines(self, key) -> list[str]:
        """The main-table columns whose best method is not resolved above the `random` row: such a column
        measures what the protocol gives for free, not what pre-training taught."""
        table, resolution = self.tables[key], self.resolutions[key]
        plain = table.droplevel("paradigm")
        flat = []
        for column in headline_columns(table.columns):
            best = resolution.columns.get(column)
            floor = random_row(best.best, self.methods, plain.index) if best and best.best else None
            if floor is None:
                continue
            gain = gain_over_random(plain, best.best, column, self.methods)
            found = resolution.compare(column, best.best, floor)
            if gain is not None and (gain <= 0 or found is None or found.status != RESOLVED):
                why = found.detail if found is not None and found.detail else "no test applies"
                flat.append(f"{column_label(column)} (best {best.best}, {signed(gain)} over `{RANDOM}`; {why})")
        if not flat:
            return []
        return [f"Not resolved above `{RANDOM}` (α = {ALPHA:g}), so these columns do not tell what pre-training "
                f"taught: {'; '.join(flat)}."]

    def _study_header(self, key) -> list[str]:
        data, preset = key
        seeds = self._seeds(key)
        records = [r for r in self._records_of(data, preset) if r.protocol not in BENCH_PROTOCOLS]
        encoders = sorted({describe_encoder(r.encoder) for r in records} - {""})
        # An encoder evaluated as initialised (`random`, an untrained timm model) has no budget to compare.
        epochs = sorted({r.epochs for r in records if r.steps})
        untrained = sorted({r.method for r in records if not r.steps})
        lines = [f"## Pre-training data `{data}`, preset `{preset}`", "",
                 f"{len(self.tables[key])} row(s), {len(records)} record(s), {len(seeds)} seed(s) "
                 f"({', '.join(map(str, seeds))}). Cells: mean ± sample std over seeds (one seed: the value; "
                 f"`(n=k)`: only k seeds); best per column in **bold**; — = no result (listed below the table)."]
        if encoders:
            lines.append(f"Encoder: {'; '.join(encoders)}.")
        if epochs:
            not_trained = f" ({', '.join(untrained)}: not pre-trained)" if untrained else ""
            lines.append(f"Pre-training epochs: {', '.join(f'{e:g}' for e in epochs)}{not_trained}.")
        if len(encoders) > 1 or len(epochs) > 1:
            lines.append("**Warning: this study mixes encoders or epoch budgets; rows are not like-for-like.**")
        return lines

    def summary_markdown(self) -> str:
        """``summary.md``: every study's main table, margins, gaps and full metrics, then the claims."""
        lines = ["# mugbench results", ""]
        where = f"`{self.results_dir}`"
        selected = self.selection.describe()
        lines.append(f"Built by `mugbench report` from the result records under {where}"
                     + (f", selected with `{selected}`" if selected else "")
                     + (f", one row per {self.by}" if self.by != "method" else "") + ".")
        lines.append("")
        if not self.tables:
            lines += [f"No result records found under {where}" + (" for this selection" if selected else "") + ".", ""]
        for key, table in self.tables.items():
            lines += self._study_header(key) + [""] + self.main_table(key) + [""] + self.notes(key)
            if self.by == "method":
                lines += self.ranking_lines(key)
            gaps = missing_cells(table, headline_columns(table.columns), self.methods, self._seeds(key), self.by)
            if gaps:
                lines += ["Missing from this table:", ""] + gaps + [""]
            lines += ["<details><summary>All metrics</summary>", ""] + self.full_table(key) + ["", "</details>", ""]
        claims = claims_section({k: (t, self.methods, len(self._seeds(k)), self.resolutions[k])
                                 for k, t in self.tables.items()}, self.references) if self.by == "method" else []
        if claims:
            lines += claims + [""]
        lines += self._references_section()
        if self.skipped:
            lines += ["", "## Files skipped (not records)", ""] + [f"- {_md(s)}" for s in self.skipped]
        return "\n".join(lines) + "\n"

    def ranking_lines(self, key, figure: str = "") -> list[str]:
        """One study's ranking on transfer, then what the critical-difference test over all of it says
        (``figure``: where its diagram is, when drawn)."""
        table = self.tables[key]
        ranking = ranking_section(table, headline_columns(table.columns), self.methods, self.resolutions[key])
        if not ranking:
            return []
        cd = self.critical.get(key)
        words = cd.lines(figure) if isinstance(cd, CriticalDifference) else [cd] if cd else []
        return ranking + [""] + (words + [""] if words else [])

    def headline(self, studies: Sequence[tuple[str, str]] | None = None) -> str:
        """What a run prints at its end: per study (all, or those of ``studies``: (pretrain_data, preset)
        pairs), its main table (one headline metric per protocol) and the notes that qualify it."""
        lines = []
        for key in self.tables:
            if studies is None or key in studies:
                lines += [f"## `{key[0]}` / `{key[1]}`", ""] + self.main_table(key) + [""] + self.notes(key)
        return "\n".join(lines).rstrip() + "\n" if lines else ""

    def _references_section(self) -> list[str]:
        lines = ["## Published reference claims (not produced by these runs)", ""]
        if not self.references:
            return lines + ["No reference claims found."]
        for ref in self.references:
            setting = f" Setting: {ref['setting']}." if ref.get("setting") else ""
            lines.append(f"- **[reference] {_md(ref.get('label', 'reference'))}**: {_md(ref['claim'])}{setting} "
                         f"Source: {ref['source']}.")
        return lines

    def latex(self) -> str:
        """``summary.tex``: one booktabs table per study (headline metrics)."""
        parts = ["% Written by `mugbench report` from results/; needs \\usepackage{booktabs}.\n"]
        for key, table in self.tables.items():
            columns = headline_columns(table.columns)
            seeds = 1 if self.by == "seed" else len(self._seeds(key))
            caption = (f"Pre-training data {key[0]}, preset {key[1]}: mean ± sample std over {seeds} seed(s); "
                       "best in bold.")
            statuses = self.resolutions[key].statuses()
            marks = ([f"{TIED_MARK} = not resolved from the best"] if TIED in statuses else []) + (
                [f"{UNRESOLVED_MARK} = no test applies"] if UNRESOLVED in statuses else [])
            if marks:
                caption += (f" {', '.join(marks)} (Welch's t-test over seeds, paired bootstrap over examples; "
                            f"α = {ALPHA:g}; summary.md says which applied).")
            if baseline_rows(table):
                caption += " Baseline rows are reference points, never bold or ranked."
            marked = self.unlike.get(key, {})
            if marked:
                caption += " † = pre-trained under other conditions than the other rows (summary.md says which)."
            parts.append(latex_table(table, columns, seeds, caption, absolute_references(self.references, columns),
                                     marked=marked, resolution=self.resolutions[key]))
        return "\n".join(parts)

    def figures(self, figures_dir: Path) -> list[tuple[str, str, Path]]:
        """Draw every figure; returns (kind, study title, PNG path) for each one drawn."""
        drawn = []
        for key, table in self.tables.items():
            data, preset = key
            title = f"{data} / {preset}"
            records = self._records_of(data, preset)
            stem = figures_dir / _slug(data, preset)
            columns, long = headline_columns(table.columns), self._long_of(key)
            bars = plots.bar_chart(table, columns, long, self.methods, f"{title}: main table", Path(f"{stem}-bars"))
            drawn += [("bars", title, bars[0])] if bars else []
            gains = plots.gain_chart(table, columns, long, self.methods, f"{title}: gain over {RANDOM}",
                                     Path(f"{stem}-gain"))
            drawn += [("gain", title, gains[0])] if gains else []
            if isinstance(self.critical.get(key), CriticalDifference):
                paths = cd_diagram(self.critical[key], f"{title}: critical difference over the transfer columns",
                                   Path(f"{stem}-cd"))
                drawn.append(("cd", title, paths[0]))
            if self.by != "method":  # the per-run figures below draw one study's runs, one per method and seed
                continue
            for kind, paths in (
                ("loss", plots.loss_curves(records, f"{title}: pre-training loss", Path(f"{stem}-loss"))),
                ("throughput", plots.throughput_and_memory(records, f"{title}: throughput and memory",
                                                           Path(f"{stem}-throughput"))),
                ("examples", plots.examples_figure(records, self.results_dir, f"{title}: reconstructions and captions",
                                                   Path(f"{stem}-examples"))),
                ("linear-lr", plots.linear_probe_grid(records, f"{title}: linear-probe learning rates",
                                                      Path(f"{stem}-linear-lr"))),
            ):
                if paths:
                    drawn.append((kind, title, paths[0]))
        bench = [r for r in self.records if r.protocol in BENCH_PROTOCOLS]
        for preset, dev, dataset in sorted({(r.preset, _bench_device(r), r.dataset) for r in bench}):
            subset = [r for r in bench if (r.preset, _bench_device(r), r.dataset) == (preset, dev, dataset)]
            # CPU eager records keep the short name; CUDA and compiled ones say so in theirs.
            setting = dev if dataset == "synthetic" else f"{dev}, {dataset}"
            paths = plots.bench_chart(subset, f"bench: preset {preset} on {setting}",
                                      figures_dir / _slug("bench", preset, setting))
            if paths:
                drawn.append(("bench", f"bench {preset} / {setting}", paths[0]))
        return drawn

    def index(self, figures: list[tuple[str, str, Path]], reports_dir: Path) -> str:
        """``README.md``: what a person opens first."""
        lines = ["# mugbench report", "",
                 f"Rebuilt from `{self.results_dir.as_posix()}/` alone by `mugbench report`; do not edit by hand. "
                 "Full tables, margins, "
                 "what is missing and the published claims: [summary.md](summary.md) "
                 "(also [summary.csv](summary.csv), [summary.tex](summary.tex)).", ""]
        for key, table in self.tables.items():
            lines += [f"## `{key[0]}` / `{key[1]}`", ""] + self.main_table(key) + [""] + self.notes(key)
            if self.by == "method":
                lines += self.ranking_lines(key, figure="figure `cd` below")
            for kind, title, png in figures:
                if title == f"{key[0]} / {key[1]}":
                    rel = os.path.relpath(png, reports_dir)
                    lines += [f"![{kind}]({rel})", "", f"*{FIGURE_NOTES[kind]}.*", ""]
        for kind, title, png in figures:
            if kind == "bench":
                lines += [f"## {title}", "", f"![bench]({os.path.relpath(png, reports_dir)})", "",
                          f"*{FIGURE_NOTES['bench']}.*", ""]
        lines += ["## How these records were produced", ""]
        for key, d in sorted(self.details.items()):
            if self.selection.keeps_study(key):
                commits = ", ".join(c[:10] for c in d["commits"])
                encoders = "; ".join(e for e in d["encoders"] if e)
                lines += [f"- `{key[0]}` / `{key[1]}`: {d['records']} records at commit(s) {commits}; "
                          f"encoder {encoders or 'unrecorded'}. Commands:"]
                lines += [f"  - `{c}`" for c in d["commands"]]
        bench_cmds = sorted({r.command for r in self.records if r.protocol in BENCH_PROTOCOLS and r.command})
        if bench_cmds:
            lines += ["- benchmarks:"] + [f"  - `{c}`" for c in bench_cmds]
        folders = _folder_args(self.results_dir, reports_dir)
        lines += ["", f"Regenerate: `mugbench report{folders}{(' ' + self.selection.describe()) if self.selection.describe() else ''}"
                  f"{'' if self.by == 'method' else ' --by ' + self.by}`.", ""]
        return "\n".join(lines)


def _folder_args(results_dir: Path, reports_dir: Path) -> str:
    """The ``--results`` / ``--reports`` options that rebuild these folders (none for the defaults). An
    absolute reports folder is left out: the index must not depend on where a copy of it is written."""
    parts = [f" --{flag} {folder.as_posix()}" for flag, folder in (("results", results_dir), ("reports", reports_dir))
             if folder != Path(flag) and not (flag == "reports" and folder.is_absolute())]
    return "".join(parts)


def _bench_device(record: ResultRecord) -> str:
    return str(record.protocol_options.get("device", "unknown device"))


def build_report(results_dir: str | os.PathLike, *, selection: Selection = Selection(), by: str = "method") -> Report:
    """The report of the records under ``results_dir`` (malformed or foreign JSON files listed and skipped)."""
    results_dir = Path(results_dir)
    records, references, skipped = _load(results_dir)
    return Report(records, references, skipped, results_dir, by=by, selection=selection)


def write_report(results_dir: str | os.PathLike, reports_dir: str | os.PathLike, *,
                 selection: Selection = Selection(), by: str = "method", figures: bool = True,
                 report: Report | None = None) -> str:
    """Rebuild ``reports_dir`` from ``results_dir`` alone (or from ``report``, its `build_report` when
    already built); returns the Markdown summary.

    With ``figures``, the figures and the ``README.md`` index are redrawn too, and figures this build
    did not draw are removed, so the folder always matches the records; without, both are left as
    they are. Malformed or foreign JSON files are listed and skipped.
    """
    results_dir, reports_dir = Path(results_dir), Path(reports_dir)
    report = report or build_report(results_dir, selection=selection, by=by)
    summary = report.summary_markdown()
    atomic_write_text(reports_dir / "summary.md", summary)
    atomic_write_text(reports_dir / "summary.csv", tidy(report.frame).to_csv(index=False))
    atomic_write_text(reports_dir / "summary.tex", report.latex())
    if not figures:
        return summary
    drawn = report.figures(reports_dir / "figures")
    keep = {p.with_suffix(s) for _, _, p in drawn for s in (".png", ".pdf")}
    for stale in (reports_dir / "figures").glob("*"):
        if stale.suffix in (".png", ".pdf") and stale not in keep:
            stale.unlink()
    atomic_write_text(reports_dir / "README.md", report.index(drawn, reports_dir))
    return summary


__all__ = ["Report", "Selection", "build_report", "write_report"]
