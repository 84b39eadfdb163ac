#!/usr/bin/env python3
"""Ray Train v2 on a two-node ``RayCluster``: placement, a node joining late, and how fast failures surface.

A trivial ``TorchTrainer`` (2 workers, ``{"CPU": 1, "raytag_slot": 1}`` each, gloo) on the
test fixture's cluster (``tests/ray_cluster.py``), measured four ways:

- **late join**: the job is submitted (``ray job submit``) to a head-only cluster, a second node
  joins ``--late-s`` seconds later; where the workers land, what ``TMPDIR``, ``node_rank`` and
  ``local_rank`` they see, and how long after the join they start;
- **raise**: rank 1 raises while rank 0 waits in ``torch.distributed.barrier()``, with
  ``FailureConfig(max_failures=0)``: seconds from the raise until ``trainer.fit()`` raises;
- **restart**: the same with ``max_failures=1`` (rank 1 raises once): seconds from the raise
  until the new worker group runs the train function again;
- **node lost**: both ranks report in a loop, node 1 is SIGKILLed: seconds until ``fit()`` raises
  and until the GCS lists the node dead, with Ray's default health checks and with
  ``FAST_FAILURE_DETECTION``.

    python bench/ray_faults.py                   # late join after 75 s (past Train's 60 s start timeout), 3 reps
    python bench/ray_faults.py --late-s 20 --reps 1

Prints the figures and writes them to ``bench/out/ray-faults-<stamp>.json``. Needs the dev
extra only. On a busy machine the start-up figures grow (they are mostly process start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# -- the Ray job (this file, run with --job MODE OUT MAX_FAILURES) ---------------------------------


def _log(out: str, rec: dict) -> None:
    with open(os.path.join(out, "events.jsonl"), "a") as f:
        f.write(json.dumps({**rec, "t": time.time()}) + "\n")


def train_fn(cfg: dict) -> None:
    import ray
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, out = ctx.get_world_rank(), cfg["out"]
    _log(
        out,
        {
            "ev": "start",
            "rank": rank,
            "node": ray.get_runtime_context().get_node_id(),
            "tmpdir": tempfile.gettempdir(),
            "local_rank": ctx.get_local_rank(),
            "node_rank": ctx.get_node_rank(),
            "backend": dist.get_backend(),
        },
    )
    once = os.path.join(out, "raised-once")
    if cfg["mode"] == "fail" and not os.path.exists(once):
        if rank == 1:
            time.sleep(2)  # rank 0 is in the barrier by then
            open(once, "w").close()
            _log(out, {"ev": "raise", "rank": rank})
            raise RuntimeError("rank 1 fails on purpose")
        dist.barrier()
    if cfg["mode"] == "loop":
        for i in range(1200):
            ray.train.report({"i": i})
            time.sleep(0.5)
    ray.train.report({"rank": rank})


def job(mode: str, out: str, max_failures: int) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tests.ray_cluster import SLOT

    ray.init()
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"mode": mode, "out": out},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1, SLOT: 1}),
        run_config=RunConfig(
            name=f"{mode}-{max_failures}",
            storage_path=os.path.join(out, "storage"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    _log(out, {"ev": "fit"})
    try:
        trainer.fit()
        _log(out, {"ev": "fit-ok"})
    except Exception as exc:
        _log(out, {"ev": "fit-raised", "type": type(exc).__name__})


# -- the measurements ------------------------------------------------------------------------------


def _events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _first(out: Path, ev: str, after: float = 0.0) -> float | None:
    return next((e["t"] for e in _events(out) if e["ev"] == ev and e["t"] > after), None)


def _wait_for(out: Path, ev: str, timeout_s: float, after: float = 0.0) -> float:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        t = _first(out, ev, after)
        if t is not None:
            return t
        time.sleep(0.2)
    raise TimeoutError(f"no {ev!r} event in {timeout_s:.0f} s (see {out})")


def _run_job(cluster, mode: str, out: Path, max_failures: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--job", mode, str(out), str(max_failures)]
    env = {**cluster.env, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def late_join(work: Path, late_s: float) -> dict:
    from ray.job_submission import JobSubmissionClient

    from tests.ray_cluster import RAY, RayCluster

    out = work / "late"
    out.mkdir()
    with RayCluster() as cluster:
        cluster.start_head()
        # The job runs this file from an uploaded copy of the repo's tests/ and bench/ (small, no .venv).
        wd = work / "wd"
        shutil.copytree(ROOT / "tests", wd / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "bench", wd / "bench", ignore=shutil.ignore_patterns("__pycache__", "out"))
        submit = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", "late-join"]
        submit += ["--working-dir", str(wd), "--no-wait", "--", "python", "bench/ray_faults.py"]
        subprocess.run(
            [*submit, "--job", "plain", str(out), "0"], env=cluster.env, check=True, capture_output=True
        )
        t_submit = time.time()
        client = JobSubmissionClient(cluster.dashboard_url)
        time.sleep(late_s)
        status_before = str(client.get_job_status("late-join"))
        started_before = _first(out, "start") is not None
        t0 = time.time()
        node = cluster.add_node()
        t_joined = time.time()
        deadline = time.time() + 600
        while not client.get_job_status("late-join").is_terminal() and time.time() < deadline:
            time.sleep(1)
        starts = [e for e in _events(out) if e["ev"] == "start"]
        head = cluster.nodes[0]
        return {
            "late_s": late_s,
            "status_before_join": status_before,
            "workers_started_before_join": started_before,
            "join_s": round(t_joined - t0, 1),
            "workers_start_after_join_s": round(min(e["t"] for e in starts) - t_joined, 1)
            if starts
            else None,
            "submit_to_workers_s": round(min(e["t"] for e in starts) - t_submit, 1) if starts else None,
            "status": str(client.get_job_status("late-join")),
            "startup_timeouts_in_log": client.get_job_logs("late-join").count(
                "WorkerGroupStartupTimeoutError"
            ),
            "workers": [
                {
                    "rank": e["rank"],
                    "node": "head"
                    if e["node"] == head.node_id
                    else "node1"
                    if e["node"] == node.node_id
                    else "?",
                    "tmpdir_is_nodes": e["tmpdir"]
                    == str((head if e["node"] == head.node_id else node).tmpdir),
                    "node_rank": e["node_rank"],
                    "local_rank": e["local_rank"],
                    "backend": e["backend"],
                }
                for e in sorted(starts, key=lambda e: e["rank"])
            ],
        }


def failures(work: Path, reps: int) -> dict:
    from tests.ray_cluster import FAST_FAILURE_DETECTION, RayCluster

    result: dict = {"raise_to_fit_raised_s": [], "raise_to_restarted_s": [], "node_lost": {}}
    for fast in (False, True):
        with RayCluster() as cluster:
            cluster.start_head(env=FAST_FAILURE_DETECTION if fast else None)
            cluster.add_node()
            if not fast:
                for rep in range(reps):
                    for max_failures in (0, 1):
                        out = work / f"fail-{max_failures}-{rep}"
                        out.mkdir()
                        _run_job(cluster, "fail", out, max_failures).wait(timeout=600)
                        raised = _wait_for(out, "raise", 1)
                        if max_failures == 0:
                            result["raise_to_fit_raised_s"].append(
                                round(_wait_for(out, "fit-raised", 1) - raised, 1)
                            )
                        else:
                            result["raise_to_restarted_s"].append(
                                round(_wait_for(out, "start", 1, raised) - raised, 1)
                            )
            out = work / f"lost-{fast}"
            out.mkdir()
            driver = _run_job(cluster, "loop", out, 0)
            started = _wait_for(out, "start", 300)
            time.sleep(max(0.0, started + 3 - time.time()))
            t_kill = time.time()
            cluster.kill_node(1)
            driver.wait(timeout=600)
            fit_raised = _wait_for(out, "fit-raised", 1)
            while cluster.nodes[1].node_id in cluster.node_ids():
                time.sleep(0.2)
            result["node_lost"]["fast" if fast else "default"] = {
                "kill_to_fit_raised_s": round(fit_raised - t_kill, 1),
                "kill_to_gcs_dead_s": round(time.time() - t_kill, 1),
            }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--late-s", type=float, default=75.0, help="seconds between submission and the join")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the raise and restart runs")
    ap.add_argument("--job", nargs=3, metavar=("MODE", "OUT", "MAX_FAILURES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        job(args.job[0], args.job[1], int(args.job[2]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="rtf-", dir="/tmp"))
    try:
        record = {"late_join": late_join(work, args.late_s), **failures(work, args.reps)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(record, indent=2))
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"ray-faults-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
