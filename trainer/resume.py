"""Resuming a run: what may change on resume, the checks that refuse the rest, and the resume
itself (rank 0 picks and checks the checkpoint, every rank loads its own part of it).

A finished run is resumed too when its config trains longer (train.epochs or train.max_steps
raised), as the Hugging Face Trainer resumes. `check_resume` and `trains_longer` also run
outside the loop: in the Ray launcher's driver, before any worker starts, and in sweeps.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raytag.cluster.checkpoints import CheckpointVerifyError

from .config import Config, ConfigError, to_dict
from .progress import TrainingProgress, set_rng_state
from .run_data import Data

log = logging.getLogger("raytag")


def resume(cfg: Config, run: Any, engine: Any, data: Data, group: Any) -> tuple[TrainingProgress, str | None]:
    """The progress to train on from, and the name of the checkpoint it came from (None: a fresh start).

    Rank 0 picks the newest complete checkpoint and checks that this run may continue it; every
    rank then fetches its own part of it. A checkpoint whose files fail their check on any rank
    (a sha256 that does not match its manifest) is skipped with a warning, and the previous
    complete one is tried. Rank 0 copies the run's metrics up to that checkpoint into the
    working folder.
    """
    rc = cfg.run
    if not rc.resume or rc.new_run:
        return TrainingProgress(), None
    skipped: list[str] = []
    while (info := run.resume_point(skipped)) is not None:
        error: BaseException | None = None
        if group.rank == 0:
            try:
                check_resume(
                    cfg,
                    info,
                    run.stored_file,
                    data.labels,
                    data.tokenizer_sha,
                    group.world,
                    data.train.fingerprint,
                )
            except BaseException as exc:
                error = exc
        group.agree(error)
        try:
            folder, failed = run.fetch(info), None
        except CheckpointVerifyError as exc:
            folder, failed = None, f"rank {group.rank}: {exc}"
        failures = [f for f in group.gather(failed) if f]  # every rank learns whether any rank failed
        if folder is None or failures:
            if group.rank == 0:
                log.warning(
                    "checkpoint %s failed its check on fetch (%s); resuming from the previous complete "
                    "checkpoint instead",
                    info.name,
                    "; ".join(failures),
                )
            skipped.append(info.name)
            continue
        return _load(run, engine, info, folder, group), info.name
    if skipped:
        log.warning("no complete checkpoint of run %r passed its check: starting from scratch", rc.name)
    return TrainingProgress(), None


def _load(run: Any, engine: Any, info: Any, folder: Path, group: Any) -> TrainingProgress:
    """Every rank: load its part of the fetched checkpoint in `folder` into `engine`; its progress."""
    engine.load_checkpoint(str(folder), tag="ds", load_module_strict=True)
    progress = TrainingProgress.load(folder / "progress.json")
    rng_file = folder / f"rng-rank{group.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
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
    return progress


def finished_stands(cfg: Config, finished: dict[str, Any], where: str) -> bool:
    """Whether a finished run's results (`finished`) stand: this config trains no longer (logged)."""
    if trains_longer(cfg, finished):
        return False
    log.info(
        "run %r in %s already finished: results.json exists (set run.new_run=true to train again, "
        "or raise train.epochs / train.max_steps to train on)",
        cfg.run.name,
        where,
    )
    return True


def nothing_to_add(cfg: Config, finished: dict[str, Any], total_steps: int) -> bool:
    """A finished run asked to train longer (as the HF Trainer resumes): whether its new plan of
    `total_steps` ends where the run already ended (logged either way)."""
    done = int(finished.get("global_steps") or 0)
    if total_steps <= done:
        log.info(
            "run %r already finished at step %d; the new train.epochs / train.max_steps plan %d steps: "
            "nothing to add",
            cfg.run.name,
            done,
            total_steps,
        )
        return True
    log.info(
        "run %r finished at step %d; training on to step %d from its last checkpoint, the learning-rate "
        "schedule re-planned to end there",
        cfg.run.name,
        done,
        total_steps,
    )
    return False


def trains_longer(cfg: Config, results: dict[str, Any]) -> bool:
    """Whether this config trains longer than the finished run's (train.epochs or train.max_steps changed)."""
    old = ((results.get("provenance") or {}).get("config") or {}).get("train") or {}
    return old.get("epochs") != cfg.train.epochs or old.get("max_steps") != cfg.train.max_steps


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
