"""The run's finish: the best checkpoint's weights loaded back, every evaluation set (and test)
scored with them, model/ exported (Hugging Face format, plots, model card), predictions and
results.json (figures, provenance) written.

Every rank scores and gathers the weights (collectives); rank 0 alone writes the run's files.
"""

from __future__ import annotations

import logging
from typing import Any

from . import dist
from .card import render_card
from .config import Config, public_dict
from .engine import EngineSpec, attention_kernel, full_state_dict
from .evaluate import EvalResult
from .flops import mfu, rounded
from .outputs import export_model, git_commit, versions, write_json, write_predictions
from .plots import CAPTIONS, model_plots, parse_metrics
from .progress import TrainingProgress
from .resume import load_engine_state, needs_repartition
from .run_data import Data, train_provenance
from .session import Session, evaluate
from .sparse_adam import catch_up_rows

log = logging.getLogger("raytag")


def finish_run(s: Session, progress: TrainingProgress, resumed_from: str | None) -> dict[str, Any] | None:
    """Load the best checkpoint's weights, export model/, score every evaluation set with them, write results."""
    from raytag.cluster.checkpoints import checkpoint_name

    run = s.run
    run.wait()  # every checkpoint committed (all ranks agree), so the best one can be read back
    best = load_best(s, progress)
    model_from = best or checkpoint_name(progress.global_step)
    results, preds = score(s)
    catch_up_rows(s.engine)  # the exported weights owe no sparse-update steps (also without evaluation)
    sd = full_state_dict(s.engine)  # every rank: a collective under ZeRO-3
    reads = dist.gather_objects(s.reader.opened)  # what each rank read (since this process started)
    if dist.rank() != 0:
        return None

    # ---- rank 0 alone: the run's files
    train = train_provenance(s.data)
    for name, res in preds.items():
        write_predictions(
            run.workdir / "predictions" / f"{name}.txt",
            s.data.splits[name].words,
            s.data.splits[name].tags,
            res.pred_tags,
        )
        run.publish(f"predictions/{name}.txt")
    speed, figures = training_speed(s, progress)
    export(s, sd, progress, results, preds, train, speed, model_from)
    out = {
        **results,
        **figures,
        "devices": dist.world(),
        "train_tokens": progress.tokens_seen,
        "train_sentences_per_step": progress.windows_seen / max(1, progress.global_step),
        "global_steps": progress.global_step,
        "epochs": progress.history[-1]["epoch"] if progress.history else 0,
        "best_step": progress.best_step,
        "best_checkpoint": best,
        "model_checkpoint": model_from,
        "resumed_from": resumed_from,
        # train.time_budget: the plan (steps, warm-up, timings) and the seconds used and left
        **({"time_budget": progress.time_budget} if progress.time_budget else {}),
        "labels": s.data.labels,
        "train_data": {
            **train,
            # rank -> [[epoch, shard], ...]: the shards each rank loaded (this attempt; a resumed run's
            # earlier reads are not repeated here)
            "reads": {str(r): [list(x) for x in part] for r, part in enumerate(reads)},
            # per epoch: the windows trained on (each once: an epoch's plan, whatever the group) and
            # the worker counts it ran under, in order (an elastic run's resizes)
            "epochs": progress.epochs,
        },
        "provenance": provenance(s.cfg, s.data),
    }
    write_json(run.workdir / "results.json", out)
    run.publish("results.json")
    if s.metrics is not None:  # MLflow, when tracking: the figures, results.json, the card and its plots
        card = {f"card/{p.name}": p for p in sorted((run.workdir / "model").glob("*.png"))}
        s.metrics.results(
            out,
            progress.global_step,
            {
                "results.json": run.workdir / "results.json",
                "card/README.md": run.workdir / "model" / "README.md",
                **card,
            },
        )
    log.info("done: %s", ", ".join(f"{k} F1 {v['f1']:.4f}" for k, v in results.items()) or "no evaluation")
    return out


def load_best(s: Session, progress: TrainingProgress) -> str | None:
    """The best checkpoint's name (None: no validation); its weights loaded unless they are the last step's.

    Every rank: rank 0 finds it in the run's storage, every rank fetches and loads its own part.
    """
    from raytag.cluster.checkpoints import checkpoint_name

    run = s.run
    best = checkpoint_name(progress.best_step) if progress.best_step is not None else None
    if best is not None and progress.best_step != progress.global_step:
        info = (
            next((i for i in run.store.list_complete() if i.name == best), None) if dist.rank() == 0 else None
        )
        info = dist.broadcast_object(info)
        if info is None:
            raise RuntimeError(f"the best checkpoint {best} is missing from {run.uri}; cannot score with it")
        repartition = needs_repartition(info, s.engine, dist.world())  # saved by a group of another size
        folder = run.fetch(info, into="best", everything=repartition)
        load_engine_state(s.engine, folder, run.workdir / "universal" / info.name, repartition, run.group)
        run.drop_fetched("best")
        log.info(
            "loaded the best checkpoint %s (validation F1 %.4f) for testing and export",
            best,
            progress.best_f1,
        )
    return best


def score(s: Session) -> tuple[dict[str, Any], dict[str, EvalResult]]:
    """Every evaluation set and test scored with the loaded weights (every rank): metrics and predictions."""
    results: dict[str, Any] = {}
    preds: dict[str, EvalResult] = {}
    for name in [*s.data.eval_names, *(["test"] if "test" in s.data.splits else [])]:
        preds[name] = evaluate(s, name)
        results[name] = preds[name].metrics
    return results, preds


def training_speed(s: Session, progress: TrainingProgress) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's training speed: as the model card says it, and as results.json records it."""
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
    figures = {
        "train_runtime_seconds": round(train_seconds, 3),
        "train_tokens_per_second": tokens_per_second,
        "train_flops": progress.train_flops,  # model FLOPs (trainer/flops.py), all workers
        "train_mfu": rounded(utilisation),
        "peak_flops_per_device": s.peak.flops,
        "peak_flops_source": s.peak.source,
    }
    return speed, figures


def export(
    s: Session,
    sd: dict[str, Any],
    progress: TrainingProgress,
    results: dict[str, Any],
    preds: dict[str, EvalResult],
    train: dict[str, Any],
    speed: dict[str, Any],
    model_from: str,
) -> None:
    """model/: the weights in Hugging Face format, the plots and the model card; published to the run's storage."""
    cfg, run, data = s.cfg, s.run, s.data
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
        _card(
            cfg,
            s.spec,
            s.plan["batch_tokens"],
            data.labels,
            data.splits,
            progress,
            results,
            train,
            speed,
            pngs,
        ),
        files=pngs,
    )
    run.publish("model")


def provenance(cfg: Config, data: Data) -> dict[str, Any]:
    """results.json's provenance: versions, git commit, every data file (path, sha256) and the config."""
    return {
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
        "config": public_dict(cfg),  # URL passwords masked
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
        **(
            {"time_budget": f"{tc.time_budget} ({progress.time_budget.get('planned_steps')} steps planned)"}
            if tc.time_budget is not None
            else {}
        ),
        "batch_tokens (per worker)": batch_tokens if tc.batch_tokens != "auto" else f"{batch_tokens} (auto)",
        "gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "workers": cfg.scaling.workers,
        "optimizer": f"AdamW (betas {tc.adam_beta1}, {tc.adam_beta2}, "
        f"eps {tc.adam_epsilon}, weight decay {tc.weight_decay})",
        "lr_scheduler": "linear with warm-up",
        "warmup_ratio": tc.warmup_ratio,
        "classifier head's learning rate": f"{tc.head_lr_scale:g} x learning_rate",
        "layer-wise learning-rate decay": tc.layer_lr_decay,
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
