"""Experiment trackers (`mugbench run --report-to tensorboard,wandb`): each run's training curves and
evaluation metrics, written where TensorBoard or Weights & Biases read them.

Per run (one method, one seed) a `Tracker` gets every row the trainer logs (`train.loop.train`'s
``on_log``: loss and each loss part the method returns, learning rate, images/s, epoch) and, after each
protocol, its headline metrics at the run's last pre-training step. TensorBoard events go to
``RUN_DIR/tensorboard/`` (``tensorboard --logdir WORKDIR`` shows every run); wandb runs offline only, into
``RUN_DIR/wandb/`` (``wandb sync`` uploads them later), as nothing here should need a network or a login.
A resumed run adds a new event file next to the first one.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .config import ConfigError

# Tracker name -> the package it needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(names) -> None:
    """Refuse, before any work, a tracker name mugbench does not know or one whose package is not
    installed (`ConfigError`, one paragraph saying what to do)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to {name!r} is not a tracker mugbench writes to: the trackers are "
                              f"{' and '.join(TRACKERS)} (comma-separated for both, e.g. --report-to tensorboard), "
                              f"or leave --report-to out to write only metrics.jsonl and the result records.")
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            extra = " (it is in mugbench's dev extra: pip install -e '.[dev]')" if name == "tensorboard" else \
                " (runs are written offline; `wandb sync` uploads them later)"
            raise ConfigError(f"--report-to {name} needs the {package} package, which is not installed in this "
                              f"Python: pip install {package}{extra}, or leave {name} out of --report-to. "
                              f"Nothing was started.")


class _TensorBoard:
    """TensorBoard events through torch's ``SummaryWriter``, opened on the first scalar (so a run with
    nothing to log, or one that stops before training, leaves no empty event file)."""

    def __init__(self, run_dir: Path):
        self.folder, self.writer = Path(run_dir) / "tensorboard", None

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Write ``values`` (tag -> number) at ``step``."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.folder))
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()


class _Wandb:
    """A Weights & Biases run in offline mode, started on the first scalar, under ``RUN_DIR/wandb/``."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        self.run_dir, self.run_name, self.config, self.run = Path(run_dir), run_name, config, None

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log ``values`` (key -> number) at ``step``."""
        if self.run is None:
            import wandb

            self.run = wandb.init(project="mugbench", name=self.run_name, dir=str(self.run_dir), config=self.config,
                                  mode="offline", reinit=True)
        self.run.log(values, step=step)

    def close(self) -> None:
        """Finish the run (its files stay for `wandb sync`)."""
        if self.run is not None:
            self.run.finish()


class Tracker:
    """The trackers ``names`` (see `TRACKERS`; none: every call does nothing) of one run in ``run_dir``;
    a context manager that closes them. ``run_name`` and ``config`` describe the run to wandb."""

    def __init__(self, names, run_dir: Path, *, run_name: str = "", config: dict | None = None):
        check_report_to(names)
        self.sinks = [_TensorBoard(run_dir) if name == "tensorboard" else _Wandb(run_dir, run_name, config or {})
                      for name in dict.fromkeys(names)]

    def log_train(self, row: dict[str, Any]) -> None:
        """One trainer metrics row (``step`` and numbers): each number as ``train/<key>`` at its step."""
        values = {f"train/{k}": float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for sink in self.sinks:
            sink.scalars(values, int(row["step"]))

    def log_eval(self, protocol: str, dataset: str, metrics: dict[str, float], step: int) -> None:
        """A protocol's headline metrics as ``eval/<protocol>/<dataset>/<metric>`` at pre-training ``step``."""
        from .report.frame import headline_columns  # the main table's choice of a protocol's metrics

        shown = {metric for _, _, metric in headline_columns((protocol, dataset, k) for k in metrics)}
        values = {f"eval/{protocol}/{dataset}/{k}": float(v) for k, v in metrics.items() if k in shown}
        for sink in self.sinks:
            sink.scalars(values, step)

    def close(self) -> None:
        """Close every tracker (the events are on disk afterwards)."""
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
