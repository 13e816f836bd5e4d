"""Report layer: tables and figures rebuilt from the result records under ``results/`` alone."""

from mugbench.report.build import Report, build_report, write_report
from mugbench.report.frame import Selection, summary_frame

__all__ = ["Report", "Selection", "build_report", "summary_frame", "write_report"]
