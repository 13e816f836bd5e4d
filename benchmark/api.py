"""The Python API: a study, its results as a DataFrame, and a method to experiment with, from a notebook.

`run` is `mugbench run`: it goes through the command line's own parser and code, so that every option
and check is the same in both (keyword ``report_to="tensorboard"`` is ``--report-to tensorboard``).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import pandas as pd

# Columns of `load_results`: one row per (record, metric).
RESULT_COLUMNS = ["pretrain_data", "preset", "paradigm", "method", "protocol", "dataset", "metric", "seed", "value",
                  "created", "git_commit"]


def _flags(options: Mapping[str, Any]) -> list[str]:
    """``{"seeds": [0, 1], "fresh": True, "set": {"train.epochs": 2}}`` -> ``--seeds 0,1 --fresh --set train.epochs=2``."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif key == "set":
            items = (f"{k}={v}" for k, v in value.items()) if isinstance(value, Mapping) else map(str, value)
            for item in items:  # an item without "=" is the command's own ConfigError
                argv += [flag, item]
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return argv


def run(methods: Iterable[str] | str | None = None, **options: Any) -> pd.DataFrame:
    """Pre-train and evaluate ``methods`` as `mugbench run` does; returns the records written, as
    `load_results` gives them (this run's results folder, all studies in it).

    Keywords are the command's options: ``data``, ``preset``, ``seeds`` (a list), ``evals`` (a list),
    ``set`` (a dict of study keys, e.g. ``{"train.epochs": 2}``), ``workdir``, ``results``, ``reports``,
    ``cache_dir``, ``data_root``, ``fresh``, ... Bad input raises the exception the command would report
    (a `mugbench.config.ConfigError`, `FileNotFoundError`, ...), before anything is written.
    """
    from .cli import _cmd_run, _parser

    if methods is not None:
        options = {"methods": methods if isinstance(methods, str) else list(methods), **options}
    args = _parser().parse_args(["run", *_flags(options)])
    _cmd_run(args)
    return load_results(args.results)


def load_results(results: str | os.PathLike = "results", summary: bool = False) -> pd.DataFrame:
    """The result records under ``results`` as a DataFrame: one row per (record, metric) with
    `RESULT_COLUMNS`; with ``summary``, the report's aggregate instead (one row per study, method,
    protocol, dataset and metric: ``mean``, ``std`` over seeds, ``n`` seeds). Duplicate records of one
    (study, method, protocol, dataset, seed) count once, the latest, as in the report."""
    from .report.frame import long_frame, summary_frame
    from .report.tables import tidy
    from .results import load_records

    records = load_records(results)
    long = long_frame(records)
    if summary:
        return tidy(summary_frame(records, long=long))
    return long[RESULT_COLUMNS].reset_index(drop=True)


def build_method(name: str, preset: str | os.PathLike = "toy", overrides: Iterable[str] = (), vocab=None):
    """A registered method (`mugbench methods` lists them) around the study's freshly initialised encoder,
    exactly as `mugbench run` builds it for pre-training: ``method(batch)`` returns its losses,
    ``method.encoder`` is the timm ViT. ``overrides`` are ``--set`` strings (``"methods.mae.mask_ratio=0.5"``);
    ``vocab`` a list of BPE ids for a compact caption vocabulary (default: open_clip's full BPE)."""
    from .config import load_config
    from .data.pretrain import text_spec
    from .data.tokenizer import TextTokenizer
    from .runs import build_method as build

    cfg = load_config(str(preset), list(overrides))
    tokenizer = TextTokenizer(cfg.text.context_length, vocab)
    return build(name, cfg, text_spec(cfg, tokenizer))


__all__ = ["RESULT_COLUMNS", "build_method", "load_results", "run"]
