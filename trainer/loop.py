"""The training loop: one function, top to bottom, run by every worker (or in-process locally).

setup     config -> storage, data, labels, tokenizer, windows, model, DeepSpeed engine
resume    newest complete checkpoint of this run, if any
loop      global batch plan -> this rank's micro-batches -> forward/backward/step; log
evaluate  after each epoch (and every train.eval_every steps): validation + named sets
save      checkpoint after each evaluation (and every train.save_every steps); best model export
finish    test with the best model, results.json, model card
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batching import StepPlan, plan_batches, resolve_batch_tokens, shard_steps
from .card import render_card
from .config import Config, ConfigError, dump_yaml, from_dict, to_dict
from .data import Split, hub_splits, make_labels, read_split
from .engine import EngineSpec, build_engine, full_state_dict, resolve_precision
from .evaluate import EvalResult, collate, finish, predict_windows
from .features import IGNORE, encode
from .model import load_model, load_tokenizer
from .outputs import MetricsLog, export_model, git_commit, versions, write_json, write_predictions
from .progress import ProgressView, TrainingProgress, rng_state, seed_everything, set_rng_state

log = logging.getLogger("raytag")

Report = Callable[[dict[str, Any], "Path | None"], None]


# ---------------------------------------------------------------------------------------------
# Small helpers with distributed invariants made visible


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_rank_zero() -> bool:
    return dist_info()[0] == 0


def barrier() -> None:
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (every rank must call it)."""
    if dist_info()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    if dist_info()[1] == 1:
        return [obj]
    out: list[Any] = [None] * dist_info()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------


def train_loop(config: dict[str, Any], report: Report | None = None) -> dict[str, Any] | None:
    """Train per `config` (a Config as a dict). Returns results on rank 0 (None elsewhere).

    `report(metrics, checkpoint_dir)` is called by every rank after each evaluation (the Ray
    launcher passes one that reports to Ray Train); local runs pass None.
    """
    from raytag.cluster.checkpoints import CheckpointStore, RunFiles
    from raytag.cluster.runlock import RunLock, new_owner
    from raytag.cluster.storage import open_storage

    cfg: Config = from_dict(config)
    tc, dc, mc, rc = cfg.train, cfg.data, cfg.model, cfg.run
    rank, world = dist_info()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    if cfg.scaling.use_gpu and not torch.cuda.is_available():
        raise ConfigError("scaling.use_gpu is true but torch sees no GPU on this worker")
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")

    # ---- storage: the run's folder (local) or a staging folder mirrored to S3
    storage = open_storage(rc.storage, endpoint_url=rc.s3_endpoint_url, region=rc.s3_region)
    if is_rank_zero():
        storage.preflight(create_bucket=rc.create_bucket)
    run_key = rc.name
    local = storage.local_path(run_key)
    # Remote storage: a staging folder per node (shared by the node's ranks), mirrored to the bucket.
    run_dir = local if local is not None else Path(tempfile.gettempdir()) / "raytag-staging" / rc.name
    if local is None and local_rank == 0 and run_dir.exists():
        shutil.rmtree(run_dir)  # the bucket is the run's memory; never trust leftovers on the node
    barrier()
    run_dir.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(storage, run_key, keep_best=rc.keep_best, metric="f1", log=log.info)
    files = RunFiles(storage, run_key, log=log.info)

    lock = RunLock(storage, run_key, rc.owner or new_owner()) if is_rank_zero() else None
    if lock is not None:
        lock.check()  # before anything is deleted or written: a second live job is refused here
    if rc.new_run and is_rank_zero():
        storage.delete_prefix(f"{run_key}/")
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    if not rc.new_run and storage.exists(f"{run_key}/results.json"):
        log.info(
            "run %r in %s already finished: results.json exists (set run.new_run=true to train again)",
            rc.name,
            storage.uri,
        )
        import json

        return json.loads(storage.get_bytes(f"{run_key}/results.json") or b"{}")

    if lock is not None:
        lock.acquire()
    try:
        # ---- data and labels
        splits = _read_splits(cfg)
        train = splits.get("train")
        if train is None:
            raise ConfigError("data.train: no training file given")
        labels = make_labels(train, dc.labels)
        label2id = {lab: i for i, lab in enumerate(labels)}
        for name, sp in splits.items():  # evaluation files must only use known labels
            if name != "train":
                _check_labels(sp, label2id)
        tokenizer = load_tokenizer(mc.name_or_path)
        encoded = {
            name: encode(sp.words, sp.tags, tokenizer, label2id, mc.max_length, mc.stride)
            for name, sp in splits.items()
        }
        for name, enc in encoded.items():
            st = enc.stats
            if st["split_sentences"] or st["cut_words"] or st["empty_words"]:
                log.info(
                    "%s: %d sentence(s) longer than the window were split into overlapping windows; "
                    "%d over-long word(s) cut to the window; %d word(s) with no sub-words mapped to <unk>",
                    name,
                    st["split_sentences"],
                    st["cut_words"],
                    st["empty_words"],
                )
        train_enc = encoded["train"]
        lengths = [len(w) for w in train_enc.windows]
        labelled = [int((w.labels != IGNORE).sum()) for w in train_enc.windows]
        real_tokens = np.asarray(lengths, dtype=np.int64)

        # ---- the whole schedule is planned up front from (seed, epoch): identical on every rank
        accum = tc.gradient_accumulation_steps
        batch_tokens = resolve_batch_tokens(
            tc.batch_tokens,
            lengths,
            world * accum,
            tc.epochs,
            tc.max_batch_sentences,
            log.info if is_rank_zero() else None,
        )

        def epoch_plan(epoch: int) -> StepPlan:
            batches = plan_batches(lengths, batch_tokens, tc.max_batch_sentences, tc.seed, epoch)
            return shard_steps(batches, labelled, world, rank, accum)

        steps_per_epoch = len(epoch_plan(0).steps)
        if tc.max_steps:
            total_steps = tc.max_steps
        else:
            total_steps = max(1, math.ceil(tc.epochs * steps_per_epoch))
        warmup = int(round(tc.warmup_ratio * total_steps))

        # ---- model and engine
        model = load_model(mc.name_or_path, labels, tokenizer, tc.seed, mc.dropout)
        model.to(device)
        precision = resolve_precision(tc.precision, use_gpu)
        forced_stage = (tc.deepspeed.get("zero_optimization") or {}).get("stage")
        if forced_stage is not None:  # explicit DeepSpeed JSON wins
            zero_stage = int(forced_stage)
        elif world == 1 and tc.zero_stage in (1, 2):
            # ZeRO-1/2 partition optimizer state and gradients across data-parallel workers; with one
            # worker nothing is partitioned and the flat-buffer copies cost time: a step of the 384-wide
            # offline encoder takes 2.2x as long under ZeRO-2 on CPU (bench/engine_step.py).
            log.info("one worker: ZeRO-%d has nothing to partition, running ZeRO-0", tc.zero_stage)
            zero_stage = 0
        else:
            zero_stage = tc.zero_stage
        spec = EngineSpec(
            learning_rate=tc.learning_rate,
            weight_decay=tc.weight_decay,
            betas=(tc.adam_beta1, tc.adam_beta2),
            eps=tc.adam_epsilon,
            total_steps=total_steps,
            warmup_steps=warmup,
            zero_stage=zero_stage,
            precision=precision,
            accumulation=accum,
            max_grad_norm=tc.max_grad_norm,
            world_size=world,
            extra=tc.deepspeed,
        )
        engine = build_engine(model, spec)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        # ---- resume
        progress = TrainingProgress()
        resumed_from = None
        if rc.resume and not rc.new_run:
            info = store.latest()
            if info is not None:
                ckpt = store.download(info, run_dir / "checkpoints" / info.name)
                _guard_resume(ckpt, labels, tokenizer_fingerprint(tokenizer), cfg)
                engine.load_checkpoint(str(ckpt), tag="ds", load_module_strict=True)
                progress = TrainingProgress.load(ckpt / "progress.json")
                rng_file = ckpt / f"rng-rank{rank}.pt"
                if rng_file.exists():
                    set_rng_state(torch.load(rng_file, weights_only=False))
                resumed_from = info.name
                log.info(
                    "resumed from checkpoint %s (step %d, epoch %d) in %s",
                    info.name,
                    progress.global_step,
                    progress.epoch,
                    storage.uri,
                )
        if resumed_from and local is None and is_rank_zero():
            # A fresh machine resuming from the bucket: continue the bucket's metrics and best model.
            storage.get_file(f"{run_key}/metrics.jsonl", run_dir / "metrics.jsonl")
            for key in storage.list(f"{run_key}/model/"):
                storage.get_file(key, run_dir / key[len(run_key) + 1 :])
        metrics = (
            MetricsLog(run_dir / "metrics.jsonl", progress.global_step if resumed_from else None)
            if is_rank_zero()
            else None
        )

        if is_rank_zero():
            (run_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
            write_json(run_dir / "labels.json", labels)
            files.sync("config.yaml", run_dir / "config.yaml")
            files.sync("labels.json", run_dir / "labels.json")
            log.info(
                "run %s: %d train windows (%d sentences), %d steps (%d per epoch), %d labels, %s, ZeRO-%d, "
                "%d worker(s), outputs in %s",
                rc.name,
                len(train_enc.windows),
                len(train.sentences),
                total_steps,
                steps_per_epoch,
                len(labels),
                precision,
                zero_stage,
                world,
                f"{storage.uri}/{run_key}",
            )

        def log_record(record: dict[str, Any]) -> None:
            if metrics is not None:
                metrics.write(record)
                files.sync("metrics.jsonl", run_dir / "metrics.jsonl")

        # ---- evaluation, checkpointing, export: closures over the loop's state
        def evaluate(name: str) -> EvalResult:
            engine.module.eval()
            enc = encoded[name]
            preds, loss_sum, count = predict_windows(
                engine, enc, pad_id, device, tc.eval_batch_tokens, rank, world
            )
            merged: dict[int, np.ndarray] = {}
            for part in gather_objects(preds):
                merged.update(part)
            total_loss, total_count = all_sum([loss_sum, float(count)])
            engine.module.train()
            return finish(enc, merged, splits[name].tags, labels, total_loss, int(total_count))

        def save_checkpoint(eval_metrics: dict[str, Any] | None) -> Path:
            name = f"step-{progress.global_step:08d}"
            ckpt = run_dir / "checkpoints" / name
            if local_rank == 0 and ckpt.exists():  # a folder left by an attempt that died before its manifest
                shutil.rmtree(ckpt)
            barrier()
            engine.save_checkpoint(str(ckpt), tag="ds", save_latest=False)
            torch.save(rng_state(), ckpt / f"rng-rank{rank}.pt")
            if is_rank_zero():
                progress.save(ckpt / "progress.json")
                write_json(ckpt / "labels.json", labels)
                (ckpt / "tokenizer.sha256").write_text(tokenizer_fingerprint(tokenizer))
                (ckpt / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
            barrier()
            # Each rank uploads its own files (DeepSpeed's per-rank shards may sit on another node);
            # rank 0 then writes the manifest listing all of them, so it appears only once every
            # rank's files are in. On a local folder the files are already in place.
            own = _own_files(ckpt, rank) if world > 1 and local is None else None
            parts = gather_objects(store.upload_part(ckpt, name, own) if own is not None and rank > 0 else [])
            if is_rank_zero():
                peers = [e for part in parts[1:] for e in part]
                store.save(ckpt, name, progress.global_step, eval_metrics or {}, paths=own, peer_files=peers)
            barrier()
            return ckpt

        def export_best(history_results: dict[str, dict[str, Any]]) -> None:
            sd = full_state_dict(engine)  # every rank: a collective under ZeRO-3
            if is_rank_zero():
                export_model(
                    engine.module,
                    sd,
                    tokenizer,
                    run_dir / "model",
                    _export_meta(labels, mc),
                    _card(cfg, spec, labels, splits, progress, history_results),
                )
                files.sync_dir("model", run_dir / "model")

        # ---- the loop
        start_step = progress.global_step
        view = ProgressView(total_steps, start_step, enabled=is_rank_zero(), log_every=tc.log_every)
        window_loss, window_labelled, window_tokens, window_t0 = 0.0, 0.0, 0.0, time.monotonic()
        engine.module.train()
        epoch = progress.epoch
        stop = progress.global_step >= total_steps
        while not stop:
            plan = epoch_plan(epoch)
            for s in range(progress.step_in_epoch, len(plan.steps)):
                _inject_fault(rank, progress.global_step + 1)
                t0 = time.monotonic()
                step_loss, step_tokens, step_windows = 0.0, 0, 0
                for micro in plan.steps[s]:
                    if micro:
                        batch = collate(train_enc.windows, micro, pad_id, device)
                        step_tokens += int(real_tokens[micro].sum())
                        step_windows += len(micro)
                    else:  # this rank ran out of batches: a zero-weight dummy keeps collectives in step
                        batch = collate(train_enc.windows, [0], pad_id, device)
                        batch["labels"].fill_(IGNORE)
                    labels_t = batch.pop("labels")
                    logits = engine(**batch).logits.float()
                    valid = labels_t != IGNORE
                    ce = torch.nn.functional.cross_entropy(
                        logits.view(-1, logits.size(-1)),
                        labels_t.view(-1),
                        ignore_index=IGNORE,
                        reduction="sum",
                    )
                    if not valid.any():
                        ce = logits.sum() * 0.0
                    # Normalise by the global count of labelled tokens in this optimizer step; DeepSpeed
                    # averages gradients over ranks, hence the factor `world`.
                    loss = ce * world / max(1, plan.labelled[s])
                    engine.backward(loss, scale_wrt_gas=False)
                    engine.step()
                    step_loss += float(ce.detach())
                progress.step_in_epoch = s + 1
                progress.global_step += 1
                step_loss, step_tokens_all, step_windows_all = all_sum(
                    [step_loss, float(step_tokens), float(step_windows)]
                )
                progress.tokens_seen += int(step_tokens_all)
                progress.windows_seen += int(step_windows_all)
                progress.epoch_loss += step_loss
                progress.epoch_labelled += plan.labelled[s]
                progress.train_seconds += time.monotonic() - t0
                window_loss += step_loss
                window_labelled += plan.labelled[s]
                window_tokens += step_tokens_all
                gs = progress.global_step
                lr = float(engine.get_lr()[0])
                if gs % tc.log_every == 0 or gs == total_steps:
                    elapsed = time.monotonic() - window_t0
                    mean_loss = window_loss / max(1.0, window_labelled)
                    tok_s = window_tokens / max(1e-9, elapsed)
                    rec: dict[str, Any] = {
                        "type": "train",
                        "step": gs,
                        "epoch": round(epoch + (s + 1) / len(plan.steps), 4),
                        "loss": mean_loss,
                        "learning_rate": lr,
                        "grad_norm": _grad_norm(engine),
                        "tokens_per_second": tok_s,
                        "tokens_seen": progress.tokens_seen,
                    }
                    log_record(rec)
                    view.update(gs, mean_loss, tok_s, lr)
                    window_loss, window_labelled, window_tokens, window_t0 = 0.0, 0.0, 0.0, time.monotonic()
                end_of_epoch = s + 1 == len(plan.steps)
                stop = gs >= total_steps
                if end_of_epoch:
                    progress.epoch, progress.step_in_epoch = epoch + 1, 0
                do_eval = end_of_epoch or stop or (tc.eval_every is not None and gs % tc.eval_every == 0)
                if do_eval:
                    _evaluate_and_save(
                        cfg,
                        splits,
                        evaluate,
                        save_checkpoint,
                        export_best,
                        log_record,
                        progress,
                        epoch + (s + 1) / len(plan.steps),
                        view,
                        report,
                        run_dir,
                        files,
                    )
                elif tc.save_every is not None and gs % tc.save_every == 0:
                    ckpt = save_checkpoint(None)
                    if report is not None:
                        report({"step": gs}, ckpt)
                if stop:
                    break
            epoch += 1
        view.close()
        store.wait()

        # ---- finish: test with the best model, results.json, model card
        results = _finish(
            cfg, spec, splits, tokenizer, engine, evaluate, progress, labels, run_dir, files, resumed_from
        )
        store.wait()
        files.wait()
        store.close()
        return results if is_rank_zero() else None
    finally:
        # On any exit, finish the uploads already under way (nothing lost), then free the run.
        for closer in (store.close, files.wait):
            try:
                closer()
            except Exception as e:  # the run's own error (if any) is the one to report
                log.warning("%s", e)
        if lock is not None:
            lock.release()


def _evaluate_and_save(
    cfg,
    splits,
    evaluate,
    save_checkpoint,
    export_best,
    log_record,
    progress,
    epoch_f,
    view,
    report,
    run_dir,
    files,
) -> None:
    record: dict[str, Any] = {"step": progress.global_step, "epoch": round(epoch_f, 4)}
    val_metrics = None
    results_now: dict[str, dict[str, Any]] = {}
    for name in [n for n in splits if n not in ("train", "test")]:
        res = evaluate(name)
        log_record({"type": "eval", "split": name, **record, **res.metrics})
        results_now[name] = res.metrics
        view.write(
            f"eval {name} step {progress.global_step}: F1 {res.metrics['f1']:.4f} "
            f"P {res.metrics['precision']:.4f} R {res.metrics['recall']:.4f} loss {res.metrics['loss']:.4f}"
        )
        if name == "validation":
            val_metrics = res.metrics
            improved = progress.best_f1 is None or res.metrics["f1"] > progress.best_f1
            if improved:
                progress.best_f1, progress.best_step = res.metrics["f1"], progress.global_step
                progress.best_metrics = res.metrics
                if is_rank_zero():
                    write_predictions(
                        run_dir / "predictions" / "validation.txt",
                        splits[name].words,
                        splits[name].tags,
                        res.pred_tags,
                    )
                    files.sync("predictions/validation.txt", run_dir / "predictions/validation.txt")
        elif is_rank_zero():
            write_predictions(
                run_dir / "predictions" / f"{name}.txt", splits[name].words, splits[name].tags, res.pred_tags
            )
            files.sync(f"predictions/{name}.txt", run_dir / f"predictions/{name}.txt")
    hist = {
        "step": progress.global_step,
        "epoch": round(epoch_f, 4),
        "train_loss": progress.epoch_loss / max(1, progress.epoch_labelled),
    }
    progress.epoch_loss, progress.epoch_labelled = 0.0, 0
    if val_metrics is not None:
        hist.update({k: val_metrics[k] for k in ("f1", "precision", "recall", "accuracy", "loss")})
    progress.history.append(hist)
    if val_metrics is not None and progress.best_step == progress.global_step:
        export_best({"validation": val_metrics})
    ckpt = save_checkpoint({"f1": val_metrics["f1"]} if val_metrics else {})
    if report is not None:
        report(
            {"step": progress.global_step, **({"eval_f1": val_metrics["f1"]} if val_metrics else {})}, ckpt
        )


def _finish(cfg, spec, splits, tokenizer, engine, evaluate, progress, labels, run_dir, files, resumed_from):
    mc = cfg.model
    # Test (and the final export) use the best model by validation F1.
    best_dir = run_dir / "model"
    if (
        "validation" in splits
        and progress.best_step is not None
        and progress.best_step != progress.global_step
    ):
        if spec.zero_stage < 3:  # the stage the engine runs, not only the configured one
            # Rank 0 exported the best model on its node; a rank on another node fetches it.
            if is_rank_zero():
                files.wait()
            barrier()
            weights = best_dir / "model.safetensors"
            if not weights.exists():
                files.storage.get_file(f"{cfg.run.name}/model/model.safetensors", weights)
            _load_exported(engine, best_dir)
        else:
            log.warning("ZeRO-3: test uses the final weights, not the best checkpoint's")
    results: dict[str, Any] = {}
    if "validation" in splits and progress.best_metrics:
        results["validation"] = progress.best_metrics
    for name in [n for n in splits if n not in ("train", "validation", "test")]:
        res = evaluate(name)  # named sets: scored with the best model as well
        results[name] = res.metrics
        if is_rank_zero():
            write_predictions(
                run_dir / "predictions" / f"{name}.txt", splits[name].words, splits[name].tags, res.pred_tags
            )
            files.sync(f"predictions/{name}.txt", run_dir / f"predictions/{name}.txt")
    if "test" in splits:
        res = evaluate("test")
        results["test"] = res.metrics
        if is_rank_zero():
            write_predictions(
                run_dir / "predictions" / "test.txt", splits["test"].words, splits["test"].tags, res.pred_tags
            )
            files.sync("predictions/test.txt", run_dir / "predictions/test.txt")
    if "validation" not in splits:  # nothing to pick a best model by: export the final weights
        sd = full_state_dict(engine)
        if is_rank_zero():
            export_model(engine.module, sd, tokenizer, best_dir, _export_meta(labels, mc), "")
    if not is_rank_zero():
        return None
    train_seconds = progress.train_seconds
    out = {
        **results,
        "train_runtime_seconds": round(train_seconds, 3),
        "train_tokens_per_second": progress.tokens_seen / max(1e-9, train_seconds),
        "train_tokens": progress.tokens_seen,
        "train_sentences_per_step": progress.windows_seen / max(1, progress.global_step),
        "global_steps": progress.global_step,
        "epochs": progress.history[-1]["epoch"] if progress.history else 0,
        "best_step": progress.best_step,
        "resumed_from": resumed_from,
        "labels": labels,
        "provenance": {
            "raytag_version": versions().get("raytag"),
            "git_commit": git_commit(),
            "packages": versions(),
            "data": {
                n: {
                    "path": s.path,
                    "sha256": s.sha256,
                    "sentences": len(s.sentences),
                    "scheme": s.scheme,
                    "repaired_stray_I": s.repaired,
                }
                for n, s in splits.items()
            },
            "config": to_dict(cfg),
        },
    }
    # Rewrite the card with everything known now (test results included).
    card = _card(cfg, spec, labels, splits, progress, results)
    (best_dir / "README.md").write_text(card, encoding="utf-8")
    files.sync_dir("model", run_dir / "model")
    write_json(run_dir / "results.json", out)
    files.sync("results.json", run_dir / "results.json")
    log.info("done: %s", ", ".join(f"{k} F1 {v['f1']:.4f}" for k, v in results.items()) or "no evaluation")
    return out


def _read_splits(cfg: Config) -> dict[str, Split]:
    dc = cfg.data
    if dc.hf_dataset:
        return hub_splits(dc.hf_dataset, dc.max_train_samples, dc.max_eval_samples)
    splits: dict[str, Split] = {}
    if dc.train:
        splits["train"] = read_split(
            "train",
            dc.train,
            tag_scheme=dc.tag_scheme,
            strict=dc.strict,
            max_sentences=dc.max_train_samples,
            labels=dc.labels,
        )
    for name, path in [("validation", dc.validation), *dc.eval_sets.items(), ("test", dc.test)]:
        if path:
            if name in splits:
                raise ConfigError(f"data.eval_sets.{name}: the name is taken by a standard split")
            splits[name] = read_split(
                name,
                path,
                tag_scheme=dc.tag_scheme,
                strict=dc.strict,
                max_sentences=dc.max_eval_samples,
                labels=None,
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


def _guard_resume(ckpt: Path, labels: list[str], tokenizer_sha: str, cfg: Config) -> None:
    """Refuse to resume a run whose labels, tokenizer or training config differ from this one's."""
    import json

    import yaml

    stored_tok = (
        (ckpt / "tokenizer.sha256").read_text().strip() if (ckpt / "tokenizer.sha256").exists() else None
    )
    if stored_tok is not None and stored_tok != tokenizer_sha:
        raise ConfigError(
            f"cannot resume run {cfg.run.name!r}: the tokenizer of {cfg.model.name_or_path!r} differs from the "
            f"stored run's (sha256 {stored_tok[:12]} -> {tokenizer_sha[:12]}); set run.new_run=true to start over"
        )
    stored = json.loads((ckpt / "labels.json").read_text())
    if stored != labels:
        raise ConfigError(
            f"cannot resume run {cfg.run.name!r}: its labels {stored} differ from this data's "
            f"{labels} (set run.new_run=true to start over)"
        )
    old = yaml.safe_load((ckpt / "config.yaml").read_text())
    new = to_dict(cfg)
    diffs = []
    for section in ("data", "model", "train"):
        for k, v in (new.get(section) or {}).items():
            if k in ("max_steps", "epochs", "eval_every", "save_every", "log_every", "threads"):
                continue  # extending or re-pacing a run is allowed
            if (old.get(section) or {}).get(k) != v:
                diffs.append(f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {v!r}")
    if diffs:
        raise ConfigError(
            f"cannot resume run {cfg.run.name!r}: config differs from the stored run: "
            f"{'; '.join(diffs)} (set run.new_run=true to start over, or use another run.name)"
        )


def _inject_fault(rank: int, step: int) -> None:
    """Failure-recovery testing: RAYTAG_FAULT_INJECT="RANK:STEP:MARKER" kills that rank's process
    once, at the start of that step (the marker file records that it happened). Unset: nothing."""
    spec = os.environ.get("RAYTAG_FAULT_INJECT")
    if not spec:
        return
    want_rank, want_step, marker = spec.split(":", 2)
    if rank == int(want_rank) and step == int(want_step) and not Path(marker).exists():
        Path(marker).write_text(f"rank {rank} killed at step {step}\n")
        log.warning("RAYTAG_FAULT_INJECT: killing rank %d at step %d", rank, step)
        os._exit(17)


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng-rank)(\d+)")


def _own_files(folder: Path, rank: int) -> list[str]:
    """The checkpoint files this rank wrote: its DeepSpeed shards and RNG state; rank 0 owns the rest."""
    own = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            m = _RANK_FILE.search(path.name)
            if (int(m.group(1)) if m else 0) == rank:
                own.append(path.relative_to(folder).as_posix())
    return own


def _grad_norm(engine) -> float | None:
    try:
        g = engine.get_global_grad_norm()
    except Exception:  # not every DeepSpeed optimizer wrapper exposes it
        return None
    return None if g is None else float(g)


def _load_exported(engine, model_dir: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    module = engine.module
    with torch.no_grad():
        params = dict(module.named_parameters())
        for k, v in sd.items():
            if k in params:
                params[k].copy_(v.to(params[k].dtype))


def _export_meta(labels: list[str], mc) -> dict[str, Any]:
    return {
        "labels": labels,
        "max_length": mc.max_length,
        "stride": mc.stride,
        "raytag_version": versions().get("raytag"),
    }


def _card(cfg: Config, spec: EngineSpec, labels, splits, progress: TrainingProgress, results) -> str:
    tc = cfg.train
    hyper = {
        "learning_rate": tc.learning_rate,
        "epochs": tc.epochs,
        "max_steps": tc.max_steps,
        "batch_tokens (per worker)": tc.batch_tokens,
        "gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "workers": cfg.scaling.num_workers,
        "optimizer": f"AdamW (betas {tc.adam_beta1}, {tc.adam_beta2}, "
        f"eps {tc.adam_epsilon}, weight decay {tc.weight_decay})",
        "lr_scheduler": "linear with warm-up",
        "warmup_ratio": tc.warmup_ratio,
        "max_grad_norm": tc.max_grad_norm,
        "zero_stage": spec.zero_stage,  # as run (one worker runs ZeRO-0)
        "precision": spec.precision,
        "seed": tc.seed,
        "max_length": cfg.model.max_length or "model default",
        "stride": cfg.model.stride,
    }
    data = {n: {"path": s.path, "sha256": s.sha256, "sentences": len(s.sentences)} for n, s in splits.items()}
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
    )
