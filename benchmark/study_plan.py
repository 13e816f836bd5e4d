"""Where a study run stands: its phases in order, each one's place (``mae 2/6 · finetune 3/4``), and an
estimate of the time the rest will take.

The plan is every (seed, method) run of one `mugbench run`, seed by seed in the order of ``--methods``,
each with its phases: pre-training (for a method that pre-trains) and the protocols the harness will run
on it (`eval.harness.planned`). Evaluations recorded before an interruption stay in the plan as done, so
places do not move when a run resumes; a method that is not applicable to the data leaves it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

from .config import StudyConfig
from .eval.harness import planned
from .progress import set_phase
from .registry import get_method

PRETRAIN = "pre-training"


@dataclass
class Phase:
    """One step of a run: pre-training or one protocol on one set; its measured seconds once finished."""

    kind: str  # PRETRAIN or a protocol name
    dataset: str = ""
    done: bool = False
    seconds: float | None = None  # None: not finished, or finished too fast to be typical (resumed)


def format_seconds(seconds: float) -> str:
    """``45 s``, ``12 min 5 s``, ``3 h 20 min``: a duration as a log line states it."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class StudyPlan:
    """The phases of a study run; `begin` and `end` move through them and time them.

    ``clock`` (seconds, monotonic) is a parameter so that tests can drive it.
    """

    def __init__(self, cfg: StudyConfig, methods: list[str], seeds: list[int], *, clock=time.monotonic):
        self.clock, self.several_seeds = clock, len(seeds) > 1
        self.runs: dict[tuple[int, str], list[Phase]] = {}
        for seed in seeds:
            for name in methods:
                cls = get_method(name)
                self.runs[(seed, name)] = ([Phase(PRETRAIN)] if cls.pretrains else []) + \
                    [Phase(protocol, dataset) for protocol, dataset in planned(cfg, cls)]
        self.started = clock()
        self.current: tuple[Phase, float] | None = None

    def leave_out(self, method: str) -> None:
        """Drop ``method`` from every seed (it is not applicable to the data: it will not run)."""
        self.runs = {key: phases for key, phases in self.runs.items() if key[1] != method}

    def _phase(self, seed: int, method: str, kind: str, dataset: str) -> Phase:
        """The plan's phase, added if the plan did not foresee it (the plan informs; it never stops a study)."""
        phases = self.runs.setdefault((seed, method), [])
        for phase in phases:
            if phase.kind == kind and phase.dataset == dataset:
                return phase
        phases.append(Phase(kind, dataset))
        return phases[-1]

    def mark_done(self, seed: int, method: str, kind: str, dataset: str = "") -> None:
        """Note a phase as finished before this process started (a record from before an interruption)."""
        self._phase(seed, method, kind, dataset).done = True

    def place(self, seed: int, method: str, kind: str, dataset: str = "") -> str:
        """``mae 2/6 · finetune 3/4``: the run's place among the runs (``mae seed 1, 8/18`` with several
        seeds) and the phase's among the run's protocols (pre-training is just named)."""
        phase = self._phase(seed, method, kind, dataset)
        keys = list(self.runs)
        run = f"{method}{f' seed {seed},' if self.several_seeds else ''} {keys.index((seed, method)) + 1}/{len(keys)}"
        if kind == PRETRAIN:
            return f"{run} · {PRETRAIN}"
        evals = [p for p in self.runs[(seed, method)] if p.kind != PRETRAIN]
        return f"{run} · {kind} {[p is phase for p in evals].index(True) + 1}/{len(evals)}"

    def begin(self, seed: int, method: str, kind: str, dataset: str = "") -> str:
        """Start a phase's clock, name it as the running phase for progress bars (`progress.set_phase`),
        and return its place."""
        label = self.place(seed, method, kind, dataset)
        self.current = (self._phase(seed, method, kind, dataset), self.clock())
        set_phase(label)
        return label

    def end(self, timed: bool = True) -> None:
        """Finish the running phase; ``timed=False`` keeps its seconds out of the estimate (a pre-training
        that only loaded its finished checkpoint)."""
        if self.current is None:
            return
        phase, start = self.current
        phase.done, self.current = True, None
        if timed:
            phase.seconds = self.clock() - start
        set_phase(None)

    def estimate_left(self) -> Estimate | None:
        """What the unfinished phases will take (`Estimate`): each phase as long as the mean of the
        finished phases of its kind, or else of its family (pre-training, evaluation), less what the running
        one has already taken; phases of a family none has finished yet are counted apart, not guessed.
        None before any phase finished."""
        finished = [p for phases in self.runs.values() for p in phases if p.seconds is not None]
        if not finished:
            return None
        times: dict[str, list[float]] = {}
        for p in finished:  # by kind and by family (pre-training is both)
            for key in dict.fromkeys((p.kind, _family(p.kind))):
                times.setdefault(key, []).append(p.seconds)

        def typical(kind: str) -> float | None:
            found = times.get(kind) or times.get(_family(kind))
            return sum(found) / len(found) if found else None

        left, unknown = 0.0, []
        for phases in self.runs.values():
            for p in phases:
                if not p.done:
                    seconds = typical(p.kind)
                    left += seconds or 0.0
                    unknown += [] if seconds is not None else [p]
        if self.current is not None and typical(self.current[0].kind) is not None:
            phase, start = self.current
            left -= min(self.clock() - start, typical(phase.kind))
        return Estimate(max(left, 0.0), len(finished), len(unknown), _family(unknown[0].kind) if unknown else "")

    def outlook(self) -> str:
        """``study: 3 min 5 s so far, about 9 min 40 s left (estimate from 7 finished phases)``; ``more than``
        and the count of phases not yet estimated while a family has none finished."""
        so_far = f"study: {format_seconds(self.clock() - self.started)} so far"
        estimate = self.estimate_left()
        if estimate is None:
            return f"{so_far}, time left estimated once a phase has finished"
        n = estimate.finished
        basis = f"estimate from {n} finished phase{'s' if n != 1 else ''}"
        if not estimate.unestimated:
            return f"{so_far}, about {format_seconds(estimate.seconds)} left ({basis})"
        m = estimate.unestimated
        return (f"{so_far}, more than {format_seconds(estimate.seconds)} left ({basis}; {m} "
                f"{estimate.family}{'s' if m != 1 else ''} not timed yet)")


class Estimate(NamedTuple):
    """The time a study's unfinished phases will take, as `StudyPlan.estimate_left` reckons it."""

    seconds: float  # of the phases that could be estimated
    finished: int  # finished phases it is reckoned from
    unestimated: int  # unfinished phases of a family none has finished yet: not in ``seconds``
    family: str  # theirs ("evaluation" or "pre-training"), "" when there are none


def _family(kind: str) -> str:
    """``pre-training`` for pre-training, ``evaluation`` for every protocol."""
    return PRETRAIN if kind == PRETRAIN else "evaluation"
