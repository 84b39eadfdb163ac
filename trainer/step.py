"""Training steps: the epochs of optimizer steps (`train_epochs`), one step (`train_step`) and
the training log.

Each step: this rank's micro-batches of the global plan -> forward/backward/step, then one
all-reduce of the step's figures, stop requests and rank 0's timers; after it, maybe an
evaluation and a checkpoint (session.py), maybe a stop. With train.time_budget, rank 0's vote in
the same all-reduce says when the first steps are timed: every rank then takes rank 0's plan of
the step count (budget.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from . import dist
from .batching import StepPlan
from .budget import RETIMED, TIMED
from .evaluate import collate
from .faults import inject_fault
from .features import IGNORE, Window
from .flops import mfu, rounded
from .progress import TrainingProgress
from .session import Notices, Session, evaluate_and_save, publish_metrics, save, stop_here, time_evaluation
from .stopping import STOP

log = logging.getLogger("raytag")

# A step's phases as named ranges (`torch.profiler.record_function`) for bench/profile_step.py and
# any torch.profiler trace of a run; with no profiler running a range costs ~10 us (5 a step).
PHASES = {
    "data": "raytag.data",  # the micro-batch's windows read and collated into tensors
    "forward": "raytag.forward",  # forward and the summed token loss
    "backward": "raytag.backward",
    "optimizer": "raytag.optimizer",  # engine.step(): clipping, AdamW, the schedule, zeroed gradients
    "collectives": "raytag.collectives",  # the step's one all-reduce of its figures
}


def train_epochs(
    s: Session,
    progress: TrainingProgress,
    epoch_plan: Callable[[int], StepPlan],
    total_steps: int,
    notices: Notices | None,
    group: Any,
) -> None:
    """Train from `progress` to step `total_steps`: evaluate and checkpoint where due, stop where asked.
    With a time budget (`s.budget`) that has no plan yet, `total_steps` is a bound and the plan,
    made once the first steps are timed, sets the step count.

    Raises `stopping.Preempted` after a stop request, once that step's checkpoint is uploaded, and
    ConfigError when the time budget runs out before its first steps and an evaluation are timed.
    """
    tc, engine, reader, clock, budget = s.cfg.train, s.engine, s.reader, s.clock, s.budget
    world = group.world
    if budget is not None:
        budget.start()
    window = _Window()
    engine.module.train()
    epoch = progress.epoch
    stop = progress.global_step >= total_steps
    while not stop:
        plan = epoch_plan(epoch)
        reader.start_epoch(epoch)
        record = progress.note_world(epoch, world)
        for i in range(progress.step_in_epoch, len(plan.steps)):
            inject_fault(group.rank, progress.global_step + 1, "step")
            t0 = time.monotonic()
            mine = train_step(
                engine, reader.windows, plan.steps[i], plan.labelled[i], world, s.pad_id, s.device
            )
            # rank 0: the first steps are timed (and the later ones, to plan again)
            timed = budget.vote(progress.global_step + 1) if budget is not None else 0.0
            # one all-reduce per step: the figures, any rank's stop request, rank 0's timers and vote
            with record_function(PHASES["collectives"]):
                loss, tokens, windows, squares, stops, due, poll, timed = dist.all_sum(
                    [*(float(x) for x in mine), float(STOP.requested), *clock.votes(), timed]
                )
            why_save = f"{tc.save_every_minutes:g} minutes since the last checkpoint" if due else None
            if poll:  # every rank together: the launcher's notices (Ray: a barrier of its own)
                drain = notices() if notices is not None else None
                more_stops, drains = dist.all_sum([float(STOP.requested), float(drain is not None)])
                stops += more_stops
                if drains:
                    why_save = drain or "a node drain notice on another rank"
            progress.step_in_epoch, progress.global_step = i + 1, progress.global_step + 1
            progress.tokens_seen += int(tokens)
            progress.windows_seen += int(windows)
            record["windows"] += int(windows)
            progress.epoch_loss += loss
            progress.epoch_labelled += plan.labelled[i]
            seconds = time.monotonic() - t0
            progress.train_seconds += seconds
            flops = s.flops.train_flops(tokens, squares)
            progress.train_flops += flops
            window.add(loss, plan.labelled[i], tokens, flops, seconds)
            gs = progress.global_step
            epoch_f = epoch + (i + 1) / len(plan.steps)
            logged = gs % tc.log_every == 0 or gs == total_steps
            if logged:
                _log_train(s, window, progress, epoch_f)
            end_of_epoch = i + 1 == len(plan.steps)
            if end_of_epoch:
                progress.epoch, progress.step_in_epoch = epoch + 1, 0
            if timed and budget is not None:  # plan the step count (after estimating an evaluation)
                if timed == TIMED and budget.needs_evaluation:
                    began = time.monotonic()
                    budget.estimated(time_evaluation(s), began)
                total_steps = budget.decide(group, progress, engine)
                s.view.set_total(total_steps)
                if gs == total_steps and not logged:  # the last step's learning rate (0) in the log
                    _log_train(s, window, progress, epoch_f)
                if timed != RETIMED:  # a crash must not lose the first plan: a checkpoint keeps it
                    why_save = why_save or "it keeps the time budget's plan"
            stop = gs >= total_steps
            if end_of_epoch or stop or (tc.eval_every is not None and gs % tc.eval_every == 0):
                _evaluate_and_save(s, progress, epoch_f)
            elif (tc.save_every is not None and gs % tc.save_every == 0) or why_save or stops:
                if why_save and not stops:
                    log.info("checkpoint at step %d: %s", gs, why_save)
                _save(s, progress)
            if stops:
                stop_here(s, progress, total_steps)
            if stop:
                break
        epoch += 1
    if budget is not None:
        budget.finish(progress)
    s.view.close()


def _evaluate_and_save(s: Session, progress: TrainingProgress, epoch_f: float) -> None:
    """An evaluation and its checkpoint, timed for the time budget (if any)."""
    began = time.monotonic()
    evaluate_and_save(s, progress, epoch_f)
    if s.budget is not None:
        s.budget.evaluated(began)


def _save(s: Session, progress: TrainingProgress) -> None:
    """A checkpoint without an evaluation, timed for the time budget (if any)."""
    began = time.monotonic()
    save(s, progress, {})
    if s.budget is not None:
        s.budget.saved(began)


def train_step(
    engine,
    windows_of: Callable[[list[int]], list[Window]],
    micro_batches: list[list[int]],
    step_labelled: int,
    world: int,
    pad_id: int,
    device: torch.device,
) -> tuple[float, int, int, int]:
    """Forward/backward over this rank's micro-batches of one optimizer step, then the step.

    Returns this rank's summed token loss, real tokens, windows and the sum of the windows'
    squared lengths (attention's FLOPs grow with it). The loss is normalised by the
    step's global count of labelled tokens (`step_labelled`, all ranks), times `world` because
    DeepSpeed averages gradients over ranks: N workers compute the gradient one worker computes
    over the same global batch.
    """
    loss_sum, tokens, windows, squares = 0.0, 0, 0, 0
    for micro in micro_batches:
        with record_function(PHASES["data"]):
            if micro:
                ws = windows_of(micro)
                batch = collate(ws, range(len(ws)), pad_id, device)
                tokens += sum(len(w) for w in ws)
                squares += sum(len(w) ** 2 for w in ws)
                windows += len(micro)
            else:  # this rank ran out of batches: a zero-weight dummy keeps collectives in step
                batch = collate([_DUMMY], [0], pad_id, device)
                batch["labels"].fill_(IGNORE)
            labels = batch.pop("labels")
        with record_function(PHASES["forward"]):
            logits = engine(**batch).logits.float()
            ce = torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE, reduction="sum"
            )
            if not bool((labels != IGNORE).any()):
                ce = logits.sum() * 0.0
        with record_function(PHASES["backward"]):
            engine.backward(ce * world / max(1, step_labelled), scale_wrt_gas=False)
        with record_function(PHASES["optimizer"]):
            engine.step()
        loss_sum += float(ce.detach())
    return loss_sum, tokens, windows, squares


# Two tokens with no label: the input of a rank's empty micro-batch (its loss is multiplied by 0).
_DUMMY = Window(
    0,
    np.asarray([0, 2], np.int32),
    np.full(2, IGNORE, np.int32),
    np.zeros(0, np.int32),
    np.zeros(0, np.int32),
)


class _Window:
    """Training figures since the last log line. Its seconds are the steps' own: an evaluation or a
    checkpoint between two log lines is not training time (tokens/s and MFU do not dip after one)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.labelled, self.tokens, self.flops, self.seconds = 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, loss: float, labelled: int, tokens: float, flops: float, seconds: float) -> None:
        self.loss += loss
        self.labelled += labelled
        self.tokens += tokens
        self.flops += flops
        self.seconds += seconds


def _log_train(s: Session, window: _Window, progress: TrainingProgress, epoch_f: float) -> None:
    lr = float(s.engine.get_lr()[0])
    mean_loss = window.loss / max(1.0, window.labelled)
    seconds = max(1e-9, window.seconds)
    tok_s = window.tokens / seconds
    if s.metrics is not None:
        s.metrics.write(
            {
                "type": "train",
                "step": progress.global_step,
                "epoch": round(epoch_f, 4),
                "loss": mean_loss,
                "learning_rate": lr,
                "grad_norm": _grad_norm(s.engine),
                "tokens_per_second": tok_s,  # real (non-pad) tokens, all workers
                "tokens_seen": progress.tokens_seen,
                "mfu": rounded(mfu(window.flops / seconds, s.peak, dist.world())),
            }
        )
        publish_metrics(s.run, s.metrics)
    s.view.update(progress.global_step, mean_loss, tok_s, lr)
    window.reset()


def _grad_norm(engine) -> float | None:
    try:
        g = engine.get_global_grad_norm()
    except Exception:  # not every DeepSpeed optimizer wrapper exposes it
        return None
    return None if g is None else float(g)
