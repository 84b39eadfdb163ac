"""What one evaluation or save needs (`Session`, built once per run by `open_session`), and the
evaluations and checkpoints themselves.

evaluate  after each epoch (and every train.eval_every steps): validation + named sets, every rank
          its share of the batches
save      a checkpoint after each evaluation (and every train.save_every steps, every
          train.save_every_minutes, on a drain notice or a stop request), committed in the
          background; the manifest names the best checkpoint so far
stop      after a stop request: the step's checkpoint uploaded on every rank, then `Preempted`

Every rank calls each of these at the same points: they hold collectives and the run's storage calls.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import dist
from .budget import Budget
from .config import Config, dump_yaml
from .engine import EngineSpec
from .evaluate import EvalResult, eval_batches, finish, predict_windows
from .faults import inject_fault
from .flops import ModelFlops, Peak, device_peak, model_flops
from .outputs import MetricsLog, write_json
from .progress import ProgressView, TrainingProgress, rng_state
from .run_data import Data
from .shard_plan import ShardReader
from .sparse_adam import catch_up_rows
from .stopping import STOP, Clock, Preempted

log = logging.getLogger("raytag")

Report = Callable[[dict[str, Any], "str | None"], None]
Notices = Callable[[], "str | None"]
NOTICE_POLL_S = 2.0  # how often rank 0's clock asks for outside notices (the driver's stop, a node drain)


@dataclass
class Session:
    """The pieces one evaluation or save needs (built once per run by `open_session`)."""

    cfg: Config
    run: Any  # raytag.cluster.run.RunStore
    engine: Any
    spec: EngineSpec
    data: Data
    device: torch.device
    pad_id: int
    metrics: MetricsLog | None  # rank 0 only
    view: ProgressView
    report: Report | None
    clock: Clock  # rank 0 decides when a time-based checkpoint is due
    reader: ShardReader  # this rank's training shards
    flops: ModelFlops  # what a window's training FLOPs depend on
    peak: Peak  # one device's peak FLOP/s in this run's precision (rank 0's, the same on every rank)
    plan: dict[str, Any]  # the global batch plan's inputs (batch_tokens as resolved, its pools, lanes),
    # kept in every checkpoint's manifest (loop.Plan)
    budget: Budget | None = None  # train.time_budget's clock and plan (budget.py)


def open_session(
    cfg: Config,
    run: Any,
    engine: Any,
    spec: EngineSpec,
    data: Data,
    device: torch.device,
    metrics: MetricsLog | None,
    report: Report | None,
    reader: ShardReader,
    *,
    total_steps: int,
    progress: TrainingProgress,
    rank: int,
    notices: Notices | None,
    plan: dict[str, Any],
    budget: Budget | None = None,
) -> Session:
    """The run's Session: its progress view, its clock, and one device's peak FLOP/s (rank 0's, broadcast)."""
    tc = cfg.train
    pad_id = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0
    view = ProgressView(total_steps, progress.global_step, enabled=rank == 0, log_every=tc.log_every)
    clock = Clock(tc.save_every_minutes, NOTICE_POLL_S if notices else None, leader=rank == 0)
    peak = dist.broadcast_object(device_peak(device, spec.precision) if rank == 0 else None)
    if rank == 0:
        log.info(
            "MFU is measured against %s FLOP/s per device: %s",
            f"{peak.flops:.3g}" if peak.flops else "no peak",
            peak.source,
        )
    return Session(
        cfg,
        run,
        engine,
        spec,
        data,
        device,
        pad_id,
        metrics,
        view,
        report,
        clock,
        reader,
        model_flops(engine.module),
        peak,
        plan,
        budget,
    )


def publish_metrics(run, metrics: MetricsLog) -> None:
    """Mirror metrics.jsonl and the TensorBoard event file to the run's storage (in the background)."""
    for rel in metrics.files():
        run.publish(rel)


def evaluate(s: Session, name: str) -> EvalResult:
    """Score split `name` (every rank: its share of the batches, the same number of forwards)."""
    catch_up_rows(s.engine)  # sparse embedding updates: every row as dense AdamW would have it
    s.engine.module.eval()
    enc = s.data.encoded[name]
    preds, loss_sum, count = predict_windows(
        s.engine, enc, s.pad_id, s.device, s.cfg.train.eval_batch_tokens, dist.rank(), dist.world()
    )
    merged: dict[int, np.ndarray] = {}
    for part in dist.gather_objects(preds):
        merged.update(part)
    total_loss, total_count = dist.all_sum([loss_sum, float(count)])
    s.engine.module.train()
    return finish(enc, merged, s.data.splits[name].tags, s.data.labels, total_loss, int(total_count))


EVAL_SAMPLE = 8  # time_evaluation forwards every 8th window of a set (of a set of 800 or more)


def time_evaluation(s: Session) -> float:
    """The seconds an evaluation of every set will take (its checkpoint aside), for train.time_budget's
    first plan: a pass over every EVAL_SAMPLE-th window of each set (all of a small set's), scaled by
    the sets' padded tokens over the sample's, as `predict_windows` batches them (a sample's batches
    mix more lengths: an 8th of CoNLL-2003's validation set pads to 26,730 tokens, the whole set to
    98,296). A run's first evaluation, which the plan used to run instead, is of no use (its F1 is 0),
    and on the full CoNLL-2003 validation set it took 23 s of a 251 s budget; the pass takes about 6 s
    (a second pass over the same sample measured no warm-up in the first). Every rank, as `evaluate`."""
    import time

    catch_up_rows(s.engine)  # part of an evaluation's cost (and idempotent)
    s.engine.module.eval()
    began, sampled, tokens = time.monotonic(), 0, 0
    for name in s.data.eval_names:
        enc = s.data.encoded[name]
        every = EVAL_SAMPLE if len(enc.windows) >= 100 * EVAL_SAMPLE else 1
        sample = dataclasses.replace(enc, windows=enc.windows[::every])
        predict_windows(
            s.engine, sample, s.pad_id, s.device, s.cfg.train.eval_batch_tokens, dist.rank(), dist.world()
        )
        sampled += padded_tokens(sample.windows, s.cfg.train.eval_batch_tokens)
        tokens += padded_tokens(enc.windows, s.cfg.train.eval_batch_tokens)
    s.engine.module.train()
    took = time.monotonic() - began
    estimate = took * tokens / max(1, sampled)
    if dist.rank() == 0:
        log.info(
            "time budget: an evaluation estimated at %.3g s from a pass of %.3g s over %d of its %d padded tokens",
            estimate,
            took,
            sampled,
            tokens,
        )
    return estimate


def padded_tokens(windows: list, batch_tokens: int) -> int:
    """The tokens, padding included, of `predict_windows`'s batches of `windows`."""
    lengths = [len(w) for w in windows]
    return sum(len(b) * max(lengths[i] for i in b) for b in eval_batches(lengths, batch_tokens))


def evaluate_and_save(s: Session, progress: TrainingProgress, epoch_f: float) -> None:
    """Evaluate validation and the named sets, record them, then checkpoint (the manifest names the best)."""
    inject_fault(dist.rank(), progress.global_step, "eval")
    val: dict[str, Any] | None = None
    for name in s.data.eval_names:
        res = evaluate(s, name)
        if s.metrics is not None:
            s.metrics.write(
                {
                    "type": "eval",
                    "split": name,
                    "step": progress.global_step,
                    "epoch": round(epoch_f, 4),
                    **res.metrics,
                }
            )
            publish_metrics(s.run, s.metrics)
        s.view.write(
            f"eval {name} step {progress.global_step}: F1 {res.metrics['f1']:.4f} "
            f"P {res.metrics['precision']:.4f} R {res.metrics['recall']:.4f} loss {res.metrics['loss']:.4f}"
        )
        if name == "validation":
            val = res.metrics
    hist: dict[str, Any] = {
        "step": progress.global_step,
        "epoch": round(epoch_f, 4),
        "train_loss": progress.epoch_loss / max(1, progress.epoch_labelled),
    }
    progress.epoch_loss, progress.epoch_labelled = 0.0, 0
    if val is not None:
        hist.update({k: val[k] for k in ("f1", "precision", "recall", "accuracy", "loss")})
        if progress.best_f1 is None or val["f1"] > progress.best_f1:
            progress.best_f1, progress.best_step, progress.best_metrics = val["f1"], progress.global_step, val
    progress.history.append(hist)
    save(s, progress, {"f1": val["f1"]} if val is not None else {})


def save(s: Session, progress: TrainingProgress, eval_metrics: dict[str, Any]) -> str:
    """Write this rank's part of a checkpoint and commit it (uploads run beside training); report it."""
    from raytag.cluster.checkpoints import checkpoint_name

    if s.budget is not None:
        s.budget.checkpoint(progress)  # the budget used so far: a resumed run continues from it
    folder = s.run.checkpoint_folder(progress.global_step)
    s.engine.save_checkpoint(str(folder), tag="ds", save_latest=False)
    rank = dist.rank()
    torch.save(rng_state(), folder / f"rng-rank{rank}.pt")
    if rank == 0:
        if s.metrics is not None and s.metrics.mlflow_run_id:  # a resume continues this MLflow run
            progress.mlflow_run_id = s.metrics.mlflow_run_id
        progress.save(folder / "progress.json")
        write_json(folder / "labels.json", s.data.labels)
        (folder / "tokenizer.sha256").write_text(s.data.tokenizer_sha)
        (folder / "data.fingerprint").write_text(s.data.train.fingerprint)  # the plan's index
        (folder / "config.yaml").write_text(dump_yaml(s.cfg), encoding="utf-8")
        if (s.run.workdir / "metrics.jsonl").is_file():  # what a resume from here continues
            shutil.copyfile(s.run.workdir / "metrics.jsonl", folder / "metrics.jsonl")
    best = checkpoint_name(progress.best_step) if progress.best_step is not None else None
    s.run.commit(
        progress.global_step, folder, eval_metrics, {"best": best, "world": dist.world(), "plan": s.plan}
    )
    s.clock.saved()
    inject_fault(rank, progress.global_step, "save")
    name = checkpoint_name(progress.global_step)
    if s.report is not None:
        s.report(
            {"step": progress.global_step, **({"eval_f1": eval_metrics["f1"]} if eval_metrics else {})}, name
        )
    return name


def stop_here(s: Session, progress: TrainingProgress, total_steps: int) -> None:
    """Every rank, after a stop request and this step's checkpoint: wait for its upload, then raise
    Preempted (the watchdog of `stopping.STOP` ends the process if this outlasts the grace)."""
    from raytag.cluster.checkpoints import checkpoint_name

    reason = dist.broadcast_object(STOP.reason if dist.rank() == 0 else None) or STOP.reason
    reason = reason or "a stop request on another rank"
    s.view.close()
    s.run.wait()  # the checkpoint is complete in storage on every rank, or all raise
    STOP.done()
    name = checkpoint_name(progress.global_step)
    raise Preempted(
        f"{reason}: stopped at step {progress.global_step} of {total_steps} with checkpoint {name} "
        f"saved in {s.run.uri}; run the same command again to continue"
    )
