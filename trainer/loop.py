"""The training loop: `train_loop`, run by every worker (or in-process locally), top to bottom,
each phase a call into the module named for it:

setup     config -> the run's storage (cluster/run.py), data and label checks (run_data.py),
          the global batch plan (shard_plan.py), the engine (engine.py)
resume    the newest complete checkpoint (resume.py: rank 0 decides, every rank loads its own part)
steps     global batch plan -> this rank's micro-batches -> forward/backward/step; log (step.py)
evaluate  after each epoch (and every train.eval_every steps): validation + named sets (session.py)
save      a checkpoint after each evaluation (and every train.save_every steps), committed in the
          background; the manifest names the best checkpoint so far (session.py)
finish    the best checkpoint's weights -> model/ (Hugging Face format, model card), test and
          named sets scored with them, results.json (finish.py)

Rank 0 writes the run's metrics (metrics.jsonl, TensorBoard, MLflow when tracking is on: outputs.py,
tracking.py).

Every rank runs every collective and every storage call of the run object at the same points;
storage, DeepSpeed's file names and the run lease live behind `RunStore`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import dist
from .batching import StepPlan, resolve_batch_tokens
from .budget import Budget
from .config import Config, dump_yaml, from_dict, parse_duration
from .engine import (
    EngineSpec,
    attention_kernel,
    build_engine,
    end_local_process_group,
    engine_spec,
    fit_embedding_updates,
    plan_schedule,
    rank_device,
    undo_process_wide_patches,
)
from .finish import finish_run
from .model import load_model
from .outputs import MetricsLog, write_json
from .progress import seed_everything
from .resume import finished_stands, nothing_to_add, resume
from .run_data import Data, load_data, storage_of
from .session import Notices, Report, open_session, publish_metrics
from .shard_plan import ShardReader, plan_epoch
from .step import train_epochs
from .stopping import STOP
from .tracking import open_tracking

log = logging.getLogger("raytag")


def train_loop(
    config: dict[str, Any],
    report: Report | None = None,
    *,
    node: str | None = None,
    device: torch.device | None = None,
    notices: Notices | None = None,
    lease_info: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Train per `config` (a Config as a dict). Returns results on rank 0 (None elsewhere).

    `report(metrics, checkpoint_name)` is called by every rank after each checkpoint (the Ray
    launcher passes one that reports to Ray Train). `node` names the machine this rank runs on
    (Ray's node id; default: the host name) and `device` its GPU (default: cuda:LOCAL_RANK).
    `notices()` is called by every rank together every few seconds: it may request a stop
    (`stopping.STOP`) or return why a checkpoint is wanted now (a node drain). `lease_info` is
    written into the run's lease (the Ray job id, so a resubmitted job can see its owner is gone).

    Raises `stopping.Preempted` after a stop request (SIGTERM, `ray job stop`) once the checkpoint
    of the step where every rank stopped is saved and uploaded.
    """
    # ---- setup: the process group, seed and device; the run's storage
    cfg: Config = from_dict(config)
    tc, mc, rc = cfg.train, cfg.model, cfg.run
    group = dist.group(int(os.environ.get("LOCAL_RANK", "0")))
    # No launcher's group (Ray Train's): DeepSpeed starts one at engine build, and this run ends it.
    own_group = not dist.initialized()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    device = rank_device(cfg.scaling.use_gpu, device)
    run = open_run(cfg, group, node, lease_info)
    success = False
    metrics: MetricsLog | None = None
    try:
        finished = run.read_json("results.json") if run.finished and not rc.new_run else None
        if finished is not None and finished_stands(cfg, finished, run.storage.uri):
            success = True
            return finished

        # ---- setup: data, the resume point, the global batch plan (a resumed run's own), model and engine
        data = load_data(cfg, group)
        info = run.resume_point() if rc.resume and not rc.new_run else None
        plan, reader = plan_run(cfg, data, group, info.meta.get("plan") if info is not None else None)
        if finished is not None and nothing_to_add(cfg, finished, plan.total_steps):
            success = True
            return finished
        world = group.world
        spec = engine_spec(
            cfg,
            world,
            plan.total_steps,
            device.type == "cuda",
            planned_world=plan.lanes // tc.gradient_accumulation_steps,
            accumulation=-(-plan.lanes // world),
        )
        attention = attention_kernel(mc.attention, spec)
        model = load_model(mc.name_or_path, data.labels, data.tokenizer, tc.seed, mc.dropout, attention)
        model.to(device)
        spec = fit_embedding_updates(spec, tc.embedding_updates, model)
        engine = build_engine(model, spec, device_rank=device.index if device.type == "cuda" else None)

        # ---- resume: rank 0 picks the checkpoint, every rank loads its own part of it
        progress, resumed = resume(cfg, run, engine, data, group, info)
        resumed_from = resumed.name if resumed is not None else None

        # ---- the step count and the schedule's: the plan's (over what a checkpoint stored), or the
        # time budget's (a resumed run's own; a new run's once its first steps are timed)
        total_steps, schedule = plan.total_steps, (spec.warmup_steps, spec.total_steps)
        budget = open_budget(cfg, progress, plan, group.rank)
        if budget is not None:
            total_steps, schedule = budget.total_steps, budget.schedule(schedule)
        # (from the next scheduler step on: the next step trains at the rate the optimizer holds, a
        # resumed run at its checkpoint's, as with Hugging Face's schedule before LinearSchedule)
        plan_schedule(engine, *schedule, rate_now=False)

        # ---- the run's files and session
        if group.rank == 0:  # rank 0 alone writes the run's files (ranks may share the working folder)
            metrics = MetricsLog(
                run.workdir / "metrics.jsonl",
                progress.global_step if resumed_from else None,
                tensorboard=rc.tensorboard,
                mlflow=open_tracking(cfg, run.uri, progress.mlflow_run_id),  # None: tracking is off
            )
            record_start(
                cfg, run, metrics, data, plan, spec, attention, world, resumed, progress.global_step, budget
            )
        s = open_session(
            cfg,
            run,
            engine,
            spec,
            data,
            device,
            metrics,
            report,
            reader,
            total_steps=schedule[1],
            progress=progress,
            rank=group.rank,
            notices=notices,
            plan=plan.record,
            budget=budget,
        )

        # ---- epochs of steps, evaluating and saving where due (a stop request raises Preempted)
        train_epochs(s, progress, plan.epoch, total_steps, notices, group)

        # ---- finish: the best checkpoint's weights scored and exported, results.json
        results = finish_run(s, progress, resumed_from)
        run.wait()
        success = True
        return results if group.rank == 0 else None
    finally:
        STOP.done()  # a stop request that came during the final scoring: the run finished anyway
        if metrics is not None:
            metrics.close(success)
        run.close(success)
        undo_process_wide_patches()
        if own_group:
            end_local_process_group()


# ---------------------------------------------------------------------------------------------
# setup


def open_run(cfg: Config, group: Any, node: str | None, lease_info: dict[str, Any] | None) -> Any:
    """The run's storage (rank 0 checks it; every rank raises if that fails), and the run on it:
    its lease and working folder (in place, or a node's staging folder). A `RunStore`."""
    from raytag.cluster.run import RunStore
    from raytag.cluster.runlock import new_owner
    from raytag.cluster.storage import open_storage

    rc = cfg.run
    storage = open_storage(rc.storage, endpoint_url=rc.s3_endpoint_url, region=rc.s3_region)
    error: BaseException | None = None
    if group.rank == 0:
        try:
            storage.preflight(create_bucket=rc.create_bucket)
        except BaseException as exc:
            error = exc
    group.agree(error)
    return RunStore.open(
        storage,
        rc.name,
        group=group,
        node=node or socket.gethostname(),
        owner=rc.owner or new_owner(),
        keep_best=max(1, rc.keep_best),  # the best checkpoint is always kept: model/ and test come from it
        new_run=rc.new_run,
        staging_root=rc.staging_dir,
        log=log.info,
        lease_info=lease_info,
        retry_budget_s=rc.storage_retry_seconds,
        # A lease lost or fenced (storage unreachable for most of its TTL): stop at the next step;
        # the checkpoint that a stop writes is then refused, as the lease may no longer be this run's.
        on_lost=lambda why: STOP.request(why, time.time() + rc.stop_grace_seconds),
    )


@dataclass
class Plan:
    """The run's global batch plan: the same on every rank, from the data and (seed, epoch) alone.

    Its inputs are fixed when the run starts and travel in every checkpoint's manifest
    (`record`): a resume, at any group size and with any new train.epochs, continues the same
    plan, so each epoch's position means the same windows."""

    epoch: Callable[[int], StepPlan]  # an epoch's steps (each rank logs how many shards it reads)
    batch_tokens: int  # train.batch_tokens as resolved (`auto` -> a number)
    pool_batches: int  # the batches' length-sorted pools (batching.py)
    lanes: int  # micro-batches per optimizer step, all workers: max workers x accumulation
    steps_in: Callable[[int], int]  # an epoch's steps (they vary a little with its shuffle; cached)
    total_steps: int  # train.epochs' steps, or train.max_steps (a time budget plans its own)

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_in(0)

    @property
    def record(self) -> dict[str, int]:
        """What the checkpoint keeps: the plan's inputs."""
        return {"batch_tokens": self.batch_tokens, "pool_batches": self.pool_batches, "lanes": self.lanes}


def plan_run(cfg: Config, data: Data, group: Any, stored: dict[str, Any] | None) -> tuple[Plan, ShardReader]:
    """The global batch plan, and this rank's reader of its own training shards.

    A new run plans its global batch for its largest group (scaling.num_workers, an elastic run's
    MAX) times train.gradient_accumulation_steps micro-batches a step, and resolves
    `batch_tokens: auto` from the data; a resumed run takes both from its checkpoint (`stored`).
    The step count is the sum of the epochs' own counts (a last fractional epoch rounded up)."""
    tc, rc = cfg.train, cfg.run
    world = group.world

    def plan_at(tokens: int, epoch: int, pool: int, lanes: int) -> tuple[StepPlan, list[int]]:
        return plan_epoch(
            data.train,
            data.weights,
            tokens,
            tc.max_batch_sentences,
            tc.seed,
            epoch,
            world,
            group.rank,
            lanes,
            pool,
        )

    if stored:
        lanes, batch_tokens, pool_batches = stored["lanes"], stored["batch_tokens"], stored["pool_batches"]
    else:
        lanes = cfg.scaling.max_workers * tc.gradient_accumulation_steps
        # `auto`: from the data alone, the same on every rank
        batch_tokens, pool_batches = resolve_batch_tokens(
            tc.batch_tokens,
            data.lengths,
            lanes,
            tc.epochs,
            tc.max_batch_sentences,
            log.info if group.rank == 0 else None,
            steps_at=lambda tokens, pool: len(plan_at(tokens, 0, pool, lanes)[0].steps),
        )

    def epoch_plan(epoch: int) -> StepPlan:  # the same global plan on every rank: (seed, epoch) only
        plan, shards = plan_at(batch_tokens, epoch, pool_batches, lanes)
        log.info("rank %d, epoch %d: %d shard(s) of its own to read", group.rank, epoch, len(shards))
        return plan

    per_rank = -(-lanes // world)  # this rank's micro-batches a step
    reader = ShardReader(
        data.train, storage_of(cfg), group.rank, lanes=per_rank, retry_budget_s=rc.storage_retry_seconds
    )

    @functools.cache
    def steps_in(epoch: int) -> int:
        return len(plan_at(batch_tokens, epoch, pool_batches, lanes)[0].steps)

    whole = int(tc.epochs)
    fraction = tc.epochs - whole
    if tc.time_budget is not None:  # a first guess, for the schedule's warm-up until the budget's plan
        planned = math.ceil(tc.epochs * steps_in(0))
    else:
        planned = sum(steps_in(e) for e in range(whole)) + (
            math.ceil(fraction * steps_in(whole)) if fraction else 0
        )
    total_steps = tc.max_steps or max(1, planned)
    return Plan(epoch_plan, batch_tokens, pool_batches, lanes, steps_in, total_steps), reader


def open_budget(cfg: Config, progress: Any, plan: Plan, rank: int) -> Budget | None:
    """train.time_budget's clock, continuing from the budget used and the plan kept in `progress`
    (None: no budget)."""
    tc = cfg.train
    if tc.time_budget is None:
        return None
    return Budget(
        tc.time_budget,
        parse_duration(tc.time_budget),
        progress.time_budget,
        leader=rank == 0,
        warmup_ratio=tc.warmup_ratio,
        max_steps=tc.max_steps,
        eval_every=tc.eval_every,
        save_every=tc.save_every,
        save_every_minutes=tc.save_every_minutes,
        steps_in=plan.steps_in,
    )


def record_start(
    cfg: Config,
    run: Any,
    metrics: MetricsLog,
    data: Data,
    plan: Plan,
    spec: EngineSpec,
    attention: str,
    world: int,
    resumed: Any,
    step: int,
    budget: Budget | None = None,
) -> None:
    """Rank 0: the run's config and labels written and published, the run described in one log line,
    and a `resize` record when the group's size changed since checkpoint `resumed` (at `step`)."""
    rc = cfg.run
    if resumed is not None:
        publish_metrics(run, metrics)  # the bucket's copy may lag the checkpoint's (a failed upload)
        before = int(resumed.meta.get("world") or world)
        if before != world:  # an elastic group resized (or a rerun with another scaling.num_workers)
            why = f"resumed from {resumed.name} with {world} worker(s); it was saved by {before}"
            metrics.write({"type": "resize", "step": step, "from": before, "to": world, "why": why})
    (run.workdir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    write_json(run.workdir / "labels.json", data.labels)
    run.publish("config.yaml")
    run.publish("labels.json")
    if budget is None:
        steps = f"{plan.total_steps} steps"
    elif budget.planned is not None:
        steps = f"{budget.total_steps} steps (time budget {budget.spec}, as planned)"
    else:
        steps = f"time budget {budget.spec} (its steps planned once the first ones are timed)"
    log.info(
        "run %s: %d train windows (%d sentences, %d shards), %s (%d per epoch), %d labels, %s%s, "
        "%s attention, %s embedding updates, ZeRO-%d, %d worker(s), outputs in %s",
        rc.name,
        len(data.lengths),
        data.train.manifest["sentences"],
        data.train.num_shards,
        steps,
        plan.steps_per_epoch,
        len(data.labels),
        spec.precision,
        " (autocast, fp32 weights)" if spec.cpu_autocast else "",
        attention,
        "sparse (RowSparseAdamW)" if spec.sparse_embeddings else "dense",
        spec.zero_stage,
        world,
        run.uri,
    )
