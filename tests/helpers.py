"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "trainer" / "main.py"
DEMO = ROOT / "configs" / "demo.yaml"


def train_demo(storage: Path | str, name: str, *overrides: str) -> dict:
    """Train the demo config as run `name` in `storage` (a folder or s3:// prefix), in this process."""
    from raytag.trainer.config import load_config, to_dict
    from raytag.trainer.loop import train_loop

    cfg = load_config(DEMO, [f"run.storage={storage}", f"run.name={name}", *overrides])
    return train_loop(to_dict(cfg))


def run_records(run_dir: Path) -> list[dict]:
    """The records of a local run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss of a local run (its metrics.jsonl)."""
    return train_losses((run_dir / "metrics.jsonl").read_text().splitlines())


def cli(*args: str, cwd: Path = MAIN.parents[1], timeout: float = 180) -> subprocess.CompletedProcess:
    """`python trainer/main.py ARGS...` in a subprocess, without this process's distributed variables."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "RAY_ADDRESS")
    }
    return subprocess.run(
        [sys.executable, str(MAIN), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env
    )


# What every finished run leaves under <storage>/<run.name>/ (the layout in README.md).
RUN_OUTPUTS = [
    "metrics.jsonl",
    "results.json",
    "config.yaml",
    "labels.json",
    "predictions/validation.txt",
    "predictions/test.txt",
    "model/config.json",
    "model/model.safetensors",
    "model/README.md",
    "model/tokenizer.json",
    "model/raytag.json",
    "model/learning_curves.png",  # the card's plots (trainer/plots.py)
    "model/per_type.png",
    "model/confusion.png",
]


def kill_training_at_micro_batch(monkeypatch: pytest.MonkeyPatch, n: int) -> Callable[[], None]:
    """Make the training loop die (KeyboardInterrupt, like a lost process) at its n-th micro-batch.

    Returns a function that restores the loop, for a second attempt in the same test.
    """
    import raytag.trainer.step as step

    real, calls = step.collate, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt(f"killed at micro-batch {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "collate", dying)
    return lambda: monkeypatch.setattr(step, "collate", real)


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under `logdir` (a folder or s3:// URI), read by TensorBoard's
    own loader (which applies a resumed writer's purge): tag -> [(step, value), ...] in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tensorboard_matches_metrics(logdir, records: list[dict]) -> None:
    """Each scalar of metrics.jsonl's records is in TensorBoard once per logged step, with its value."""
    scalars = tensorboard_scalars(logdir)
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["type"] == "train":
            pairs = {
                f"train/{k}": r[k]
                for k in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu", "epoch")
            }
        else:
            pairs = {f"{r['split']}/{k}": r[k] for k in ("f1", "precision", "recall", "accuracy", "loss")}
            for t, m in r["per_type"].items():
                pairs.update({f"{r['split']}/{t}/{k}": m[k] for k in ("f1", "precision", "recall")})
        for tag, value in pairs.items():
            if value is not None:
                expected.setdefault(tag, []).append((r["step"], value))
    assert set(scalars) == set(expected), sorted(set(scalars) ^ set(expected))
    for tag, points in expected.items():
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in points], (tag, got, points)
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


# --------------------------------------------------------------------------- Ray jobs of the tests

# The small demo run the Ray tests share: 200 sentences, 6 steps, a checkpoint every 3.
RAY_SMALL = [
    "data.max_train_samples=200",
    "data.max_eval_samples=60",
    "train.batch_tokens=512",
    "train.max_steps=6",
    "train.log_every=1",
    "train.save_every=3",
    "model.dropout=0.0",  # dropout masks come from per-rank RNG streams; the maths must match without them
    # fp32: under bf16 autocast (auto on a CPU with AVX512-BF16) DeepSpeed all-reduces the Linear
    # layers' gradients in bf16, so 2 workers match 1 only to bf16's precision, not the 1e-4 checked
    "train.precision=fp32",
]


def submit_job(dashboard_url: str, env: dict[str, str], *overrides: str) -> str:
    """`ray job submit --no-wait` of the demo config with `overrides`, as users run it; returns the job id."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    job_id = f"raytag-test-{os.getpid()}-{time.time_ns()}"
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        dashboard_url,
        "--submission-id",
        job_id,
        "--working-dir",
        str(root),
        "--no-wait",
        "--",
        "python",
        "trainer/main.py",
        "--config",
        "configs/demo.yaml",
        *overrides,
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    return job_id


def wait_job(dashboard_url: str, job_id: str, timeout_s: float = 600) -> tuple[str, str]:
    """Wait until the job ends (or `timeout_s`); its final status name and its logs."""
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard_url)
    deadline = time.time() + timeout_s
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    return str(status.value if hasattr(status, "value") else status), client.get_job_logs(job_id)


def train_losses(metrics_lines: list[str]) -> dict[int, float]:
    """step -> loss of the train records of metrics.jsonl lines."""
    import json

    recs = [json.loads(x) for x in metrics_lines if x.strip()]
    return {r["step"]: r["loss"] for r in recs if r.get("type") == "train"}


def assert_matches_one_worker(metrics_lines: list[str], results: dict, overrides: list[str], tmp) -> None:
    """Data-parallel equivalence: 2 workers' per-step losses (`metrics_lines`) equal those of one
    in-process worker with 2 accumulation steps over the same global batches (`overrides`: the run's
    config overrides), and both train on the same tokens."""
    import torch

    single = train_demo(tmp, "single", "train.gradient_accumulation_steps=2", *overrides)
    a = train_losses(metrics_lines)
    b = train_losses((Path(tmp) / "single" / "metrics.jsonl").read_text().splitlines())
    assert sorted(a) == sorted(b) and a, (a, b)
    # Tolerance: the all-reduce sums gradients in another order than one process does (fp32).
    torch.testing.assert_close(
        torch.tensor([a[s] for s in sorted(a)]), torch.tensor([b[s] for s in sorted(a)]), rtol=1e-4, atol=1e-5
    )
    assert single["train_tokens"] == results["train_tokens"]  # same sentences, no more, no fewer
    assert abs(single["validation"]["f1"] - results["validation"]["f1"]) < 0.02
