"""A local run on S3 storage stopped or crashed for real, then rerun with the same command.

- SIGTERM mid-epoch: a checkpoint at the next step boundary, uploaded, exit status 75 within 30 s;
  the rerun continues from it and ends with the uninterrupted run's losses and metrics.
- SIGKILL at an arbitrary moment: the rerun starts at once (the dead process's lease is taken
  over, no wait for its expiry) and matches the uninterrupted run step by step.
- An S3 outage shorter than `run.storage_retry_seconds`: ridden out, the same result.
- A longer one: the run ends with one line naming the checkpoint; once the server is back the
  rerun resumes from the last complete checkpoint and matches the uninterrupted run.

Every run here is a real `python trainer/main.py` process (signals, exit status, lease); the
uninterrupted reference runs in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.helpers import DEMO, ROOT, train_demo
from tests.s3_server import S3TestServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMMON = [
    "data.max_train_samples=200",
    "data.max_eval_samples=40",
    "data.test=null",
    "train.batch_tokens=512",
    "train.log_every=1",
    "train.max_steps=12",
    "train.eval_every=6",
    "model.dropout=0.0",
]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def train(storage: str, name: str, *overrides: str) -> dict:
    return train_demo(storage, name, *COMMON, *overrides)


def get(server: S3TestServer, bucket: str, key: str) -> bytes | None:
    try:
        return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception:
        return None


def keys(server: S3TestServer, bucket: str, prefix: str) -> list[str]:
    page = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for o in page.get("Contents", []))


def records(server: S3TestServer, bucket: str, run: str) -> list[dict]:
    raw = get(server, bucket, f"runs/{run}/metrics.jsonl") or b""
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def losses(recs: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in recs if r.get("type") == "train"}


def evals(recs: list[dict]) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["f1"], r["loss"]) for r in recs if r.get("type") == "eval"}


def assert_same_run(got: list[dict], want: list[dict]) -> None:
    """Every step's training loss and every evaluation as in the uninterrupted run."""
    a, b = losses(got), losses(want)
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    torch.testing.assert_close(
        torch.tensor([a[s] for s in sorted(a)]), torch.tensor([b[s] for s in sorted(b)]), rtol=1e-5, atol=1e-6
    )
    ea, eb = evals(got), evals(want)
    assert sorted(ea) == sorted(eb)
    torch.testing.assert_close(
        torch.tensor([ea[s] for s in sorted(ea)]), torch.tensor([eb[s] for s in sorted(eb)])
    )


class Job:
    """`python trainer/main.py` in a subprocess, its output collected."""

    def __init__(
        self, server: S3TestServer, bucket: str, name: str, *overrides: str, env: dict[str, str] | None = None
    ) -> None:
        env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, **(env or {})}
        env.update(server.aws_env(), PYTHONUNBUFFERED="1")
        cmd = [
            sys.executable,
            str(ROOT / "trainer" / "main.py"),
            "--config",
            str(DEMO),
            f"run.storage=s3://{bucket}/runs",
            f"run.name={name}",
            *COMMON,
            *overrides,
        ]
        self.server, self.bucket, self.name = server, bucket, name
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)  # type: ignore[arg-type]
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_step(self, step: int, timeout: float = 240) -> int:
        """Block until the bucket's metrics.jsonl shows training step `step` (or later); return it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            done = max(losses(records(self.server, self.bucket, self.name)), default=0)
            if done >= step:
                return done
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended early ({self.proc.returncode}):\n{self.output[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"step {step} not reached in {timeout} s:\n{self.output[-3000:]}")

    def wait_for_line(self, text: str, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not any(text in ln for ln in self.lines):
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended before {text!r}:\n{self.output[-3000:]}")
            time.sleep(0.05)

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


@pytest.fixture(scope="module")
def clean(s3_server: S3TestServer) -> list[dict]:
    """The uninterrupted run's metrics.jsonl records (in-process)."""
    bucket = s3_server.make_bucket()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.aws_env().items():
            mp.setenv(k, v)
        for k in DIST_VARS:
            mp.delenv(k, raising=False)
        train(f"s3://{bucket}/runs", "clean")
    recs = records(s3_server, bucket, "clean")
    assert max(losses(recs)) == 12
    return recs


def test_sigterm_saves_uploads_and_exits_75_then_the_rerun_matches(aws_env, clean, tmp_path) -> None:
    """A real SIGTERM (sent by the process to itself at the start of step 3, through the fault
    injection, so the step is exact) stops the run at the end of step 3, not at the next scheduled
    checkpoint (step 6)."""
    server, bucket = aws_env, aws_env.make_bucket()
    job = Job(server, bucket, "term", env={"RAYTAG_FAULT_INJECT": f"0:3:{tmp_path / 'term'}:term"})
    job.wait_for_line("SIGTERM received: stopping at the next step boundary")
    t0 = time.monotonic()
    code = job.wait(timeout=60)
    took = time.monotonic() - t0
    out = job.output
    assert code == 75, out[-3000:]
    assert took < 30, took
    last = [ln for ln in out.splitlines() if ln.startswith("raytag: ")]
    assert len(last) == 1, out[-2000:]
    assert last[0].startswith("raytag: preempted: SIGTERM received: stopped at step 3 of 12"), last
    assert "Traceback" not in out
    name = "step-00000003"
    found = keys(server, bucket, "runs/term/")
    assert f"checkpoints/{name}/MANIFEST.json" in found, found  # complete in the bucket
    assert "results.json" not in found
    assert "LOCK.json" not in found  # released: the rerun needs no takeover

    res = train(f"s3://{bucket}/runs", "term")
    assert res["resumed_from"] == name
    assert_same_run(records(server, bucket, "term"), clean)


def test_sigkilled_run_is_rerun_at_once_and_matches(aws_env, clean, caplog) -> None:
    server, bucket = aws_env, aws_env.make_bucket()
    job = Job(server, bucket, "kill", "train.save_every=2")
    job.wait_for_step(5)
    job.proc.kill()  # SIGKILL: no handler, no finally, the lease stays behind
    assert job.wait(timeout=30) == -signal.SIGKILL
    assert "LOCK.json" in keys(server, bucket, "runs/kill/")

    caplog.set_level("INFO", logger="raytag")
    t0 = time.monotonic()
    res = train(f"s3://{bucket}/runs", "kill", "train.save_every=2")
    assert "taking over the lease" in caplog.text and "is gone" in caplog.text, caplog.text[-2000:]
    assert res["resumed_from"] is not None and res["resumed_from"] >= "step-00000002"
    assert time.monotonic() - t0 < 120  # no wait for the lease's 5-minute expiry
    assert_same_run(records(server, bucket, "kill"), clean)


def test_a_short_outage_is_ridden_out_with_the_same_result(aws_env, clean) -> None:
    server, bucket = aws_env, aws_env.make_bucket()
    if not server.can_restart:
        pytest.skip("the S3 server is external: this test cannot stop it")
    job = Job(server, bucket, "blip", "train.save_every=2", "run.storage_retry_seconds=120")
    job.wait_for_step(3)
    server.stop(kill=True)
    time.sleep(6)
    server.start()
    code = job.wait(timeout=300)
    out = job.output
    assert code == 0, out[-3000:]
    assert "retrying" in out  # the outage was seen, and ridden out
    assert_same_run(records(server, bucket, "blip"), clean)
    results = json.loads(get(server, bucket, "runs/blip/results.json") or b"{}")
    assert results["validation"]["f1"] == evals(clean)[12][0]


def test_a_long_outage_ends_the_run_in_one_line_and_the_rerun_matches(aws_env, clean) -> None:
    server, bucket = aws_env, aws_env.make_bucket()
    if not server.can_restart:
        pytest.skip("the S3 server is external: this test cannot stop it")
    job = Job(server, bucket, "long", "train.save_every=2", "run.storage_retry_seconds=4")
    job.wait_for_line("saved checkpoint step-00000002")
    server.stop(kill=True)
    try:
        code = job.wait(timeout=300)
    finally:
        server.start()
    out = job.output
    assert code == 2, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("raytag: error: ")]
    # Whichever the run needed first: a checkpoint upload, or a training shard (they live in the bucket).
    assert len(errors) == 1, out[-3000:]
    assert "was not saved" in errors[0] or ("cannot read" in errors[0] and "prepared-data" in errors[0]), (
        errors
    )
    assert "Traceback" not in out

    # The rerun (on the same node) first uploads the parts the failed attempt left in its staging
    # folder and completes their manifests; it resumes only from a complete checkpoint.
    # (Retention may then delete the checkpoint it resumed from: equal results show that nothing
    # partial was read.)
    res = train(f"s3://{bucket}/runs", "long", "train.save_every=2", "run.storage_retry_seconds=4")
    assert res["resumed_from"] is not None and res["resumed_from"] >= "step-00000002", res["resumed_from"]
    assert_same_run(records(server, bucket, "long"), clean)
