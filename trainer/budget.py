"""train.time_budget: time the run's first steps, estimate one evaluation (forwards over a sample of
the evaluation sets, session.time_evaluation), then fix its step count so
that training, its evaluations and its checkpoints end inside the budget, the learning-rate
schedule (warm-up, then decay to zero) ending at that step. The plan is made again from the steps
since, each time a quarter of the steps it had left have run: a run's first steps are slower than
its later ones (on the 2-core CPU, 0.32 s a step over the first 20 steps of the offline encoder, 0.26 s
from step 50 on), and a machine's speed drifts.

    Budget      the clock, the timing of the first steps (rank 0), the plan (rank 0 decides, every
                rank receives it), the record kept in every checkpoint and in results.json
    plan_steps  the step count: the most steps whose training, evaluations and checkpoints fit

The clock runs from the run's first step to the end of its last evaluation: data setup and the
model's load before it, the final test scoring and export after it are outside. The seconds used
travel in every checkpoint (TrainingProgress.time_budget): a resumed run keeps its plan and the
budget left at its checkpoint (the work a crash lost after it is not counted twice).

No trainer we know plans the schedule to the budget: Lightning's `max_time` stops a run at a time
and leaves the learning rate wherever the schedule had it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from .config import ConfigError
from .engine import plan_schedule
from .progress import TrainingProgress

log = logging.getLogger("raytag")

WARMUP_STEPS = 2  # the first steps are slower (allocations, lazy initialisation): not timed
TIMED_STEPS = 20  # steps timed at most ...
TIMED_SHARE = 0.1  # ... or fewer, once the timed ones took this share of the budget (they train too)
RESERVE = 0.02  # share of the budget kept free of the plan, for noise in the timings
REPLAN_SHARE = 0.25  # plan again once this share of the steps the last plan had left have run
# and were timed (3 at least), while the steps it has left would take over TIMED_SHARE of the budget
EXACT_EPOCHS = 1000  # epochs ahead whose own step counts the plan computes; past them, their mean

# Rank 0's vote after a step (summed into the step's all-reduce; the other ranks vote 0).
TIMED, SPENT = 1.0, 2.0  # the first steps are timed: plan now; the budget ran out before a plan
RETIMED = 3.0  # the steps since the last plan are timed: plan again


class Budget:
    """One rank's view of the run's time budget (`spec`, `seconds`). `state` is the progress's
    `time_budget` record (updated in place, so every checkpoint keeps it); `leader`: this rank times
    and decides (rank 0). `steps_in(epoch)` is an epoch's step count (the global batch plan's)."""

    def __init__(
        self,
        spec: str | float,
        seconds: float,
        state: dict[str, Any],
        *,
        leader: bool,
        warmup_ratio: float,
        max_steps: int | None,
        eval_every: int | None,
        save_every: int | None,
        save_every_minutes: float | None,
        steps_in: Callable[[int], int],
    ) -> None:
        self.spec, self.seconds, self.state, self.leader = str(spec), seconds, state, leader
        self.warmup_ratio, self.max_steps = warmup_ratio, max_steps
        self.eval_every, self.save_every, self.save_every_minutes = eval_every, save_every, save_every_minutes
        self.steps_in = steps_in
        state.update(budget=self.spec, budget_seconds=seconds)
        self.start()

    @property
    def planned(self) -> int | None:
        """The planned step count (None until the first steps are timed)."""
        return self.state.get("planned_steps")

    @property
    def total_steps(self) -> int:
        """Where the run stops: its plan (train.max_steps caps it), or until planned, train.max_steps
        or no bound (`train.epochs` does not bound a budgeted run)."""
        bound = self.max_steps or 2**62
        return min(self.planned, bound) if self.planned is not None else bound

    def start(self) -> None:
        """Start the clock at the budget used so far (a resumed run's, from its checkpoint)."""
        now = time.monotonic()
        self._origin = now - float(self.state.get("seconds_used", 0.0))
        self._mark, self._paused = now, 0.0  # the last step's end; evaluation time since then
        self._restart_timing()
        self.eval_s: float | None = None  # the last evaluation's cost, its checkpoint excluded
        self.save_s: float | None = None  # the last checkpoint's cost
        self._checkpoint_at = 0.0

    def _restart_timing(self) -> None:
        self._seen, self._timed, self._timed_s = 0, 0, 0.0  # steps seen; timed, and their seconds
        self._from: int | None = None  # the step the timing started after

    def used(self) -> float:
        return time.monotonic() - self._origin

    def schedule(self, default: tuple[int, int]) -> tuple[int, int]:
        """The learning-rate schedule's (warm-up, last step): the plan's, else `default`."""
        if self.planned is None:
            return default
        return int(self.state["warmup_steps"]), self.planned

    # ---- timing: every rank calls these at the same points; rank 0's figures decide

    def vote(self, step: int) -> float:
        """After step `step` (before its all-reduce): rank 0's vote, TIMED once enough first steps are
        timed, SPENT when the budget ran out before a plan, RETIMED once a quarter of the steps the
        last plan had left are timed (REPLAN_SHARE); 0 otherwise, and always on the other ranks."""
        now = time.monotonic()
        seconds = now - self._mark - self._paused  # the step, its log line, the next epoch's set-up
        self._mark, self._paused = now, 0.0
        if not self.leader:
            return 0.0
        if self._from is None:
            self._from = step - 1
        self._seen += 1
        if self._seen > WARMUP_STEPS:
            self._timed += 1
            self._timed_s += seconds
        if self.planned is not None:
            enough = max(3, REPLAN_SHARE * (self.planned - self._from))
            ahead = (self.planned - step) * float(self.state["seconds_per_step"])  # as last planned
            return RETIMED if self._timed >= enough and ahead > TIMED_SHARE * self.seconds else 0.0
        if self.used() > self.seconds:
            return SPENT
        if self._timed >= TIMED_STEPS or (self._timed and self._timed_s >= TIMED_SHARE * self.seconds):
            return TIMED
        return 0.0

    def checkpoint(self, progress: TrainingProgress) -> None:
        """At the start of every checkpoint: the seconds used so far, into the progress it saves."""
        self._checkpoint_at = time.monotonic()
        self.state["seconds_used"] = round(self.used(), 3)
        progress.time_budget = self.state

    def evaluated(self, began: float) -> None:
        """After an evaluation and its checkpoint, begun at `began` (time.monotonic): their costs."""
        now = time.monotonic()
        at = self._checkpoint_at if self._checkpoint_at >= began else now
        self.eval_s, self.save_s = at - began, now - at
        self._paused += now - began

    def estimated(self, seconds: float, began: float) -> None:
        """After an evaluation's cost was estimated (`seconds`; session.time_evaluation), begun at `began`."""
        self.eval_s = seconds
        self._paused += time.monotonic() - began

    def saved(self, began: float) -> None:
        """After a checkpoint without an evaluation, begun at `began`: its cost."""
        now = time.monotonic()
        self.save_s = now - began
        self._paused += now - began

    @property
    def needs_evaluation(self) -> bool:
        """No evaluation timed or estimated yet (the same on every rank: they evaluate at the same steps)."""
        return self.eval_s is None

    # ---- the plan

    def decide(self, group: Any, progress: TrainingProgress, engine: Any) -> int:
        """Every rank, after rank 0's vote: rank 0 plans the step count from its timings (again, after
        RETIMED), every rank receives the plan and sets the learning-rate schedule to end there.
        Returns the step count.

        Raises ConfigError (rank 0; PeerError on the others) when the budget is too small: it ran out
        before the first steps and an evaluation were timed."""
        error: BaseException | None = None
        plan: dict[str, Any] | None = None
        was = self.planned
        if self.leader:
            try:
                plan = self._plan(progress)
            except BaseException as exc:
                error = exc
        group.agree(error)  # rank 0 failed (a budget too small): every rank raises
        plan = group.broadcast(plan)  # rank 0's, on every rank
        self.state.update(plan)
        plan_schedule(engine, plan["warmup_steps"], plan["planned_steps"])
        self._restart_timing()
        if self.leader and was is not None:
            log.info(
                "time budget %s: re-planned at step %d: %.3g s a step (timed over the %d steps since "
                "the last plan), %.1f s used; %d steps (%d before, %.3g epochs, %d more evaluations), the "
                "learning rate reaching 0 at step %d",
                self.spec,
                progress.global_step,
                plan["seconds_per_step"],
                plan["timed_steps"],
                plan["seconds_used_to_plan"],
                plan["planned_steps"],
                was,
                plan["planned_epochs"],
                plan["planned_evaluations"],
                plan["planned_steps"],
            )
        elif self.leader:
            log.info(
                "time budget %s: %.3g s a step (timed over %d steps), %.3g s an evaluation (estimated "
                "from a sample), %.1f s used; planned %d steps (%.3g epochs, %d more evaluations), warm-up %d "
                "steps, the learning rate reaching 0 at step %d%s",
                self.spec,
                plan["seconds_per_step"],
                plan["timed_steps"],
                plan["seconds_per_evaluation"],
                plan["seconds_used_to_plan"],
                plan["planned_steps"],
                plan["planned_epochs"],
                plan["planned_evaluations"],
                plan["warmup_steps"],
                plan["planned_steps"],
                "" if plan["planned_steps"] > progress.global_step else " (now: the budget is spent)",
            )
        return self.total_steps

    def _plan(self, progress: TrainingProgress) -> dict[str, Any]:
        """Rank 0: the plan from its timings at `progress`'s step (the first, or again)."""
        used, done, again = self.used(), progress.global_step, self.planned is not None
        step_s = self._timed_s / max(1, self._timed)
        if again and self.eval_s is None:  # resumed: the costs the plan it keeps measured
            self.save_s = float(self.state["seconds_per_checkpoint"])
            self.eval_s = float(self.state["seconds_per_evaluation"]) - self.save_s
        eval_s = (self.eval_s or 0.0) + (self.save_s or 0.0)
        if self.eval_s is None or (used > self.seconds and not again):
            raise ConfigError(
                f"train.time_budget {self.spec} is too small for this run: {used:.3g} s went by in its "
                f"first {self._seen} step(s){self._evaluations()}, before its speed was known (to plan, it "
                f"times {WARMUP_STEPS} + up to {TIMED_STEPS} steps and estimates one evaluation)"
            )
        # less the checkpoint that keeps the first plan (its cost: known by the next plan)
        left = self.seconds * (1 - RESERVE) - used - (0.0 if again else self.save_s or 0.0)
        if self.save_every_minutes:  # a checkpoint every so many minutes: their share of the time
            left /= 1 + (self.save_s or 0.0) / (60 * self.save_every_minutes)
        ends = epoch_ends(done, progress.epoch, progress.step_in_epoch, self.steps_in)
        steps, evaluations = plan_steps(
            done,
            left,
            step_s,
            eval_s,
            self.save_s or 0.0,
            ends,
            self.eval_every,
            self.save_every,
            self.max_steps,
        )
        if steps == done:
            log.warning(
                "time budget %s: its first steps and evaluation used %.1f s, and one more step with an "
                "evaluation does not fit: the run ends at step %d",
                self.spec,
                used,
                done,
            )
        return {
            "planned_steps": steps,
            "warmup_steps": int(round(self.warmup_ratio * steps)),
            "planned_epochs": round(
                epoch_at(steps, done, progress.epoch, progress.step_in_epoch, self.steps_in), 4
            ),
            "planned_evaluations": evaluations,
            "seconds_per_step": round(step_s, 4),
            "seconds_per_evaluation": round(eval_s, 4),  # with its checkpoint
            "seconds_per_checkpoint": round(self.save_s or 0.0, 4),
            "timed_steps": self._timed,
            "planned_at_step": done,
            "seconds_used_to_plan": round(used, 3),
            "replans": int(self.state.get("replans", -1)) + 1,  # plans made again after the first
        }

    def _evaluations(self) -> str:
        if self.eval_s is None:
            return ""
        return f" and an evaluation's estimate ({self.eval_s:.3g} s)"

    def finish(self, progress: TrainingProgress) -> None:
        """At the end of training: the seconds used and left, for results.json (and logged)."""
        used = self.used()
        self.state.update(seconds_used=round(used, 3), seconds_left=round(self.seconds - used, 3))
        self.state["steps"] = progress.global_step
        progress.time_budget = self.state
        if self.leader:
            log.info(
                "time budget %s: trained to step %d%s in %.1f s, %.1f s left",
                self.spec,
                progress.global_step,
                " as planned" if progress.global_step == self.planned else "",
                used,
                self.seconds - used,
            )


def plan_steps(
    done: int,
    seconds: float,
    step_s: float,
    eval_s: float,
    save_s: float,
    epoch_ends: Iterator[int],
    eval_every: int | None,
    save_every: int | None,
    cap: int | None,
) -> tuple[int, int]:
    """The last step a run now at step `done` can reach in `seconds`, and the evaluations that takes.

    Each step costs `step_s`; an evaluation with its checkpoint `eval_s`, at each epoch end
    (`epoch_ends`: ascending global steps), every `eval_every` steps and at the last step; a
    checkpoint alone `save_s`, every `save_every` steps. At most `cap` steps. Between two such
    events the cost grows by `step_s` a step, so the answer is the last step, in the first interval
    where the next event no longer fits, whose steps and final evaluation fit.
    """
    step_s = max(step_s, 1e-9)
    events = _events(done, epoch_ends, eval_every, save_every)
    spent, last, evaluations = 0.0, done, 0  # the events before `last`; `last` is the latest that fits
    fits = done
    for step, evaluates in events:
        fits = done + math.floor((seconds - spent - eval_s) / step_s)  # ending in (last, step]
        if fits <= step or (cap is not None and step >= cap):
            break
        spent += eval_s if evaluates else save_s
        last, evaluations = step, evaluations + evaluates
    end = max(fits, last)
    if cap is not None:
        end = min(end, max(cap, done))
    return end, evaluations + (end > last)


def _events(
    done: int, epoch_ends: Iterator[int], eval_every: int | None, save_every: int | None
) -> Iterator[tuple[int, bool]]:
    """(step, evaluates) after `done`, ascending, one per step: evaluations at epoch ends and every
    `eval_every` steps, checkpoints alone every `save_every` steps."""

    def every(n: int | None, evaluates: bool) -> Iterator[tuple[int, bool]]:
        if n is not None:
            for k in itertools.count(done // n + 1):
                yield k * n, evaluates

    merged = heapq.merge(
        ((s, True) for s in epoch_ends),
        every(eval_every, True),
        every(save_every, False),
        key=lambda e: (e[0], not e[1]),
    )
    previous = done
    for step, evaluates in merged:
        if step > previous:  # an evaluation, sorted first, stands for a checkpoint at the same step
            previous = step
            yield step, evaluates


def epoch_ends(done: int, epoch: int, into: int, steps_in: Callable[[int], int]) -> Iterator[int]:
    """The global steps at which epochs end, from a run at step `done`, `into` steps into `epoch`:
    each epoch's own step count for EXACT_EPOCHS epochs, then their mean (computing every plan of a
    tiny data set's thousands of epochs would cost more than it tells)."""
    step, counts = done - into, list[int]()
    for e in itertools.count(epoch):
        n = steps_in(e) if len(counts) < EXACT_EPOCHS else round(sum(counts) / len(counts))
        counts.append(n)
        step += max(1, n)
        yield step


def epoch_at(step: int, done: int, epoch: int, into: int, steps_in: Callable[[int], int]) -> float:
    """The epoch (fractional) that step `step` reaches, from a run at step `done`, `into` steps into `epoch`."""
    start = done - into
    for e, end in enumerate(epoch_ends(done, epoch, into, steps_in), start=epoch):
        if step < end:
            return e + (step - start) / max(1, end - start)
        start = end
    raise AssertionError("unreachable")  # pragma: no cover - epoch_ends never ends
