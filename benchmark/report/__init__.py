"""Report layer: tables (and plots) rebuilt from the result records under ``results/``."""

from mugbench.report.tables import render_markdown, summary_frame, write_report

__all__ = ["render_markdown", "summary_frame", "write_report"]
