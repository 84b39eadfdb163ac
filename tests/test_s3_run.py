"""Training runs against a real S3-compatible server: outputs in the bucket, resume from it, outages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    DEMO,
    ROOT,
    RUN_OUTPUTS,
    assert_tensorboard_matches_metrics,
    kill_training_at_micro_batch,
    train_demo,
)
from tests.s3_server import S3TestServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = [
    "data.max_train_samples=120",
    "data.max_eval_samples=40",
    "train.batch_tokens=512",
    "train.log_every=1",
]


@pytest.fixture
def aws(aws_env: S3TestServer) -> S3TestServer:
    return aws_env  # boto3's standard variables point at the test server


def keys(server: S3TestServer, bucket: str, prefix: str) -> list[str]:
    out, token = [], None
    client = server.client()
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = client.list_objects_v2(**kw)
        out += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return sorted(out)
        token = page["NextContinuationToken"]


def get(server: S3TestServer, bucket: str, key: str) -> bytes:
    return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def staging(storage: str, name: str) -> Path:
    from raytag.cluster.run import staging_folder
    from raytag.cluster.storage import open_storage

    return staging_folder(None, open_storage(storage).uri, name)


def train(storage: str, name: str, *overrides: str) -> dict:
    return train_demo(storage, name, *SMALL, *overrides)


def test_run_writes_everything_to_the_bucket_and_resumes_on_a_clean_machine(
    aws, monkeypatch, tmp_path, capsys
):
    bucket = aws.make_bucket()
    storage = f"s3://{bucket}/team/runs"
    steps = ["train.max_steps=6", "train.eval_every=2", "run.keep_best=3"]

    # The run dies in step 5, after the step-4 checkpoint reached the bucket.
    restore = kill_training_at_micro_batch(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(storage, "r1", *steps)
    restore()
    before = keys(aws, bucket, "team/runs/r1/")
    assert "checkpoints/step-00000004/MANIFEST.json" in before
    assert "metrics.jsonl" in before and "results.json" not in before
    # Metrics reached the bucket while the run went (steps 1-4 logged).
    logged = [json.loads(x) for x in get(aws, bucket, "team/runs/r1/metrics.jsonl").decode().splitlines()]
    assert {r["step"] for r in logged if r["type"] == "train"} >= {1, 2, 3, 4}
    assert "LOCK.json" not in before  # released when the process ended

    # A new machine: nothing local. The same command resumes from the bucket.
    assert staging(storage, "r1").is_dir()  # the node's working folder, keyed by the run's location
    shutil.rmtree(staging(storage, "r1"))
    res = train(storage, "r1", *steps)
    assert res["resumed_from"] == "step-00000004"
    assert res["global_steps"] == 6
    after = keys(aws, bucket, "team/runs/r1/")
    for key in RUN_OUTPUTS + ["checkpoints/step-00000006/MANIFEST.json"]:
        assert key in after, key
    steps_logged = [
        json.loads(x)["step"]
        for x in get(aws, bucket, "team/runs/r1/metrics.jsonl").decode().splitlines()
        if json.loads(x)["type"] == "train"
    ]
    assert steps_logged == [1, 2, 3, 4, 5, 6]  # history kept across machines, each step once
    # TensorBoard's event files are in the bucket, one per attempt, and TensorBoard reads them there
    events = [k for k in after if k.startswith("tensorboard/events.out.tfevents.")]
    assert len(events) == 2, after
    monkeypatch.setenv(
        "S3_ENDPOINT", aws.endpoint_url
    )  # TensorBoard's S3 reader takes its endpoint from here
    records = [json.loads(x) for x in get(aws, bucket, "team/runs/r1/metrics.jsonl").decode().splitlines()]
    assert_tensorboard_matches_metrics(f"s3://{bucket}/team/runs/r1/tensorboard", records)
    results = json.loads(get(aws, bucket, "team/runs/r1/results.json"))
    assert results["resumed_from"] == "step-00000004"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in get(aws, bucket, "team/runs/r1/config.yaml").decode()

    # Finished: a rerun says so instead of training again.
    again = train(storage, "r1", *steps)
    assert again["global_steps"] == 6
    report_of_bucket_run(f"{storage}/r1", results, tmp_path, monkeypatch, capsys)


def report_of_bucket_run(uri: str, results: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    """`report s3://...` reads the run from the bucket (endpoint and keys from the environment) and
    writes ./<run-name>-report.html with every plot embedded; the secret key appears nowhere."""
    from raytag.launcher.cli import main
    from raytag.trainer.plots import PLOTS

    monkeypatch.chdir(tmp_path)
    assert main(["report", uri]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and f"{results['validation']['f1']:.4f}" in out and "r1-report.html" in out
    page = (tmp_path / "r1-report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert "Worst-predicted validation sentences" in page and 'class="sent"' in page
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in page + out


def test_resume_skips_a_checkpoint_with_a_broken_manifest(aws, monkeypatch, caplog):
    bucket = aws.make_bucket()
    storage = f"s3://{bucket}/runs"
    steps = ["train.max_steps=8", "train.eval_every=2", "run.keep_best=5"]
    restore = kill_training_at_micro_batch(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train(storage, "r2", *steps)
    restore()
    complete = sorted(
        {k.split("/")[0] for k in keys(aws, bucket, "runs/r2/checkpoints/") if k.endswith("MANIFEST.json")}
    )
    assert len(complete) >= 3, complete
    newest, second, third = complete[-1], complete[-2], complete[-3]
    client = aws.client()
    client.put_object(Bucket=bucket, Key=f"runs/r2/checkpoints/{newest}/MANIFEST.json", Body=b"{not json")
    # `second` as a save cut off mid-upload: no manifest, and not every rank's part marker in.
    client.delete_object(Bucket=bucket, Key=f"runs/r2/checkpoints/{second}/MANIFEST.json")
    client.delete_object(Bucket=bucket, Key=f"runs/r2/checkpoints/{second}/.parts/rank-00000.json")
    shutil.rmtree(staging(storage, "r2"))
    caplog.set_level("INFO")
    res = train(storage, "r2", *steps)
    assert res["resumed_from"] == third
    assert f"skipping checkpoint {newest}: corrupt manifest" in caplog.text
    assert f"skipping checkpoint {second}: no MANIFEST.json" in caplog.text


def test_resume_refuses_a_changed_config_and_a_second_writer(aws, monkeypatch):
    from raytag.cluster.runlock import RunLock, RunLockedError
    from raytag.cluster.storage import open_storage
    from raytag.trainer.config import ConfigError

    bucket = aws.make_bucket()
    storage = f"s3://{bucket}/runs"
    restore = kill_training_at_micro_batch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(storage, "r3", "train.max_steps=4", "train.save_every=2")
    restore()
    with pytest.raises(
        ConfigError, match=r"config differs from the stored run: train.learning_rate: 0.003 -> 0.001"
    ):
        train(storage, "r3", "train.max_steps=4", "train.save_every=2", "train.learning_rate=1e-3")
    # Another live job holds the run: refused, naming it.
    other = RunLock(open_storage(storage), "r3", owner="other-host:42:abcd")
    other.acquire()
    try:
        with pytest.raises(RunLockedError, match=r"being written by another job \(other-host:42:abcd"):
            train(storage, "r3", "train.max_steps=4", "train.save_every=2")
    finally:
        other.release()


def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "trainer" / "main.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize("problem", ["wrong_secret", "unknown_bucket", "nothing_listens"])
def test_storage_mistakes_fail_before_training(s3_server: S3TestServer, problem, tmp_path):
    from tests.s3_server import free_ports

    bucket = s3_server.make_bucket()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.aws_env())
    if problem == "wrong_secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret-Zq81xw"
    elif problem == "unknown_bucket":
        bucket = "no-such-bucket-here"
    else:
        env["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{free_ports(1)[0]}"
    start = time.monotonic()
    r = _cli(["--config", str(DEMO), f"run.storage=s3://{bucket}/p", "run.name=x"], env)
    took = time.monotonic() - start
    assert r.returncode == 2, r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("raytag: error:")]
    assert len(err_lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert bucket in err_lines[0]
    assert "step 1/" not in r.stderr  # no training step ran
    assert took < 30 + 15, took  # the check itself is bounded (<30 s); the rest is Python start-up
    for secret in (env["AWS_SECRET_ACCESS_KEY"], s3_server.secret_key):
        assert secret not in r.stderr + r.stdout


def test_node_staging_holds_only_the_newest_checkpoint(aws, monkeypatch, tmp_path):
    """A checkpoint every step: once each checkpoint's upload is done the older ones leave the node.

    The run is stopped (as a lost process) in its last step, so the staging folder is left as a
    long run would leave it: only the newest checkpoint, nothing still uploading."""
    bucket = aws.make_bucket()
    storage = f"s3://{bucket}/runs"
    stage = tmp_path / "stage"
    restore = kill_training_at_micro_batch(monkeypatch, 12)
    with pytest.raises(KeyboardInterrupt):
        train(storage, "many", "train.max_steps=12", "train.save_every=1", f"run.staging_dir={stage}")
    restore()
    from raytag.cluster.run import staging_folder
    from raytag.cluster.storage import open_storage

    folder = staging_folder(str(stage), open_storage(storage).uri, "many")
    staged = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert staged == ["step-00000011"], staged
    in_bucket = {
        k.split("/")[0] for k in keys(aws, bucket, "runs/many/checkpoints/") if k.endswith("MANIFEST.json")
    }
    assert "step-00000011" in in_bucket
    one = sum(f.stat().st_size for f in (folder / "checkpoints" / "step-00000011").rglob("*") if f.is_file())
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < one * 1.1 + 1_000_000, (
        total,
        one,
    )  # the checkpoint plus small run files (metrics, config)

    # The rerun on this node resumes from the staged copy (nothing to download) and, once the run
    # has finished, leaves nothing on the node: the bucket holds the run.
    res = train(storage, "many", "train.max_steps=12", "train.save_every=1", f"run.staging_dir={stage}")
    assert res["resumed_from"] == "step-00000011"
    assert not folder.exists()
