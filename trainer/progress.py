"""Resume state in one object, and what the user sees while training runs."""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("raytag")


@dataclass
class TrainingProgress:
    """Everything besides DeepSpeed's own files that a resumed run needs to continue exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # next step to run within `epoch`
    global_step: int = 0
    tokens_seen: int = 0  # real (non-pad) tokens trained on, all ranks
    windows_seen: int = 0  # model inputs trained on (sentences, or windows of long ones), all ranks
    epoch_loss: float = 0.0  # summed token loss since the last evaluation
    epoch_labelled: int = 0
    train_seconds: float = 0.0
    train_flops: float = 0.0  # model FLOPs of training (trainer/flops.py), all ranks
    best_f1: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation
    # per epoch trained: {"epoch", "windows" (trained on, all ranks), "world_sizes" (in order)}
    epochs: list[dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: str | None = (
        None  # the MLflow run this one logs to (tracking.mlflow_uri): a resume continues it
    )
    # train.time_budget (budget.py): the seconds used as of this checkpoint and, once the first steps
    # are timed, the plan ("planned_steps", "warmup_steps", the measured costs); empty without a budget
    time_budget: dict[str, Any] = field(default_factory=dict)

    def note_world(self, epoch: int, world: int) -> dict[str, Any]:
        """The record of `epoch`, noting that it (now) trains with `world` workers."""
        if not self.epochs or self.epochs[-1]["epoch"] != epoch:
            self.epochs.append({"epoch": epoch, "windows": 0, "world_sizes": []})
        record = self.epochs[-1]
        if not record["world_sizes"] or record["world_sizes"][-1] != world:
            record["world_sizes"].append(world)
        return record

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if hasattr(self, k):
                setattr(self, k, v)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.state_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> TrainingProgress:
        p = cls()
        p.load_state_dict(json.loads(path.read_text()))
        return p


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def terminal_bar(**tqdm_args: Any) -> tuple[Any, Any]:
    """A tqdm bar on stderr with log lines printed above it, not through it (checkpoint uploads, a
    Ray actor's lines); returns the bar and the redirect to `__exit__` when done."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(**tqdm_args)
    root = logging.getLogger()
    filters = [f for h in root.handlers for f in h.filters]  # e.g. the secret-redacting filter
    redirect = logging_redirect_tqdm()
    redirect.__enter__()
    for handler in root.handlers:
        for flt in filters:
            if flt not in handler.filters:
                handler.addFilter(flt)
    return bar, redirect


class ProgressView:
    """A progress bar (loss, tokens/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool, log_every: int):
        self.total, self.enabled, self.log_every = total, enabled, log_every
        self.bar = None
        self.started = time.monotonic()
        self.initial = initial
        if enabled and sys.stderr.isatty():
            self.bar, self._redirect = terminal_bar(
                total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train"
            )

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}", refresh=False
            )
            return
        if step % self.log_every == 0 or step == self.total:
            done = step - self.initial
            elapsed = time.monotonic() - self.started
            eta = elapsed / done * (self.total - step) if done else float("nan")
            log.info(
                "step %d/%d loss %.4f lr %.2e tokens/s %.0f eta %s",
                step,
                self.total,
                loss,
                lr,
                tokens_per_s,
                _fmt_eta(eta),
            )

    def set_total(self, total: int) -> None:
        """The run's step count, once known (train.time_budget plans it after its first steps)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            log.info("%s", msg)

    def close(self) -> None:
        if self.bar is not None:
            self._redirect.__exit__(None, None, None)
            self.bar.close()


class TagProgress:
    """What the user sees while `predict` tags a corpus: on a terminal a bar (input bytes done, lines
    per second, the ETA), else a log line every 10 s and one per finished part (a Ray driver's
    view: it hears of whole parts). The ETA follows the input bytes still to tag."""

    def __init__(self, parts: int, total_bytes: int, resumed: int = 0) -> None:
        self.parts, self.total_bytes, self.resumed = parts, total_bytes, resumed
        self.lines = 0
        self.finished = 0
        self.done_bytes = 0.0
        self.started = time.monotonic()
        self._last = self.started
        self._part_bytes = 0.0  # what `advance` counted of the part in progress (in-process)
        self._part_lines = 0
        self.bar: Any = None
        if sys.stderr.isatty():
            self.bar, self._redirect = terminal_bar(
                total=max(1, total_bytes),
                dynamic_ncols=True,
                bar_format="tag {percentage:3.0f}%|{bar}| ETA {remaining}{postfix}",
                postfix=f"{resumed}/{parts} parts",
            )

    def advance(self, lines: int, nbytes: float) -> None:
        """`lines` more tagged, `nbytes` of their part's input (in-process, after each chunk)."""
        self.lines += lines
        self._part_lines += lines
        self._part_bytes += nbytes
        self._show(nbytes, None)

    def part_done(self, input_bytes: int, lines: int, what: str) -> None:
        """A part of `input_bytes` finished with `lines` (`what`: its name and outcome, for the log)."""
        self.finished += 1
        self.lines += lines - self._part_lines
        rest = input_bytes - self._part_bytes
        self._part_bytes, self._part_lines = 0.0, 0
        self._show(rest, what)

    def _show(self, nbytes: float, what: str | None) -> None:
        self.done_bytes += nbytes
        now = time.monotonic()
        rate = self.lines / max(1e-9, now - self.started)
        done = f"{self.resumed + self.finished}/{self.parts} parts"
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{done}, {rate:,.0f} lines/s", refresh=False)
            return
        if what is None and now - self._last < 10:
            return
        self._last = now
        log.info(
            "%s%s, %s lines, %s lines/s, ETA %s",
            f"{what}; " if what else "",
            done,
            f"{self.lines:,}",
            f"{rate:,.0f}",
            self.eta(),
        )

    def eta(self) -> str:
        """The time left at the input bytes' rate so far ('?' before any)."""
        if not self.done_bytes:
            return "?"
        elapsed = time.monotonic() - self.started
        return _fmt_eta(elapsed / self.done_bytes * max(0.0, self.total_bytes - self.done_bytes))

    def close(self) -> None:
        if self.bar is not None:
            self._redirect.__exit__(None, None, None)
            self.bar.close()


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
