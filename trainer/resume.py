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


def resume(
    cfg: Config, run: Any, engine: Any, data: Data, group: Any, first: Any = None
) -> tuple[TrainingProgress, Any]:
    """The progress to train on from, and the checkpoint it came from (a CheckpointInfo; None: a
    fresh start). `first`: the resume point the loop planned with (run.resume_point()).

    Rank 0 checks that this run may continue the checkpoint; every rank then fetches its own part
    of it (every part, when the group's size differs from the checkpoint's under ZeRO-1/2/3: the
    optimizer's partitions are re-cut, see `_load`). A checkpoint whose files fail their check on
    any rank (a sha256 that does not match its manifest) is skipped with a warning, and the
    previous complete one is tried. Rank 0 copies the run's metrics up to that checkpoint into the
    working folder.
    """
    rc = cfg.run
    if not rc.resume or rc.new_run:
        return TrainingProgress(), None
    skipped: list[str] = []
    info = first
    while info is not None:
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
        repartition = needs_repartition(info, engine, group.world)
        try:
            folder, failed = run.fetch(info, everything=repartition), None
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
            info = run.resume_point(skipped)
            continue
        return _load(run, engine, info, folder, group, repartition), info
    if skipped:
        log.warning("no complete checkpoint of run %r passed its check: starting from scratch", rc.name)
    return TrainingProgress(), None


def _load(run: Any, engine: Any, info: Any, folder: Path, group: Any, repartition: bool) -> TrainingProgress:
    """Every rank: load its part of the fetched checkpoint in `folder` into `engine`; its progress.

    ZeRO-0 state does not depend on the group's size (the model states file holds the whole
    optimizer). Under ZeRO-1/2/3 a checkpoint of another size is first converted to DeepSpeed's
    universal checkpoint (per parameter, no partitions; `repartition`) and loaded from there."""
    load_engine_state(engine, folder, run.workdir / "universal" / info.name, repartition, group)
    progress = TrainingProgress.load(folder / "progress.json")
    rng_file = folder / f"rng-rank{group.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    log.info(
        "resumed from checkpoint %s (step %d, epoch %d, %d worker(s); now %d) in %s",
        info.name,
        progress.global_step,
        progress.epoch,
        int(info.meta.get("world") or group.world),
        group.world,
        run.uri,
    )
    if group.rank == 0:  # the run's metrics up to this checkpoint travel inside it
        if (folder / "metrics.jsonl").is_file():
            shutil.copyfile(folder / "metrics.jsonl", run.workdir / "metrics.jsonl")
        else:  # a checkpoint from before raytag kept them there
            run.get_file("metrics.jsonl")
    return progress


def needs_repartition(info: Any, engine: Any, world: int) -> bool:
    """Whether checkpoint `info` was saved by a group of another size under ZeRO-1/2/3 (whose
    optimizer state is partitioned per rank): then every rank needs every part, re-cut on load."""
    return int(info.meta.get("world") or world) != world and engine.zero_optimization_stage() > 0


def load_engine_state(engine: Any, folder: Path, universal: Path, repartition: bool, group: Any) -> None:
    """Every rank: the DeepSpeed state of the checkpoint fetched into `folder` loaded into `engine`
    (re-partitioned through `universal` when `repartition`)."""
    if repartition:
        load_repartitioned(engine, folder, universal, group)
    else:
        engine.load_checkpoint(str(folder), tag="ds", load_module_strict=True)


def load_repartitioned(engine: Any, folder: Path, universal: Path, group: Any) -> None:
    """Load a ZeRO-1/2/3 checkpoint written by a group of another size: each node's first rank
    converts it (`deepspeed.checkpoint.ds_to_universal`) into `universal`, then every rank loads
    its own partition of it. The conversion is removed once every rank has loaded it."""
    import time

    error: BaseException | None = None
    if group.local_rank == 0:
        try:
            t0 = time.monotonic()
            to_universal(folder / "ds", universal / "ds")
            log.info(
                "checkpoint %s converted for a group of %d in %.1f s",
                folder.name,
                group.world,
                time.monotonic() - t0,
            )
        except BaseException as exc:
            error = exc
    group.agree(error)
    inner = getattr(engine.optimizer, "optimizer", None)  # the torch optimizer under ZeRO's wrapper
    decays = [g["weight_decay"] for g in inner.param_groups] if inner is not None else []
    config = engine._config  # read by load_checkpoint at call time: this one load is universal
    config.load_universal_checkpoint = True
    try:
        engine.load_checkpoint(str(universal), tag="ds", load_module_strict=True)
    finally:
        config.load_universal_checkpoint = False
    if engine.zero_optimization_stage() == 3 and inner is not None:
        _mend_stage3_universal_load(engine, inner, decays)
    group.barrier()
    if group.local_rank == 0:
        shutil.rmtree(universal, ignore_errors=True)


def to_universal(tag_folder: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint of the ZeRO checkpoint in `tag_folder`, written to `out`
    (whose name is the tag to load). In this process, one worker: no process group needed."""
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    if out.parent.exists():
        shutil.rmtree(out.parent)  # a conversion a dead attempt left half-written
    out.parent.mkdir(parents=True)
    ds_to_universal(
        SimpleNamespace(
            input_folder=str(tag_folder),
            output_folder=str(out),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # a plain Hugging Face model carries no universal-checkpoint info
        )
    )


def _mend_stage3_universal_load(engine: Any, inner: Any, decays: list[float]) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group one shared `step` tensor
    (fused AdamW then counts each step once per group) and group 0's hyperparameters (the no-decay
    group gets weight decay). Measured on a tiny model: the next losses drift by 1e-4 without this,
    and equal a native load's with it. `decays`: each group's weight decay before the load."""
    for group, decay in zip(inner.param_groups, decays, strict=True):
        group["weight_decay"] = decay
    for p in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []):
        state = inner.state.get(p)
        if state is not None and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


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
    """Whether this config trains longer than the finished run's (train.epochs or train.max_steps
    changed). A budgeted run's length is its budget's plan: only another train.time_budget counts
    (which `check_resume` then refuses: the plan is the budget's)."""
    old = ((results.get("provenance") or {}).get("config") or {}).get("train") or {}
    if cfg.train.time_budget is not None or old.get("time_budget") is not None:
        return old.get("time_budget") != cfg.train.time_budget
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
    """Refuse (ConfigError) to resume checkpoint `info` of a run whose labels, tokenizer or training
    config differ from this one's. `read(info, name)` gives a file of the checkpoint.

    The worker count may differ: the checkpoint carries the run's data plan (its global batch in
    micro-batches, fixed at the start), which a group of any size follows, and ZeRO state is
    re-partitioned on load. A checkpoint without a plan (an older raytag's) must resume at its
    own count.
    """
    import yaml

    name = cfg.run.name
    stored_world = info.meta.get("world")
    if stored_world is not None and int(stored_world) != world and "plan" not in info.meta:
        raise ConfigError(
            f"cannot resume run {name!r}: it was trained with {stored_world} worker(s) and this run has {world} "
            f"(scaling.num_workers), and its checkpoint is from a raytag whose data plan depended on the "
            f"count: set scaling.num_workers={stored_world}, or run.new_run=true to start over"
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
