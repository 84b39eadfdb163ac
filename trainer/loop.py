"""The training loop: one function, top to bottom, run by every worker (or in-process locally).

setup     config -> the run's storage (cluster/run.py), data, labels, tokenizer, windows, engine
resume    the newest complete checkpoint (rank 0 decides, every rank loads its own part)
loop      global batch plan -> this rank's micro-batches -> forward/backward/step; log
evaluate  after each epoch (and every train.eval_every steps): validation + named sets
save      a checkpoint after each evaluation (and every train.save_every steps), committed in the
          background; the manifest names the best checkpoint so far
finish    the best checkpoint's weights -> model/ (Hugging Face format, model card), test and
          named sets scored with them, results.json

Every rank runs every collective and every storage call of the run object at the same points;
storage, DeepSpeed's file names and the run lease live behind `RunStore`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dist
from .batching import StepPlan, resolve_batch_tokens
from .card import render_card
from .config import Config, ConfigError, dump_yaml, from_dict, to_dict
from .data import Split, hub_splits, read_split, write_conll
from .engine import (
    EngineSpec,
    attention_kernel,
    build_engine,
    end_local_process_group,
    engine_spec,
    fit_embedding_updates,
    full_state_dict,
    rank_device,
)
from .evaluate import EvalResult, collate, finish, predict_windows
from .faults import inject_fault
from .features import IGNORE, Encoded, Window, encode
from .flops import ModelFlops, Peak, device_peak, mfu, model_flops
from .model import load_model, load_tokenizer
from .outputs import MetricsLog, export_model, git_commit, versions, write_json, write_predictions
from .plots import CAPTIONS, model_plots, parse_metrics
from .progress import ProgressView, TrainingProgress, rng_state, seed_everything, set_rng_state
from .shards import Prepared, ShardReader, open_prepared, plan_epoch, prepare, prepared_root, spec_from_config
from .sparse_adam import catch_up_rows
from .stopping import STOP, Clock, Preempted

log = logging.getLogger("raytag")

Report = Callable[[dict[str, Any], "str | None"], None]
Notices = Callable[[], "str | None"]
NOTICE_POLL_S = 2.0  # how often rank 0's clock asks for outside notices (the driver's stop, a node drain)


@dataclass
class Data:
    """The prepared training shards' index (each rank reads its own shards' windows on demand) and
    the evaluation sets, read and tokenised on every worker."""

    splits: dict[str, Split]  # evaluation sets only
    labels: list[str]
    tokenizer: Any
    tokenizer_sha: str
    encoded: dict[str, Encoded]  # evaluation sets only
    train: Prepared
    weights: dict[str, float]  # corpus -> sampling weight

    @property
    def lengths(self) -> np.ndarray:  # train windows' token counts
        return self.train.lengths

    @property
    def eval_names(self) -> list[str]:
        """Evaluated during training: validation first, then the named sets."""
        return [n for n in self.splits if n not in ("train", "test")]


@dataclass
class Session:
    """The pieces one evaluation or save needs (built once in `train_loop`)."""

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
    batch_tokens: int  # train.batch_tokens as resolved (`auto` -> a number)
    clock: Clock  # rank 0 decides when a time-based checkpoint is due
    reader: ShardReader  # this rank's training shards
    flops: ModelFlops  # what a window's training FLOPs depend on
    peak: Peak  # one device's peak FLOP/s in this run's precision (rank 0's, the same on every rank)


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
    from raytag.cluster.run import RunStore
    from raytag.cluster.runlock import new_owner
    from raytag.cluster.storage import open_storage

    cfg: Config = from_dict(config)
    tc, mc, rc = cfg.train, cfg.model, cfg.run
    group = dist.group(int(os.environ.get("LOCAL_RANK", "0")))
    # No launcher's group (Ray Train's): DeepSpeed starts one at engine build, and this run ends it.
    own_group = not dist.initialized()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    device = rank_device(cfg.scaling.use_gpu, device)

    # ---- the run's storage: checks, lease, working folder (in place, or a node's staging folder)
    storage = open_storage(rc.storage, endpoint_url=rc.s3_endpoint_url, region=rc.s3_region)
    error: BaseException | None = None
    if group.rank == 0:
        try:
            storage.preflight(create_bucket=rc.create_bucket)
        except BaseException as exc:
            error = exc
    group.agree(error)
    run = RunStore.open(
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
    )
    success = False
    metrics: MetricsLog | None = None
    try:
        finished = run.read_json("results.json") if run.finished and not rc.new_run else None
        if finished is not None and not trains_longer(cfg, finished):
            log.info(
                "run %r in %s already finished: results.json exists (set run.new_run=true to train again, "
                "or raise train.epochs / train.max_steps to train on)",
                rc.name,
                storage.uri,
            )
            success = True
            return finished

        # ---- data, model, engine
        data = load_data(cfg, group)
        world, accum = group.world, tc.gradient_accumulation_steps

        def plan_at(tokens: int, epoch: int, pool: int) -> tuple[StepPlan, list[int]]:
            return plan_epoch(
                data.train,
                data.weights,
                tokens,
                tc.max_batch_sentences,
                tc.seed,
                epoch,
                world,
                group.rank,
                accum,
                pool,
            )

        # `auto`: from the data alone, the same on every rank
        batch_tokens, pool_batches = resolve_batch_tokens(
            tc.batch_tokens,
            data.lengths,
            world * accum,
            tc.epochs,
            tc.max_batch_sentences,
            log.info if group.rank == 0 else None,
            steps_at=lambda tokens, pool: len(plan_at(tokens, 0, pool)[0].steps),
        )

        def epoch_plan(epoch: int) -> StepPlan:  # the same global plan on every rank: (seed, epoch) only
            plan, shards = plan_at(batch_tokens, epoch, pool_batches)
            log.info("rank %d, epoch %d: %d shard(s) of its own to read", group.rank, epoch, len(shards))
            return plan

        reader = ShardReader(
            data.train, storage_of(cfg), group.rank, lanes=accum, retry_budget_s=rc.storage_retry_seconds
        )

        steps_per_epoch = len(epoch_plan(0).steps)
        total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
        if finished is not None:  # a finished run asked to train longer (as the HF Trainer resumes)
            done = int(finished.get("global_steps") or 0)
            if total_steps <= done:
                log.info(
                    "run %r already finished at step %d; the new train.epochs / train.max_steps plan %d steps: "
                    "nothing to add",
                    rc.name,
                    done,
                    total_steps,
                )
                success = True
                return finished
            log.info(
                "run %r finished at step %d; training on to step %d from its last checkpoint, the learning-rate "
                "schedule re-planned to end there",
                rc.name,
                done,
                total_steps,
            )
        spec = engine_spec(cfg, world, total_steps, device.type == "cuda")
        attention = attention_kernel(mc.attention, spec)
        model = load_model(mc.name_or_path, data.labels, data.tokenizer, tc.seed, mc.dropout, attention)
        model.to(device)
        spec = fit_embedding_updates(spec, tc.embedding_updates, model)
        engine = build_engine(model, spec, device_rank=device.index if device.type == "cuda" else None)

        # ---- resume: rank 0 picks the checkpoint, every rank loads its own part of it
        progress, resumed_from = TrainingProgress(), None
        info = run.resume_point() if rc.resume and not rc.new_run else None
        if info is not None:
            error = None
            if group.rank == 0:
                try:
                    check_resume(
                        cfg,
                        info,
                        run.stored_file,
                        data.labels,
                        data.tokenizer_sha,
                        world,
                        data.train.fingerprint,
                    )
                except BaseException as exc:
                    error = exc
            group.agree(error)
            folder = run.fetch(info)
            engine.load_checkpoint(str(folder), tag="ds", load_module_strict=True)
            progress = TrainingProgress.load(folder / "progress.json")
            rng_file = folder / f"rng-rank{group.rank}.pt"
            if rng_file.exists():
                set_rng_state(torch.load(rng_file, weights_only=False))
            resumed_from = info.name
            log.info(
                "resumed from checkpoint %s (step %d, epoch %d) in %s",
                info.name,
                progress.global_step,
                progress.epoch,
                run.uri,
            )
            if group.rank == 0:  # the run's metrics up to this checkpoint travel inside it
                if (folder / "metrics.jsonl").is_file():
                    shutil.copyfile(folder / "metrics.jsonl", run.workdir / "metrics.jsonl")
                else:  # a checkpoint from before raytag kept them there
                    run.get_file("metrics.jsonl")

        if group.rank == 0:  # rank 0 alone writes the run's files (ranks may share the working folder)
            metrics = MetricsLog(
                run.workdir / "metrics.jsonl",
                progress.global_step if resumed_from else None,
                tensorboard=rc.tensorboard,
            )
            if resumed_from:
                publish_metrics(run, metrics)  # the bucket's copy may lag the checkpoint's (a failed upload)
            (run.workdir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
            write_json(run.workdir / "labels.json", data.labels)
            run.publish("config.yaml")
            run.publish("labels.json")
            log.info(
                "run %s: %d train windows (%d sentences, %d shards), %d steps (%d per epoch), %d labels, %s%s, "
                "%s attention, %s embedding updates, ZeRO-%d, %d worker(s), outputs in %s",
                rc.name,
                len(data.lengths),
                data.train.manifest["sentences"],
                data.train.num_shards,
                total_steps,
                steps_per_epoch,
                len(data.labels),
                spec.precision,
                " (autocast, fp32 weights)" if spec.cpu_autocast else "",
                attention,
                "sparse (RowSparseAdamW)" if spec.sparse_embeddings else "dense",
                spec.zero_stage,
                world,
                run.uri,
            )
        pad_id = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0
        view = ProgressView(
            total_steps, progress.global_step, enabled=group.rank == 0, log_every=tc.log_every
        )
        clock = Clock(tc.save_every_minutes, NOTICE_POLL_S if notices else None, leader=group.rank == 0)
        peak = dist.broadcast_object(device_peak(device, spec.precision) if group.rank == 0 else None)
        if group.rank == 0:
            log.info(
                "MFU is measured against %s FLOP/s per device: %s",
                f"{peak.flops:.3g}" if peak.flops else "no peak",
                peak.source,
            )
        s = Session(
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
            batch_tokens,
            clock,
            reader,
            model_flops(engine.module),
            peak,
        )

        # ---- the loop
        window = _Window()
        engine.module.train()
        epoch = progress.epoch
        stop = progress.global_step >= total_steps
        while not stop:
            plan = epoch_plan(epoch)
            reader.start_epoch(epoch)
            for i in range(progress.step_in_epoch, len(plan.steps)):
                inject_fault(group.rank, progress.global_step + 1, "step")
                t0 = time.monotonic()
                mine = train_step(
                    engine, reader.windows, plan.steps[i], plan.labelled[i], world, pad_id, device
                )
                # one all-reduce per step: the figures, any rank's stop request, rank 0's timers
                loss, tokens, windows, squares, stops, due, poll = dist.all_sum(
                    [*(float(x) for x in mine), float(STOP.requested), *clock.votes()]
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
                progress.epoch_loss += loss
                progress.epoch_labelled += plan.labelled[i]
                progress.train_seconds += time.monotonic() - t0
                flops = s.flops.train_flops(tokens, squares)
                progress.train_flops += flops
                window.add(loss, plan.labelled[i], tokens, flops)
                gs = progress.global_step
                if gs % tc.log_every == 0 or gs == total_steps:
                    _log_train(s, window, progress, epoch + (i + 1) / len(plan.steps))
                end_of_epoch = i + 1 == len(plan.steps)
                stop = gs >= total_steps
                if end_of_epoch:
                    progress.epoch, progress.step_in_epoch = epoch + 1, 0
                if end_of_epoch or stop or (tc.eval_every is not None and gs % tc.eval_every == 0):
                    evaluate_and_save(s, progress, epoch + (i + 1) / len(plan.steps))
                elif (tc.save_every is not None and gs % tc.save_every == 0) or why_save or stops:
                    if why_save and not stops:
                        log.info("checkpoint at step %d: %s", gs, why_save)
                    save(s, progress, {})
                if stops:
                    stop_here(s, progress, total_steps)
                if stop:
                    break
            epoch += 1
        view.close()

        results = finish_run(s, progress, resumed_from)
        run.wait()
        success = True
        return results if group.rank == 0 else None
    finally:
        STOP.done()  # a stop request that came during the final scoring: the run finished anyway
        if metrics is not None:
            metrics.close()
        run.close(success)
        if own_group:
            end_local_process_group()


# ---------------------------------------------------------------------------------------------
# setup


def load_data(cfg: Config, group: Any = None) -> Data:
    """The training shards (prepared once: rank 0 finds or makes them, the other ranks open what it
    names) and every evaluation set, read, checked against the label set and tokenised."""
    rank = group.rank if group is not None else 0
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    tokenizer_sha = tokenizer_fingerprint(tokenizer)
    spec = train_spec(cfg)
    found: Prepared | None = None
    error: BaseException | None = None
    if rank == 0:
        try:
            found = prepare(spec, tokenizer_sha)
        except BaseException as exc:
            error = exc
    if group is not None and group.world > 1:
        group.agree(error)
        fp = group.broadcast(found.fingerprint if found is not None else None)
        if rank != 0:
            found = open_prepared(spec.prepared, fp, spec.endpoint_url, spec.region)
    elif error is not None:
        raise error
    assert found is not None
    _log_stats("train", found.manifest["stats"])
    labels = found.labels
    label2id = {lab: i for i, lab in enumerate(labels)}
    splits = read_splits(cfg)
    for sp in splits.values():  # evaluation files must only use known labels
        _check_labels(sp, label2id)
    mc = cfg.model
    encoded = {
        name: encode(sp.words, sp.tags, tokenizer, label2id, mc.max_length, mc.stride)
        for name, sp in splits.items()
    }
    for name, enc in encoded.items():
        _log_stats(name, enc.stats)
    return Data(
        splits=splits,
        labels=labels,
        tokenizer=tokenizer,
        tokenizer_sha=tokenizer_sha,
        encoded=encoded,
        train=found,
        weights={c.name: c.weight for c in spec.corpora},
    )


def train_spec(cfg: Config):
    """What to prepare for training: data.train, or a hub dataset's training split written out once."""
    dc = cfg.data
    if dc.hf_dataset:
        import tempfile

        train = hub_splits(dc.hf_dataset, dc.max_train_samples, dc.max_eval_samples).get("train")
        if train is None:
            raise ConfigError(f"data.hf_dataset {dc.hf_dataset!r} has no train split")
        path = Path(tempfile.gettempdir()) / "raytag-hub" / f"{dc.hf_dataset.replace('/', '_')}-train.conll"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_conll(train, path)
        from dataclasses import replace

        cfg = replace(cfg, data=replace(dc, train=str(path)))
    return spec_from_config(cfg)


def storage_of(cfg: Config):
    """The storage that holds the prepared shards (data.prepared, default <run.storage>/prepared-data)."""
    from raytag.cluster.storage import open_storage

    return open_storage(prepared_root(cfg), endpoint_url=cfg.run.s3_endpoint_url, region=cfg.run.s3_region)


def _log_stats(name: str, st: dict[str, int]) -> None:
    if st.get("split_sentences") or st.get("cut_words") or st.get("empty_words"):
        log.info(
            "%s: %d sentence(s) longer than the window were split into overlapping windows; "
            "%d over-long word(s) cut to the window; %d word(s) with no sub-words mapped to <unk>",
            name,
            st.get("split_sentences", 0),
            st.get("cut_words", 0),
            st.get("empty_words", 0),
        )


# ---------------------------------------------------------------------------------------------
# one optimizer step


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
        logits = engine(**batch).logits.float()
        ce = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE, reduction="sum"
        )
        if not bool((labels != IGNORE).any()):
            ce = logits.sum() * 0.0
        engine.backward(ce * world / max(1, step_labelled), scale_wrt_gas=False)
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
    """Training figures since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.labelled, self.tokens, self.flops = 0.0, 0.0, 0.0, 0.0
        self.t0 = time.monotonic()

    def add(self, loss: float, labelled: int, tokens: float, flops: float) -> None:
        self.loss += loss
        self.labelled += labelled
        self.tokens += tokens
        self.flops += flops


def _log_train(s: Session, window: _Window, progress: TrainingProgress, epoch_f: float) -> None:
    lr = float(s.engine.get_lr()[0])
    mean_loss = window.loss / max(1.0, window.labelled)
    seconds = max(1e-9, time.monotonic() - window.t0)
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
                "mfu": _round(mfu(window.flops / seconds, s.peak, dist.world())),
            }
        )
        publish_metrics(s.run, s.metrics)
    s.view.update(progress.global_step, mean_loss, tok_s, lr)
    window.reset()


def publish_metrics(run, metrics: MetricsLog) -> None:
    """Mirror metrics.jsonl and the TensorBoard event file to the run's storage (in the background)."""
    for rel in metrics.files():
        run.publish(rel)


# ---------------------------------------------------------------------------------------------
# evaluation and checkpoints


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

    folder = s.run.checkpoint_folder(progress.global_step)
    s.engine.save_checkpoint(str(folder), tag="ds", save_latest=False)
    rank = dist.rank()
    torch.save(rng_state(), folder / f"rng-rank{rank}.pt")
    if rank == 0:
        progress.save(folder / "progress.json")
        write_json(folder / "labels.json", s.data.labels)
        (folder / "tokenizer.sha256").write_text(s.data.tokenizer_sha)
        (folder / "data.fingerprint").write_text(s.data.train.fingerprint)  # the plan's index
        (folder / "config.yaml").write_text(dump_yaml(s.cfg), encoding="utf-8")
        if (s.run.workdir / "metrics.jsonl").is_file():  # what a resume from here continues
            shutil.copyfile(s.run.workdir / "metrics.jsonl", folder / "metrics.jsonl")
    best = checkpoint_name(progress.best_step) if progress.best_step is not None else None
    s.run.commit(progress.global_step, folder, eval_metrics, {"best": best, "world": dist.world()})
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


# ---------------------------------------------------------------------------------------------
# finish


def finish_run(s: Session, progress: TrainingProgress, resumed_from: str | None) -> dict[str, Any] | None:
    """Load the best checkpoint's weights, export model/, score every evaluation set with them, write results."""
    from raytag.cluster.checkpoints import checkpoint_name

    cfg, run, data = s.cfg, s.run, s.data
    run.wait()  # every checkpoint committed (all ranks agree), so the best one can be read back
    best = checkpoint_name(progress.best_step) if progress.best_step is not None else None
    if best is not None and progress.best_step != progress.global_step:
        info = (
            next((i for i in run.store.list_complete() if i.name == best), None) if dist.rank() == 0 else None
        )
        info = dist.broadcast_object(info)
        if info is None:
            raise RuntimeError(f"the best checkpoint {best} is missing from {run.uri}; cannot score with it")
        folder = run.fetch(info, into="best")
        s.engine.load_checkpoint(str(folder), tag="ds", load_module_strict=True)
        run.drop_fetched("best")
        log.info(
            "loaded the best checkpoint %s (validation F1 %.4f) for testing and export",
            best,
            progress.best_f1,
        )
    model_from = best or checkpoint_name(progress.global_step)

    results: dict[str, Any] = {}
    preds: dict[str, EvalResult] = {}
    for name in [*data.eval_names, *(["test"] if "test" in data.splits else [])]:
        preds[name] = evaluate(s, name)
        results[name] = preds[name].metrics
    catch_up_rows(s.engine)  # the exported weights owe no sparse-update steps (also without evaluation)
    sd = full_state_dict(s.engine)  # every rank: a collective under ZeRO-3
    reads = dist.gather_objects(s.reader.opened)  # what each rank read (since this process started)
    if dist.rank() != 0:
        return None
    train = train_provenance(data)

    for name, res in preds.items():
        write_predictions(
            run.workdir / "predictions" / f"{name}.txt",
            data.splits[name].words,
            data.splits[name].tags,
            res.pred_tags,
        )
        run.publish(f"predictions/{name}.txt")
    train_seconds = progress.train_seconds
    tokens_per_second = progress.tokens_seen / max(1e-9, train_seconds)
    utilisation = mfu(progress.train_flops / max(1e-9, train_seconds), s.peak, dist.world())
    speed = {
        "training time (optimizer steps, this attempt and any it resumed)": f"{train_seconds:.1f} s",
        "real (non-pad) tokens per second, all workers": f"{tokens_per_second:,.0f}",
        "model FLOPs (6 x non-embedding parameters x tokens + attention)": f"{progress.train_flops:.3g}",
        "model FLOP utilisation (MFU)": "n/a" if utilisation is None else f"{100 * utilisation:.2f}%",
        "peak per device": f"{s.peak.flops:.3g} FLOP/s ({s.peak.source})" if s.peak.flops else s.peak.source,
        "devices": dist.world(),
    }
    logged = run.workdir / "metrics.jsonl"  # the plots beside the card: a failure to draw them only warns
    pngs, _ = model_plots(
        parse_metrics(logged.read_text(encoding="utf-8") if logged.is_file() else ""),
        results,
        {n: (data.splits[n].tags, p.pred_tags) for n, p in preds.items()},
        progress.best_step,
    )
    export_model(
        s.engine.module,
        sd,
        data.tokenizer,
        run.workdir / "model",
        _export_meta(
            data.labels, cfg.model, model_from, s.spec, attention_kernel(cfg.model.attention, s.spec)
        ),
        _card(cfg, s.spec, s.batch_tokens, data.labels, data.splits, progress, results, train, speed, pngs),
        files=pngs,
    )
    run.publish("model")
    out = {
        **results,
        "train_runtime_seconds": round(train_seconds, 3),
        "train_tokens_per_second": tokens_per_second,
        "train_flops": progress.train_flops,  # model FLOPs (trainer/flops.py), all workers
        "train_mfu": _round(utilisation),
        "peak_flops_per_device": s.peak.flops,
        "peak_flops_source": s.peak.source,
        "devices": dist.world(),
        "train_tokens": progress.tokens_seen,
        "train_sentences_per_step": progress.windows_seen / max(1, progress.global_step),
        "global_steps": progress.global_step,
        "epochs": progress.history[-1]["epoch"] if progress.history else 0,
        "best_step": progress.best_step,
        "best_checkpoint": best,
        "model_checkpoint": model_from,
        "resumed_from": resumed_from,
        "labels": data.labels,
        "train_data": {
            **train,
            # rank -> [[epoch, shard], ...]: the shards each rank loaded (this attempt; a resumed run's
            # earlier reads are not repeated here)
            "reads": {str(r): [list(x) for x in part] for r, part in enumerate(reads)},
        },
        "provenance": {
            "raytag_version": versions().get("raytag"),
            "git_commit": git_commit(),
            "packages": versions(),
            "data": {
                "train": {  # the preparation's fingerprint: inputs' content, tokenizer, window, tag settings
                    "path": [f["uri"] for c in data.train.manifest["corpora"].values() for f in c["files"]],
                    "sha256": data.train.fingerprint,
                    "sentences": data.train.manifest["sentences"],
                    "scheme": sorted(
                        {f["scheme"] for c in data.train.manifest["corpora"].values() for f in c["files"]}
                    ),
                    "repaired_stray_I": sum(
                        f["repaired"] for c in data.train.manifest["corpora"].values() for f in c["files"]
                    ),
                },
                **{
                    n: {
                        "path": sp.path,
                        "sha256": sp.sha256,
                        "sentences": len(sp.sentences),
                        "scheme": sp.scheme,
                        "repaired_stray_I": sp.repaired,
                    }
                    for n, sp in data.splits.items()
                },
            },
            "config": to_dict(cfg),
        },
    }
    write_json(run.workdir / "results.json", out)
    run.publish("results.json")
    log.info("done: %s", ", ".join(f"{k} F1 {v['f1']:.4f}" for k, v in results.items()) or "no evaluation")
    return out


# ---------------------------------------------------------------------------------------------
# data and resume checks (also run by the Ray launcher in the driver, before any worker starts)


def read_splits(cfg: Config) -> dict[str, Split]:
    """The evaluation sets: validation, the named sets, test (local files or s3:// objects)."""
    dc = cfg.data
    if dc.hf_dataset:
        hub = hub_splits(dc.hf_dataset, dc.max_train_samples, dc.max_eval_samples)
        return {k: v for k, v in hub.items() if k != "train"}
    splits: dict[str, Split] = {}
    for name, path in [("validation", dc.validation), *dc.eval_sets.items(), ("test", dc.test)]:
        if path:
            if name in splits or name == "train":
                raise ConfigError(f"data.eval_sets.{name}: the name is taken by a standard split")
            splits[name] = read_split(
                name,
                path,
                tag_scheme=dc.tag_scheme,
                strict=dc.strict,
                max_sentences=dc.max_eval_samples,
                labels=None,
                endpoint_url=cfg.run.s3_endpoint_url,
                region=cfg.run.s3_region,
            )
    return splits


def _check_labels(split: Split, label2id: dict[str, int]) -> None:
    from .conll import ConllError

    for sent in split.sentences:
        for i, tag in enumerate(sent.tags):
            if tag not in label2id:
                raise ConllError(
                    split.path,
                    sent.line + i,
                    f"label '{tag}' does not occur in the training data's label set ({', '.join(label2id)})",
                )


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, normaliser, specials)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Keys a resumed run may change: extending or re-pacing a run, or where it runs.
RESUMABLE_CHANGES = (
    "max_steps",
    "epochs",
    "eval_every",
    "save_every",
    "save_every_minutes",
    "log_every",
    "threads",
    "eval_batch_tokens",
)


def check_resume(
    cfg: Config,
    info,
    read: Callable[[Any, str], bytes | None],
    labels: list[str],
    tokenizer_sha: str,
    world: int,
    data_fingerprint: str | None = None,
) -> None:
    """Refuse (ConfigError) to resume checkpoint `info` of a run whose labels, tokenizer, training
    config or worker count differ from this one's. `read(info, name)` gives a file of the checkpoint.

    The worker count is fixed for a run: the data plan cuts each step into `workers x accumulation`
    micro-batches and ZeRO partitions optimizer state per worker, so a different count would skip
    or repeat data and load mismatched partitions.
    """
    import yaml

    name = cfg.run.name
    stored_world = info.meta.get("world")
    if stored_world is not None and int(stored_world) != world:
        raise ConfigError(
            f"cannot resume run {name!r}: it was trained with {stored_world} worker(s) and this run has {world} "
            f"(scaling.num_workers); the data order and ZeRO partitions depend on the count: set "
            f"scaling.num_workers={stored_world}, or run.new_run=true to start over"
        )
    stored_data = (read(info, "data.fingerprint") or b"").decode().strip() or None
    if stored_data is not None and data_fingerprint is not None and stored_data != data_fingerprint:
        raise ConfigError(
            f"cannot resume run {name!r}: its training data differ from the stored run's (prepared data "
            f"{stored_data} -> {data_fingerprint}: the inputs' content or the preparation settings changed, "
            f"and the data plan depends on them); set run.new_run=true to start over"
        )
    stored_tok = (read(info, "tokenizer.sha256") or b"").decode().strip() or None
    if stored_tok is not None and stored_tok != tokenizer_sha:
        raise ConfigError(
            f"cannot resume run {name!r}: the tokenizer of {cfg.model.name_or_path!r} differs from the "
            f"stored run's (sha256 {stored_tok[:12]} -> {tokenizer_sha[:12]}); set run.new_run=true to start over"
        )
    stored = json.loads(read(info, "labels.json") or b"null")
    if stored is not None and stored != labels:
        raise ConfigError(
            f"cannot resume run {name!r}: its labels {stored} differ from this data's "
            f"{labels} (set run.new_run=true to start over)"
        )
    old = yaml.safe_load(read(info, "config.yaml") or b"") or {}
    new = to_dict(cfg)
    diffs = []
    for section in ("data", "model", "train"):
        for k, v in (new.get(section) or {}).items():
            if k in RESUMABLE_CHANGES:
                continue
            if (old.get(section) or {}).get(k) != v:
                diffs.append(f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {v!r}")
    if diffs:
        raise ConfigError(
            f"cannot resume run {name!r}: config differs from the stored run: "
            f"{'; '.join(diffs)} (set run.new_run=true to start over, or use another run.name)"
        )


def trains_longer(cfg: Config, results: dict[str, Any]) -> bool:
    """Whether this config trains longer than the finished run's (train.epochs or train.max_steps changed)."""
    old = ((results.get("provenance") or {}).get("config") or {}).get("train") or {}
    return old.get("epochs") != cfg.train.epochs or old.get("max_steps") != cfg.train.max_steps


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def _grad_norm(engine) -> float | None:
    try:
        g = engine.get_global_grad_norm()
    except Exception:  # not every DeepSpeed optimizer wrapper exposes it
        return None
    return None if g is None else float(g)


def train_provenance(data: Data) -> dict[str, Any]:
    """Where the training windows came from: the preparation, its corpora (files, weights, sentences)."""
    m = data.train.manifest
    return {
        "prepared": data.train.uri,
        "fingerprint": data.train.fingerprint,
        "reused": data.train.reused,
        "sentences": m["sentences"],
        "windows": m["windows"],
        "shards": len(m["shards"]),
        "corpora": {
            name: {
                "weight": data.weights.get(name, 1.0),
                "sentences": c["sentences"],
                "shards": len(c["shards"]),
                "files": [f["uri"] for f in c["files"]],
            }
            for name, c in m["corpora"].items()
        },
    }


def _export_meta(labels: list[str], mc, checkpoint: str, spec: EngineSpec, attention: str) -> dict[str, Any]:
    return {
        "labels": labels,
        "checkpoint": checkpoint,  # the checkpoint whose weights these are (the best by validation F1)
        "max_length": mc.max_length,
        "stride": mc.stride,
        # how the run evaluated (`raytag predict` does the same, so its scores equal results.json's)
        "precision": spec.precision,
        "attention": attention,
        "raytag_version": versions().get("raytag"),
    }


def _card(
    cfg: Config,
    spec: EngineSpec,
    batch_tokens: int,
    labels,
    splits,
    progress: TrainingProgress,
    results,
    train: dict[str, Any],
    speed: dict[str, Any],
    plots: dict[str, bytes] | None = None,
) -> str:
    tc = cfg.train
    hyper = {
        "learning_rate": tc.learning_rate,
        "epochs": tc.epochs,
        "max_steps": tc.max_steps,
        "batch_tokens (per worker)": batch_tokens if tc.batch_tokens != "auto" else f"{batch_tokens} (auto)",
        "gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "workers": cfg.scaling.num_workers,
        "optimizer": f"AdamW (betas {tc.adam_beta1}, {tc.adam_beta2}, "
        f"eps {tc.adam_epsilon}, weight decay {tc.weight_decay})",
        "lr_scheduler": "linear with warm-up",
        "warmup_ratio": tc.warmup_ratio,
        "max_grad_norm": tc.max_grad_norm,
        "zero_stage": spec.zero_stage,  # as run (one worker runs ZeRO-0)
        "precision": spec.precision
        + (" (autocast: fp32 weights, bf16 matmuls)" if spec.cpu_autocast else ""),
        "word-embedding updates": "sparse (AdamW over the rows a step touched, missed steps caught up)"
        if spec.sparse_embeddings
        else "dense",
        "seed": tc.seed,
        "max_length": cfg.model.max_length or "model default",
        "stride": cfg.model.stride,
    }
    data = {
        f"train ({name}, weight {c['weight']:g})" if len(train["corpora"]) > 1 else "train": {
            "path": ", ".join(c["files"][:3])
            + (f" (+{len(c['files']) - 3} more)" if len(c["files"]) > 3 else ""),
            "sha256": train["fingerprint"],
            "sentences": c["sentences"],
        }
        for name, c in train["corpora"].items()
    }
    data.update(
        {n: {"path": s.path, "sha256": s.sha256, "sentences": len(s.sentences)} for n, s in splits.items()}
    )
    return render_card(
        run_name=cfg.run.name,
        base_model=cfg.model.name_or_path,
        labels=labels,
        data=data,
        hyperparameters=hyper,
        history=progress.history,
        results=results,
        versions=versions(),
        best_step=progress.best_step,
        speed=speed,
        plots={f: CAPTIONS[f] for f in plots} if plots else None,  # none drawn: the card says so
    )
