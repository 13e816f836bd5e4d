"""Progress of a study in a log (plain lines, no carriage returns, each phase's place and the time left) and
its experiment trackers (`--report-to tensorboard`)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm.auto import tqdm

from mugbench.config import ConfigError, load_config
from mugbench.progress import LineProgress, progress_bar, set_phase
from mugbench.study_plan import PRETRAIN, StudyPlan
from mugbench.trackers import check_report_to


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(total: int, seconds_per_step: float, **options) -> list[str]:
    """What a `LineProgress` writes for ``total`` steps of ``seconds_per_step`` each."""
    clock, out = Clock(), io.StringIO()
    with progress_bar(total, desc="fine-tuning", unit="step", stream=out, clock=clock, **options) as bar:
        for _ in range(total):
            clock.now += seconds_per_step
            bar.update()
    assert "\r" not in out.getvalue()
    return out.getvalue().splitlines()


def test_a_log_gets_a_line_per_tenth_of_a_slow_loop_and_one_line_for_a_quick_one():
    # One step a second: a line at each tenth (ten seconds apart), the last one not repeated on close.
    lines = _lines(100, 1.0)
    assert [line.split(" [")[0] for line in lines] == [f"fine-tuning: {p}% {p}/100" for p in range(10, 101, 10)]
    # A whole loop within the minimum gap: only the closing line.
    assert len(_lines(100, 0.01)) == 1 and _lines(100, 0.01)[0].startswith("fine-tuning: 100% 100/100")
    # Steps longer than the period: a line after each, though no tenth was crossed.
    assert [line.split(" [")[0] for line in _lines(1000, 40.0)[:3]] == [
        f"fine-tuning: 0% {n}/1000" for n in (1, 2, 3)]


def test_line_progress_keeps_tqdm_postfix_resume_point_and_the_running_phase():
    clock, out = Clock(), io.StringIO()
    set_phase("mae 2/6 · finetune 3/4")
    try:
        bar = progress_bar(8, initial=6, desc="fine-tuning", unit="step", stream=out, clock=clock)
    finally:
        set_phase(None)
    assert isinstance(bar, LineProgress)
    clock.now = 4.0
    bar.set_postfix(loss=0.5, top1="12.5 ")
    bar.update(2)
    bar.close()
    bar.close()  # once only
    assert out.getvalue() == ("[mae 2/6 · finetune 3/4] fine-tuning: 100% 8/8 [00:04<00:00,  2.00s/step, "
                              "loss=0.5, top1=12.5]\n")


def test_a_terminal_gets_tqdm_and_a_disabled_bar_shows_nothing():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, log = Terminal(), io.StringIO()
    with progress_bar(4, desc="x", stream=terminal) as bar:
        assert isinstance(bar, tqdm)
        bar.update(4)
    with progress_bar(4, desc="x", stream=log, disable=True) as bar:
        bar.update(4)
    assert "\r" in terminal.getvalue() and log.getvalue() == ""


def test_the_plan_places_each_phase_and_estimates_the_time_left_from_finished_ones():
    cfg = load_config("smoke", ["eval.protocols=[knn, linear, reconstruction]"])
    clock = Clock()
    plan = StudyPlan(cfg, ["mae", "random", "supervised"], [0, 1], clock=clock)
    plan.leave_out("supervised")  # not applicable to the data: gone from the count
    assert plan.place(0, "mae", PRETRAIN) == "mae seed 0, 1/4 · pre-training"
    assert plan.place(0, "mae", "reconstruction", "toy-caps") == "mae seed 0, 1/4 · reconstruction 3/3"
    assert plan.place(1, "random", "linear", "toy-cls") == "random seed 1, 4/4 · linear 2/2"  # no reconstruct
    assert "estimated once a phase has finished" in plan.outlook()
    assert plan.begin(0, "mae", PRETRAIN) == "mae seed 0, 1/4 · pre-training"
    clock.now = 10.0
    plan.end()
    # No evaluation finished yet: they are counted, not guessed from pre-training.
    assert plan.outlook() == ("study: 10 s so far, more than 10 s left (estimate from 1 finished phase; "
                              "10 evaluations not timed yet)")
    plan.begin(0, "mae", "knn", "toy-cls")
    clock.now = 12.0
    plan.end()
    plan.mark_done(1, "mae", "knn", "toy-cls")  # recorded before an interruption: not to run
    # Left: one pre-training (10 s) and eight evaluations, knn's 2 s each (the evaluations' mean, for the
    # kinds none of which has finished).
    assert plan.estimate_left()[:3] == (10 + 8 * 2, 2, 0)
    assert plan.outlook() == "study: 12 s so far, about 26 s left (estimate from 2 finished phases)"
    plan.begin(0, "mae", "linear", "toy-cls")
    clock.now = 15.0  # 3 s into a phase estimated at 2 s
    assert plan.estimate_left().seconds == 10 + 7 * 2
    plan.end(timed=False)  # not typical: kept out of the estimate
    assert plan.estimate_left()[:2] == (10 + 7 * 2, 2)


def test_unknown_or_missing_trackers_are_refused_in_one_paragraph():
    with pytest.raises(ConfigError, match=r"'tensorbored' is not a tracker .* tensorboard and wandb"):
        check_report_to(["tensorbored"])
    check_report_to(["tensorboard"])  # installed with the dev extra
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="--report-to wandb needs the wandb package, which is not installed"):
            check_report_to(["wandb"])


def _mugbench(*args: str, root: Path, log: Path) -> int:
    """`mugbench ARGS` in ``root`` with stdout and stderr redirected to the file ``log`` (not a terminal)."""
    env = dict(os.environ, MUGBENCH_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1")
    env.pop("MUGBENCH_DATA", None)
    with open(log, "wb") as out:
        return subprocess.run([sys.executable, "-m", "mugbench.cli", *args], cwd=root, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=600).returncode


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A two-method smoke run (mae pre-trains two steps, random does not) with three protocols and
    TensorBoard, its output redirected to a file as a batch job's is: ``(root, exit code, log bytes)``."""
    root = tmp_path_factory.mktemp("logged")
    code = _mugbench("run", "--preset", "smoke", "--methods", "mae,random", "--evals", "knn,linear,finetune",
                     "--set", "train.epochs=0.25", "--report-to", "tensorboard", root=root, log=root / "run.log")
    return root, code, (root / "run.log").read_bytes()


def test_a_redirected_run_logs_each_phase_with_its_place_and_no_carriage_return(logged_run):
    root, code, raw = logged_run
    text = raw.decode()
    assert code == 0, text[-3000:]
    assert b"\r" not in raw
    assert "toy world: generating 560 samples" in text  # instead of seconds of silence
    places = ["[mae 1/2 · pre-training] mae on toy", "[mae 1/2 · knn 1/3] knn on toy-cls",
              "[mae 1/2 · linear 2/3] linear on toy-cls", "[mae 1/2 · finetune 3/3] finetune on toy-cls",
              "[random 2/2 · knn 1/3] knn on toy-cls", "[random 2/2 · linear 2/3] linear on toy-cls",
              "[random 2/2 · finetune 3/3] finetune on toy-cls"]
    at = [text.find(place) for place in places]
    assert -1 not in at and at == sorted(at), at  # every phase, in the plan's order
    assert text.count("left (estimate from") == len(places) - 1  # every phase after the first
    # The progress of pre-training, the probe and fine-tuning, under their phase's place.
    for line in ("[mae 1/2 · pre-training] mae: 100% 2/2", "[mae 1/2 · linear 2/3] linear probe: 100% 5/5",
                 "[random 2/2 · finetune 3/3] fine-tuning: 100% 4/4"):
        assert line in text
    assert "| mae |" in text and "| random |" in text  # it ended with the table


def test_report_to_tensorboard_writes_the_losses_and_the_protocol_metrics(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = logged_run[0]
    (run_dir,) = (root / "runs" / "toy" / "smoke").glob("mae-seed0-*")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/recon", "train/lr", "train/images_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [2]  # smoke logs every 2 steps; 2 steps trained
    (knn,) = events.Scalars("eval/knn/toy-cls/top1")
    (record,) = (root / "results").rglob("mae/knn*.json")
    assert knn.step == 2 and knn.value == pytest.approx(json.loads(record.read_text())["metrics"]["top1"])


def test_an_unknown_tracker_stops_the_run_before_any_work(tmp_path):
    log = tmp_path / "run.log"
    assert _mugbench("run", "--preset", "smoke", "--methods", "mae", "--report-to", "tensorboard,tensorbored",
                     root=tmp_path, log=log) == 2
    text = log.read_text()
    assert "mugbench: error: --report-to 'tensorbored' is not a tracker" in text and "Traceback" not in text
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_segmentation_shows_its_iterations(capsys):
    from mugbench.testing import CHECK_OPTIONS, check_protocol

    check_protocol("segmentation", options=CHECK_OPTIONS["segmentation"])
    err = capsys.readouterr().err
    assert "segmentation: 100% 4/4" in err and "\r" not in err
