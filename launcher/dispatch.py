"""Where a run goes: in this process (one worker, no cluster) or on Ray Train (more workers, or
inside `ray job submit`); and `prepare`, the training data's preparation alone."""

from __future__ import annotations

import os

from raytag.trainer.config import Config, to_dict


def run(cfg: Config) -> dict | None:
    """Local single-node mode in-process, or a Ray Train run when more workers or a cluster are asked for."""
    from raytag.trainer.stopping import on_sigterm
    from raytag.trainer.tracking import resolve

    cfg = resolve(cfg)  # MLFLOW_TRACKING_URI into the config: Ray's workers do not see this environment

    if cfg.scaling.num_workers == 1 and not _ray_cluster_reachable():  # a range always runs on Ray Train
        from raytag.trainer.loop import train_loop

        restore = on_sigterm(cfg.run.stop_grace_seconds)  # SIGTERM: checkpoint at the next step, exit 75
        try:
            return train_loop(to_dict(cfg))
        finally:
            restore()
    from .ray_launcher import launch

    return launch(cfg)  # the driver forwards SIGTERM (`ray job stop`) to its workers


def prepare_only(cfg: Config, rebuild: bool = False, executor: str = "auto") -> str:
    """`prepare`: make (or find) the training shards of `cfg` and return where they are. Under
    `ray job submit` (or RAY_ADDRESS) large inputs are spread over the cluster as Ray tasks;
    `executor` forces one way (inline, processes, ray)."""
    from raytag.trainer.model import load_tokenizer
    from raytag.trainer.run_data import tokenizer_fingerprint, train_spec
    from raytag.trainer.shards import INLINE, PROCESSES, prepare

    parallel = PROCESSES
    if _ray_cluster_reachable() or executor == "ray":
        from .ray_launcher import RAY_TASKS, connect

        connect()
        parallel = RAY_TASKS
    forced = {"auto": None, "inline": INLINE, "processes": PROCESSES, "ray": parallel}[executor]
    sha = tokenizer_fingerprint(load_tokenizer(cfg.model.name_or_path))
    found = prepare(train_spec(cfg), sha, executor=forced, parallel=parallel, rebuild=rebuild)
    return found.uri


def _ray_cluster_reachable() -> bool:
    """Inside `ray job submit` (or with RAY_ADDRESS set) the run goes through Ray Train."""
    return bool(os.environ.get("RAY_ADDRESS")) or bool(os.environ.get("RAY_JOB_ID"))
