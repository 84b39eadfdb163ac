"""A config becomes a Ray Train run: TorchTrainer over raytag's training loop, one worker per GPU (or CPU slot).

Who owns what: Ray owns the workers, their process group and restarts after a lost worker or
node (`FailureConfig`); raytag's storage layer owns checkpoints (upload, manifest, retention,
choice of resume point), exactly as in local mode. Workers report metrics to Ray (so its
dashboard shows progress) with the checkpoint's location as a metric, never a Ray
`Checkpoint`: one checkpoint mechanism, not two. A restarted worker group simply runs the loop
again, which resumes from raytag's newest complete checkpoint.

Training data is prepared once, in the driver's pre-flight (trainer/shards.py: large inputs as
Ray tasks spread over the cluster), into Parquet shards in storage. Sharding is planned inside
the loop, not with Ray Data: every rank derives the same plan from (seed, epoch) and the shard
index, reads only its own shards, runs the same number of steps, and normalises its loss by the
global labelled-token count without an extra collective.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from raytag.trainer.config import Config, ConfigError, to_dict
from raytag.trainer.shards import Executor

log = logging.getLogger("raytag")


class LaunchError(RuntimeError):
    """The Ray run could not start or failed; the message is one sentence."""


def absolutize(cfg: Config) -> Config:
    """Local paths made absolute: Ray workers run in another working directory."""

    def fix(p: str | None) -> str | None:
        if p is None or p.startswith(("builtin:", "s3://", "hf:")):
            return p
        return str(Path(p).expanduser().resolve())

    train: Any = cfg.data.train
    if isinstance(train, str):
        train = fix(train)
    elif isinstance(train, list):
        train = [fix(p) or p for p in train]
    elif isinstance(train, dict):
        train = {
            k: dataclasses.replace(
                c, path=fix(c.path) if isinstance(c.path, str) else [fix(p) or p for p in (c.path or [])]
            )
            for k, c in train.items()
        }
    data = dataclasses.replace(
        cfg.data,
        train=train,
        prepared=fix(cfg.data.prepared),
        validation=fix(cfg.data.validation),
        test=fix(cfg.data.test),
        eval_sets={k: fix(v) or v for k, v in cfg.data.eval_sets.items()},
    )
    model = cfg.model
    if Path(model.name_or_path).expanduser().exists():
        model = dataclasses.replace(model, name_or_path=str(Path(model.name_or_path).expanduser().resolve()))
    run = cfg.run
    if not run.storage.startswith("s3://"):
        run = dataclasses.replace(run, storage=str(Path(run.storage).expanduser().resolve()))
    return dataclasses.replace(cfg, data=data, model=model, run=run)


def connect() -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS, or start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(log_to_driver=True)  # inside `ray job submit`: no num_cpus, the cluster decides
    else:
        ray.init()  # with the dashboard (ray[default]): progress and the state API the Train controller polls


def _ray_map(fn: Any, calls: Any) -> list[Any]:
    """fn(*call) for every call as Ray tasks (one CPU each, retried twice), results in order."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    refs = [remote.remote(*c) for c in calls]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:  # the task's own error (e.g. a ConllError), one line
        cause = getattr(e, "cause", None)
        raise (cause if isinstance(cause, BaseException) else e) from None


RAY_TASKS = Executor("ray", _ray_map)  # data preparation's per-file tasks spread over the cluster


def _check_storage_fits_cluster(cfg: Config) -> None:
    """An early answer for a cluster that already has several nodes; the workers check again once
    placed (raytag.cluster.run), which also covers nodes that join after the job started."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not cfg.run.storage.startswith("s3://"):
        raise ConfigError(
            f"run.storage: the local folder {cfg.run.storage!r} cannot hold a run on a cluster of "
            f"{len(nodes)} nodes (each node would see its own folder); use s3://bucket/prefix"
        )


def _preflight(cfg: Config) -> Config:
    """Fail in the driver, in seconds and once, on what would otherwise fail on every worker, and
    be retried by Ray: storage, the run lease, data files and labels, and a resume that the stored
    run refuses (config, labels, tokenizer or worker count differ).

    Also carries out `run.new_run` here, once: workers get `new_run: false`, so a worker group
    that Ray restarts resumes the fresh run instead of wiping it again.
    """
    from raytag.cluster.checkpoints import CheckpointStore
    from raytag.cluster.keys import join_key
    from raytag.cluster.run import wipe_run
    from raytag.cluster.runlock import RunLock
    from raytag.cluster.storage import open_storage
    from raytag.trainer.model import load_tokenizer
    from raytag.trainer.resume import check_resume
    from raytag.trainer.run_data import read_splits, tokenizer_fingerprint, train_spec
    from raytag.trainer.shards import prepare

    storage = open_storage(cfg.run.storage, endpoint_url=cfg.run.s3_endpoint_url, region=cfg.run.s3_region)
    storage.preflight(create_bucket=cfg.run.create_bucket)
    if not cfg.data.train and not cfg.data.hf_dataset:
        raise ConfigError("data.train: no training file given")
    read_splits(cfg)  # bad evaluation files surface here, not as N worker crashes
    # Prepare the training shards once, here: the files spread over the cluster as Ray tasks (large
    # inputs), bad lines and tags surface as one error; the workers then find the shards.
    tokenizer_sha = tokenizer_fingerprint(load_tokenizer(cfg.model.name_or_path))
    connect()
    prepared = prepare(train_spec(cfg), tokenizer_sha, parallel=RAY_TASKS)
    labels = prepared.labels
    if not cfg.run.new_run and cfg.run.resume:  # a finished run too: it may be asked to train longer
        info = CheckpointStore(storage, cfg.run.name, log=log.info).latest()
        if info is not None:

            def read(i, rel: str) -> bytes | None:
                return storage.get_bytes(join_key(cfg.run.name, "checkpoints", i.name, rel))

            check_resume(
                cfg, info, read, labels, tokenizer_sha, cfg.scaling.max_workers, prepared.fingerprint
            )
    lock = RunLock(storage, cfg.run.name, cfg.run.owner or "", log=log.info, gone=_ray_job_gone)
    if not cfg.run.new_run:
        lock.check()
        return cfg
    # Take the lease (with the run's owner id, which rank 0 then holds as its own) before deleting:
    # two jobs starting over the same run together cannot both wipe it.
    lock.acquire()
    lock.stop_heartbeat()
    log.info("run.new_run: removing %s", storage.display(f"{cfg.run.name}/"))
    wipe_run(storage, cfg.run.name)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, new_run=False))


def _ray_storage(cfg: Config) -> tuple[str, Any]:
    """Where Ray keeps its own run state: beside raytag's outputs, under <run>/ray/."""
    rc = cfg.run
    if not rc.storage.startswith("s3://"):
        return str(Path(rc.storage) / rc.name), None
    import pyarrow.fs

    from raytag.cluster.keys import split_s3_uri

    bucket, prefix = split_s3_uri(rc.storage)
    endpoint = (
        rc.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    kwargs: dict[str, Any] = {}
    if rc.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        kwargs["region"] = (
            rc.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        )
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme, force_virtual_addressing=False)
    # Credentials: pyarrow reads the same standard places as boto3 (env, profile, instance role).
    fs = pyarrow.fs.S3FileSystem(**kwargs)
    path = "/".join(p for p in (bucket, prefix, rc.name) if p)
    return path, fs


# raytag's own switches travel from the driver to the workers (Ray starts them with the
# environment its processes had when the cluster started, not the driver's).
WORKER_ENV = ("RAYTAG_FAULT_INJECT", "RAYTAG_DS_SHM_COMM")


class StopFlag:
    """The driver's stop request, read by the workers (a Ray actor with no CPU of its own)."""

    def __init__(self) -> None:
        self.request: tuple[str, float] | None = None

    def set(self, reason: str, deadline: float) -> None:
        if self.request is None:
            self.request = (reason, deadline)

    def get(self) -> tuple[str, float] | None:
        return self.request


class _DriverStop:
    """The driver's SIGTERM (`ray job stop`, a Kubernetes pod stop): tell the workers to stop at their
    next step boundary with a checkpoint. The signal handler only hands the request to a thread."""

    def __init__(self, flag: Any, grace_s: float) -> None:
        import threading

        self.flag, self.grace_s = flag, grace_s
        self.request: tuple[str, float] | None = None  # the first SIGTERM's (reason, deadline)
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._forward, name="raytag-stop", daemon=True)
        self._thread.start()

    def __call__(self, reason: str, deadline: float) -> None:  # in the signal handler
        if self.request is None:
            self.request = (f"{reason} by the driver", deadline)
            self._wake.set()

    def close(self) -> None:
        """The run is over (the SIGTERM handler restored): end the thread if no stop came."""
        self._wake.set()
        self._thread.join(timeout=30)  # a stop that came: its request is with the flag actor

    def _forward(self) -> None:
        import ray

        self._wake.wait()
        if self.request is None:
            return  # closed: the run ended without a stop request
        reason, deadline = self.request
        wait_s = int(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "3"))  # what `ray job stop` allows
        log.warning(
            "%s: asking the workers to stop at their next step boundary with a checkpoint (%.0f s)",
            reason,
            self.grace_s,
        )
        if os.environ.get("RAY_JOB_ID") and wait_s < self.grace_s:
            log.warning(
                "`ray job stop` kills this driver %d s after its SIGTERM (RAY_JOB_STOP_WAIT_TIME_S); submit "
                'with --runtime-env-json \'{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "%d"}}\' to give the '
                "checkpoint its %.0f s",
                wait_s,
                int(self.grace_s) + 10,
                self.grace_s,
            )
        ray.get(self.flag.set.remote(reason, deadline))


def _notices(flag: Any) -> Any:
    """The loop's outside notices on a Ray worker, asked on every rank together every few seconds:
    the driver's stop request (-> stop with a checkpoint), and Ray Train's preemption notice for a
    node drain (-> a checkpoint now, training goes on, as Ray recommends; when the node goes, Ray
    restarts the group and the loop resumes from that checkpoint)."""
    import ray
    import ray.train

    from raytag.trainer.stopping import STOP

    seen: list[Any] = []

    def notices() -> str | None:
        request = ray.get(flag.get.remote(), timeout=30)
        if request is not None:
            STOP.request(*request)
        info = ray.train.get_preemption_info()  # a barrier of Ray's: every rank calls it together
        if info is None or info in seen:
            return None
        seen.append(info)
        left = f", {info.deadline_ms / 1000 - time.time():.0f} s left" if info.deadline_ms else ""
        return f"Ray reports node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} preempted (ranks {info.preempted_ranks}{left})"

    return notices


def _lease_info() -> dict[str, Any]:
    """What a Ray job writes into the run lease: its job id and cluster, so that a job resubmitted
    after a lost driver can see the old job is gone (`_ray_job_gone`)."""
    import ray

    return {"ray_job": ray.get_runtime_context().get_job_id(), "ray_cluster": _cluster_id()}


def _cluster_id() -> str | None:
    import ray

    try:
        return ray._private.worker.global_worker.current_cluster_and_job[0].hex()
    except Exception:  # private API: without it, a lease is judged by its heartbeat and pid only
        return None


def _ray_job_gone(lease: dict[str, Any]) -> str | None:
    """Why the lease's Ray job is provably gone (this cluster lists it as ended), else None."""
    job = lease.get("ray_job")
    if not job or not lease.get("ray_cluster"):
        return None
    connect()
    if _cluster_id() != lease["ray_cluster"]:
        return None  # another cluster's job: only its heartbeat can tell
    import ray

    try:
        jobs = {j["JobID"]: j for j in ray._private.state.jobs()}
    except Exception:
        return None
    entry = jobs.get(job)
    if entry is not None and entry.get("IsDead"):
        return f"its Ray job {job} on this cluster has ended (its driver is gone)"
    return None


def _train_worker(job: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.update(job["env"])
    config = job["config"]
    import ray
    import ray.train

    from raytag.trainer.loop import train_loop

    from .logs import setup_logging

    setup_logging()

    def report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        # Every rank calls this equally often (it is a barrier); rank 0's metrics are Ray's.
        ray.train.report({**metrics, "checkpoint": checkpoint})

    device = None
    if config.get("scaling", {}).get("use_gpu"):
        from ray.train.torch import get_device

        device = get_device()  # the GPU Ray gave this worker (not necessarily cuda:LOCAL_RANK)
    train_loop(
        config,
        report=report,
        node=ray.get_runtime_context().get_node_id(),
        device=device,
        notices=_notices(job["stop"]),
        lease_info=_lease_info(),
    )


def _user_error_types() -> tuple[type[BaseException], ...]:
    from raytag.cluster.runlock import RunLockedError
    from raytag.cluster.storage import StorageError
    from raytag.trainer.conll import ConllError
    from raytag.trainer.stopping import Preempted

    return (ConfigError, ConllError, RunLockedError, StorageError, Preempted)


def _failure_policy(inner: Any) -> Any:
    """Ray's failure policy, except that a user error (bad config or data, a refused resume, a
    local folder on several nodes) ends the run at once: a restart would fail the same way. So does
    a stop on request (`Preempted`): the workers saved a checkpoint and stopped as asked."""
    from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy
    from ray.train.v2.api.exceptions import WorkerGroupError

    class UserErrorsAreFinal(FailurePolicy):
        def __init__(self, inner: Any) -> None:
            super().__init__(inner.failure_config)
            self.inner = inner

        def make_decision(self, training_failed_error: Any) -> Any:
            if isinstance(training_failed_error, WorkerGroupError) and any(
                isinstance(e, _user_error_types()) for e in training_failed_error.worker_failures.values()
            ):
                return FailureDecision.RAISE
            return self.inner.make_decision(training_failed_error)

    return UserErrorsAreFinal(inner)


def _trainer_class() -> type:
    from ray.train.torch import TorchTrainer

    class RaytagTrainer(TorchTrainer):
        """TorchTrainer whose failure policy never retries a user error."""

        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            if "failure_policy" in kwargs:
                kwargs["failure_policy"] = _failure_policy(kwargs["failure_policy"])
            return super()._initialize_and_run_controller(**kwargs)  # type: ignore[misc]

    return RaytagTrainer


def _collateral(error: BaseException) -> bool:
    """An error a rank gets because another rank failed (a broken collective), not a cause."""
    from raytag.trainer.dist import PeerError

    text = str(error).lower()
    return isinstance(error, PeerError) or any(
        s in text for s in ("connection closed by peer", "connection reset", "broken pipe", "nccl", "gloo")
    )


def launch(cfg: Config) -> dict[str, Any] | None:
    """Run `cfg` on Ray Train and return results.json (None if the run produced none).

    Raises ConfigError / StorageError / ConllError before any worker starts when the config,
    storage or data is wrong; LaunchError when the Ray run fails.
    """
    import ray.train

    from raytag.cluster.runlock import new_owner
    from raytag.cluster.storage import open_storage

    cfg = absolutize(cfg)
    # One owner id for the whole Ray run: a worker group that Ray restarts keeps the run's lease.
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, owner=cfg.run.owner or new_owner()))
    sc = cfg.scaling
    cfg = _preflight(cfg)
    _check_storage_fits_cluster(cfg)
    resources: dict[str, float] = {"CPU": sc.cpus_per_worker if sc.cpus_per_worker is not None else 1}
    if sc.use_gpu:
        resources["GPU"] = 1  # one GPU per data-parallel worker (config validation refuses others)
    resources.update(sc.worker_resources)
    # An elastic range: Ray Train v2 starts once MIN workers fit, and on a lost worker or node, or
    # when the resize check (every elastic_resize_interval_s) finds room for more, restarts the
    # group at the size that fits; each restart resumes from the latest checkpoint at that size.
    scaling = ray.train.ScalingConfig(
        num_workers=(sc.min_workers, sc.max_workers) if sc.elastic else sc.num_workers,  # type: ignore[arg-type]  # Train v2 takes (min, max)
        use_gpu=sc.use_gpu,
        resources_per_worker=resources,
        placement_strategy=sc.placement_strategy,
        **({"elastic_resize_monitor_interval_s": sc.elastic_resize_interval_s} if sc.elastic else {}),
    )
    storage_path, fs = _ray_storage(cfg)
    run_config = ray.train.RunConfig(
        name="ray",
        storage_path=storage_path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
    )
    log.info(
        "Ray Train: %s worker(s), %s per worker, run %r, Ray state in %s/ray",
        sc.workers,
        resources,
        cfg.run.name,
        storage_path,
    )
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raytag.trainer.stopping import on_sigterm

    # On the driver's node: a flag on a worker node dies with that node (a spot node lost), and
    # every rank's next notice poll with it, where the run should just go on without the node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    flag = ray.remote(num_cpus=0)(StopFlag).options(scheduling_strategy=here).remote()
    trainer = _trainer_class()(
        _train_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "env": {k: os.environ[k] for k in WORKER_ENV if k in os.environ},
            "stop": flag,
        },
        scaling_config=scaling,
        run_config=run_config,
    )
    forward = _DriverStop(flag, cfg.run.stop_grace_seconds)
    restore = on_sigterm(cfg.run.stop_grace_seconds, forward=forward)
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors; keep the root cause's message, one line
        cause: BaseException = e
        failures = getattr(e, "worker_failures", None) or {}
        users = [f for f in failures.values() if isinstance(f, _user_error_types())]
        if users:
            raise users[0] from None  # a user error: the same one line as in local mode
        if failures:  # the rank that failed first, not a peer that lost its connection to it
            cause = min(failures.items(), key=lambda kv: (_collateral(kv[1]), kv[0]))[1]
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = str(cause).strip().splitlines()
        last = next((ln for ln in reversed(text) if ln.strip()), type(cause).__name__)
        raise LaunchError(f"the Ray Train run {cfg.run.name!r} failed: {last.strip()}") from None
    finally:
        restore()
        forward.close()
    storage = open_storage(cfg.run.storage, endpoint_url=cfg.run.s3_endpoint_url, region=cfg.run.s3_region)
    raw = storage.get_bytes(f"{cfg.run.name}/results.json")
    return json.loads(raw) if raw else None
