"""Failures on Ray Train with 2 CPU workers on S3 storage (an in-process Ray instance, the real S3 server).

- A worker killed right as its checkpoint upload begins: the restarted group completes that
  checkpoint from the node's disk and resumes from it (not from step 0).
- An error on one rank only ends the run within 30 s with that error in one line; a resume with a
  changed config or worker count is refused in the driver, once, before any worker starts.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from raytag.trainer.config import load_config
from tests.helpers import RAY_SMALL, ROOT, assert_matches_one_worker

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.integration]

# The shared small run, with this module's own steps and checkpoints.
COMMON = [c for c in RAY_SMALL if not c.startswith(("train.max_steps", "train.save_every"))]


@pytest.fixture(scope="module")
def local_ray(s3_server):
    """One in-process Ray instance for the launcher tests of this module (ray.init costs seconds).

    Ray's processes take the environment of the moment it starts: the S3 server's variables
    (what `aws_env` sets for each test) are set first, so Ray's own storage client sees them too.
    """
    import ray

    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **s3_server.aws_env()}
    cleared = [
        *DIST_VARS,
        "RAY_ADDRESS",
        "RAY_JOB_ID",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_SESSION_TOKEN",
    ]
    saved = {k: os.environ.get(k) for k in [*env, *cleared]}
    os.environ.update(env)
    for name in cleared:
        os.environ.pop(name, None)
    ray.init(num_cpus=2, include_dashboard=False)  # workers inherit the AWS_* variables of the test
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _s3_config(bucket: str, name: str, *overrides: str):
    return load_config(
        ROOT / "configs" / "demo.yaml",
        [f"run.storage=s3://{bucket}/runs", f"run.name={name}", "scaling.num_workers=2", *COMMON, *overrides],
    )


def test_worker_killed_as_its_checkpoint_upload_begins_resumes_from_that_checkpoint(
    aws_env, local_ray, tmp_path, monkeypatch
):
    """2 workers on S3 storage; rank 1 is killed (os._exit, as SIGKILL) right after writing step 4's
    checkpoint, as its upload begins. Ray restarts the group; the restarted ranks upload the parts
    left on the node's disk, rank 0 writes the manifest, and training resumes from step 4."""
    from raytag.launcher.ray_launcher import launch

    bucket = aws_env.make_bucket()
    marker = tmp_path / "killed"
    monkeypatch.setenv("RAYTAG_FAULT_INJECT", f"1:4:{marker}:save")  # inherited by the workers Ray starts
    cfg = _s3_config(bucket, "lost", "scaling.max_failures=1", "train.max_steps=8", "train.save_every=4")
    results = launch(cfg)
    assert "raytag-stop" not in {t.name for t in threading.enumerate()}  # the driver's forwarder ended
    assert marker.exists(), "the fault was never injected"
    assert results is not None and results["global_steps"] == 8
    assert results["resumed_from"] == "step-00000004"
    client = aws_env.client()
    body = client.get_object(Bucket=bucket, Key="runs/lost/metrics.jsonl")["Body"].read().decode()
    steps = [json.loads(x)["step"] for x in body.splitlines() if json.loads(x)["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # each step once across both attempts
    # ... and the result is the uninterrupted run's (one worker, the same global batches)
    assert_matches_one_worker(
        body.splitlines(), results, [*COMMON, "train.max_steps=8", "train.save_every=4"], tmp_path
    )
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key="runs/lost/checkpoints/step-00000008/MANIFEST.json")[
            "Body"
        ].read()
    )
    names = {f["path"] for f in manifest["files"]}
    assert {"rng-rank0.pt", "rng-rank1.pt", "progress.json"} <= names
    assert any("zero_pp_rank_1_" in n for n in names) and any("zero_pp_rank_0_" in n for n in names)
    assert manifest["meta"]["world"] == 2
    listed = {
        o["Key"][len("runs/lost/checkpoints/step-00000008/") :]
        for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/lost/checkpoints/step-00000008/")[
            "Contents"
        ]
    }
    assert names <= listed


def test_sigterm_to_the_driver_stops_every_worker_with_a_checkpoint_and_the_rerun_continues(
    aws_env, local_ray, tmp_path
):
    """`ray job stop` and a Kubernetes pod stop send the driver SIGTERM: it asks the workers to stop
    at their next step boundary; they save, upload, and the driver raises Preempted (exit 75).
    The same launch then continues from that checkpoint to the end."""
    import signal

    from raytag.launcher.ray_launcher import launch
    from raytag.trainer.stopping import Preempted

    bucket = aws_env.make_bucket()
    client = aws_env.client()
    cfg = _s3_config(bucket, "term", "train.max_steps=40", "train.eval_every=1000")

    def trained() -> int:
        try:
            body = client.get_object(Bucket=bucket, Key="runs/term/metrics.jsonl")["Body"].read().decode()
        except Exception:
            return 0
        return max((json.loads(x)["step"] for x in body.splitlines() if '"train"' in x), default=0)

    sent: dict[str, float] = {}

    def terminate_at_step_2() -> None:
        deadline = time.time() + 300
        while trained() < 2 and time.time() < deadline:
            time.sleep(0.1)
        sent["at"], sent["step"] = time.monotonic(), trained()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_at_step_2, daemon=True).start()
    with pytest.raises(Preempted) as info:
        launch(cfg)
    took = time.monotonic() - sent["at"]
    message = str(info.value)
    assert message.startswith("SIGTERM received by the driver: stopped at step "), message
    step = int(message.split("stopped at step ")[1].split()[0])
    assert sent["step"] <= step < 40 and took < 30, (message, sent, took)
    name = f"step-{step:08d}"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/term/")["Contents"]}
    assert f"runs/term/checkpoints/{name}/MANIFEST.json" in keys
    assert "runs/term/results.json" not in keys and "runs/term/LOCK.json" not in keys

    results = launch(cfg)
    assert results is not None and results["resumed_from"] == name and results["global_steps"] == 40


def test_an_error_on_one_rank_ends_the_run_and_user_errors_are_refused_once(
    aws_env, local_ray, tmp_path, monkeypatch
):
    """Rank 1 alone raises in step 4 (rank 0 waits in that step's collectives): the run ends within
    30 s with rank 1's error in one line. Then resuming with a changed config is refused in the
    driver before any worker starts (another worker count is not: tests/test_elastic.py)."""
    from raytag.launcher.ray_launcher import LaunchError, launch
    from raytag.trainer.config import ConfigError

    bucket = aws_env.make_bucket()
    marker = tmp_path / "raised"
    monkeypatch.setenv("RAYTAG_FAULT_INJECT", f"1:4:{marker}:raise")
    # Checkpoints at steps 1-3: the first is committed long before Ray ends the group.
    cfg = _s3_config(bucket, "err", "scaling.max_failures=0", "train.max_steps=6", "train.save_every=1")
    with pytest.raises(LaunchError) as info:
        launch(cfg)
    ended = time.time()
    message = str(info.value)
    assert "\n" not in message and "injected failure on rank 1 at step 4" in message, message
    assert ended - marker.stat().st_mtime < 30, f"the run took {ended - marker.stat().st_mtime:.0f} s to end"
    monkeypatch.delenv("RAYTAG_FAULT_INJECT")

    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"train.learning_rate: 0.003 -> 0.001"):
        launch(_s3_config(bucket, "err", "train.max_steps=6", "train.learning_rate=1e-3"))
    assert time.monotonic() - started < 30  # decided in the driver: no worker group was started


def test_a_lease_of_an_ended_ray_job_is_taken_over_at_once(aws_env, local_ray):
    """The driver of a `ray job submit` is killed (its job ends, Ray kills its workers) and the job
    is resubmitted: the lease its rank 0 wrote on some other node is taken over at once, because
    this cluster lists that Ray job as ended. A live job's lease is still refused."""
    import subprocess
    import sys

    import ray

    from raytag.cluster.runlock import RunLock, RunLockedError
    from raytag.cluster.storage import open_storage
    from raytag.launcher.ray_launcher import _cluster_id, _ray_job_gone

    gcs = ray.get_runtime_context().gcs_address
    code = f"import ray; ray.init(address={gcs!r}); print(ray.get_runtime_context().get_job_id())"
    ended = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    ended_job = ended.stdout.strip().splitlines()[-1]
    deadline = time.time() + 30
    while time.time() < deadline and not any(
        j["JobID"] == ended_job and j["IsDead"] for j in ray._private.state.jobs()
    ):
        time.sleep(0.2)

    storage = open_storage(f"s3://{aws_env.make_bucket()}/runs")

    def lease(job: str) -> bytes:  # written moments ago by a process on another machine
        return json.dumps(
            {
                "owner": "elsewhere:1:old",
                "heartbeat": time.time(),
                "host": "elsewhere",
                "pid": 1,
                "ray_job": job,
                "ray_cluster": _cluster_id(),
            }
        ).encode()

    storage.put_bytes("dead/LOCK.json", lease(ended_job))
    logs: list[str] = []
    lock = RunLock(storage, "dead", "new:2:owner", log=logs.append, gone=_ray_job_gone)
    lock.acquire()
    lock.release()
    assert any(f"its Ray job {ended_job} on this cluster has ended" in m for m in logs), logs

    storage.put_bytes("live/LOCK.json", lease(ray.get_runtime_context().get_job_id()))
    with pytest.raises(RunLockedError):
        RunLock(storage, "live", "new:2:owner", log=logs.append, gone=_ray_job_gone).acquire()
