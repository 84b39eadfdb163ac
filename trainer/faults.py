"""Fault injection for failure-recovery tests: RAYTAG_FAULT_INJECT makes one rank fail once, at a
chosen step's start, evaluation or save (`inject_fault`, called by the loop at those points)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("raytag")

FAULT_MODES = ("exit", "raise", "kill", "term")
FAULT_POINTS = ("step", "eval", "save", "part")


def inject_fault(rank: int, step: int, point: str) -> None:
    """Failure-recovery testing: RAYTAG_FAULT_INJECT="RANK:STEP:MARKER[:MODE][:POINT]" makes that rank
    fail once (the marker file records it), at STEP's POINT:

    - POINT `step` (default): the start of that optimizer step; `eval`: the start of the evaluation
      after it; `save`: right after its checkpoint is written locally and its upload has begun;
      `part` (predict): STEP is a part's index, and the fault comes once that part's records are in
      its temporary file, before the file is made visible.
    - MODE `exit` (default): the process exits at once (`os._exit`, no cleanup); `kill`: it sends
      itself SIGKILL; `term`: it sends itself SIGTERM (a stop request, handled as from outside);
      `raise`: it raises (an error on one rank only).

    The older form MODE `save` means `exit` at POINT `save`. Unset: nothing."""
    spec = os.environ.get("RAYTAG_FAULT_INJECT")
    if not spec:
        return
    want_rank, want_step, rest = spec.split(":", 2)
    parts = rest.split(":")
    mode, at = "exit", "step"
    while len(parts) > 1 and parts[-1] in (*FAULT_MODES, *FAULT_POINTS):
        word = parts.pop()
        if word in FAULT_MODES:
            mode = word
        else:
            at = word
    marker = ":".join(parts)
    if rank != int(want_rank) or step != int(want_step) or at != point or Path(marker).exists():
        return
    Path(marker).write_text(f"rank {rank} failed ({mode}) at step {step} ({point})\n")
    if mode == "raise":
        raise RuntimeError(f"RAYTAG_FAULT_INJECT: injected failure on rank {rank} at step {step}")
    log.warning("RAYTAG_FAULT_INJECT: %s on rank %d at step %d (%s)", mode, rank, step, point)
    if mode == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        os._exit(17)
