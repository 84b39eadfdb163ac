"""Stopping on request, and checkpoints on the clock.

A stop request (SIGTERM from a spot reclaim, Kubernetes or `ray job stop`; the Ray driver's
`ray job stop` forwarded to the workers) only sets a flag in this process. The loop reads the
flag at each step boundary as one element of the step's all-reduce, so every rank sees a
request on any rank at the same step: they save a checkpoint there, wait until its upload is
complete, release the lease and raise `Preempted`; the command exits with status 75
(`EX_TEMPFAIL`: try again) and the same command continues the run.

The request carries a deadline (`run.stop_grace_seconds` after the signal). A watchdog ends the
process at the deadline if the save has not finished: the checkpoint being written never gets
its manifest, so the last complete checkpoint stands and nothing partial is ever read.

Rank 0's clock also decides when a time-based checkpoint (`train.save_every_minutes`) is due and
when to ask the launcher for outside notices (the Ray driver's stop flag, a node drain): its
vote travels in the same all-reduce, so ranks with different clocks never disagree.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger("raytag")

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the same command continues


class Preempted(Exception):
    """The run stopped on request after saving a checkpoint; rerunning the same command continues it."""


class StopRequest:
    """This process's stop flag: why, and until when the save may run (wall-clock deadline)."""

    def __init__(self) -> None:
        # Reentrant: the SIGTERM handler runs on the main thread, which may hold it (in `done`).
        self._lock = threading.RLock()
        self.reason: str | None = None
        self.deadline: float | None = None
        self._watchdog: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str, deadline: float) -> bool:
        """Ask the loop to stop at the next step boundary; the first request wins. Starts the watchdog."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason, self.deadline = reason, deadline
            left = max(0.0, deadline - time.time())
            self._watchdog = threading.Timer(left, self._expired)
            self._watchdog.daemon = True
            self._watchdog.start()
        log.warning(
            "%s: stopping at the next step boundary with a checkpoint (%.0f s to save and upload it)",
            reason,
            left,
        )
        return True

    def _expired(self) -> None:
        log.error(
            "%s: the stop grace ran out before the checkpoint was saved and uploaded; exiting now, "
            "the run continues from its last complete checkpoint",
            self.reason,
        )
        logging.shutdown()
        os._exit(EXIT_PREEMPTED)

    def done(self) -> None:
        """The stop finished in time (or the run ended): no watchdog, no request."""
        with self._lock:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog, self.reason, self.deadline = None, None, None


STOP = StopRequest()  # one per process: signal handlers and the loop share it


def on_sigterm(grace_s: float, forward: Callable[[str, float], None] | None = None) -> Callable[[], None]:
    """Handle SIGTERM (main thread only): request a stop with `grace_s` to finish, or hand the request
    to `forward(reason, deadline)` (the Ray driver forwards it to its workers). Returns a function
    restoring the previous handler. A second SIGTERM is logged and ignored: the watchdog ends it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: object) -> None:
        reason = f"{signal.Signals(signum).name} received"
        deadline = time.time() + grace_s
        if forward is not None:
            forward(reason, deadline)
        elif not STOP.request(reason, deadline):
            log.warning("%s again: still stopping (%s)", reason, STOP.reason)

    previous = signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


class Clock:
    """Rank 0's timers: a time-based checkpoint due, outside notices to poll. Other ranks vote 0."""

    def __init__(self, save_every_minutes: float | None, poll_every_s: float | None, leader: bool) -> None:
        self.save_every_s = save_every_minutes * 60 if save_every_minutes else None
        self.poll_every_s = poll_every_s
        self.leader = leader
        self.last_save = self.last_poll = time.monotonic()

    def votes(self) -> tuple[float, float]:
        """(checkpoint due, poll due) from this rank's clock, as all-reduce votes."""
        if not self.leader:
            return 0.0, 0.0
        now = time.monotonic()
        save = self.save_every_s is not None and now - self.last_save >= self.save_every_s
        poll = self.poll_every_s is not None and now - self.last_poll >= self.poll_every_s
        if poll:
            self.last_poll = now
        return float(save), float(poll)

    def saved(self) -> None:
        self.last_save = time.monotonic()
