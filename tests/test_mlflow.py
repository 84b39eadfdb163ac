"""MLflow tracking against a real `mlflow server` (SQLite backend, artifacts served from a temporary
folder, a free loopback port), read back through MlflowClient: parameters, metric histories,
artifacts; a resume continuing its MLflow run; a sweep's trials in one experiment; an unreachable
server; a bad URI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import DEMO, MAIN, kill_training_at_micro_batch, run_records, train_demo
from tests.s3_server import free_ports

pytestmark = pytest.mark.slow

# A few steps of the demo: 16 sentences (one step an epoch, an evaluation after each), no test set
TINY = (
    "data.max_train_samples=16",
    "data.max_eval_samples=8",
    "data.test=null",
    "train.log_every=1",
)


@dataclass
class MlflowServer:
    uri: str
    root: Path

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, experiment: str) -> list:
        """The runs of `experiment`, oldest first."""
        client = self.client()
        found = client.get_experiment_by_name(experiment)
        assert found is not None, f"no experiment {experiment!r}"
        return sorted(client.search_runs([found.experiment_id]), key=lambda r: r.info.start_time)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client().get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port (one web worker, no job runner), until the module ends."""
    root = tmp_path_factory.mktemp("mlflow")
    (port,) = free_ports(1)
    logfile = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its web workers in one process group, stopped together below
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (root / "server.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"mlflow server did not answer on {uri}/health:\n{log}")
            time.sleep(0.5)
        yield MlflowServer(uri, root)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        logfile.close()


def leaves(tree: dict, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf of a nested mapping (an empty mapping is a leaf)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_a_run_logs_its_config_metrics_results_and_files(mlflow_server, tmp_path):
    import yaml

    secret_uri = mlflow_server.uri.replace("http://", "http://alice:hunter2@")  # the server ignores it
    res = train_demo(
        tmp_path,
        "tracked",
        *TINY,
        "train.max_steps=3",
        "data.eval_sets.extra=builtin:demo/test.txt",  # F1 per set: validation and a named set
        f"tracking.mlflow_uri={secret_uri}",
        "tracking.mlflow_experiment=ner",
    )
    (run,) = mlflow_server.runs("ner")
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    run_dir = tmp_path / "tracked"

    # Parameters: every key of the resolved config (config.yaml), the password masked everywhere
    config = leaves(yaml.safe_load((run_dir / "config.yaml").read_text()))
    params = run.data.params
    assert set(params) == set(config) - {"run.owner"}
    assert params["train.learning_rate"] == "0.003" and params["train.max_steps"] == "3"
    assert params["data.eval_sets.extra"] == "builtin:demo/test.txt" and params["data.test"] == "null"
    assert params["tracking.mlflow_uri"] == mlflow_server.uri.replace("http://", "http://alice:***@")
    assert params["tracking.mlflow_experiment"] == "ner"
    for text in [
        *params.values(),
        (run_dir / "config.yaml").read_text(),
        (run_dir / "results.json").read_text(),
    ]:
        assert "hunter2" not in text

    # Metrics per logged step: what metrics.jsonl holds
    records = run_records(run_dir)
    train = [r for r in records if r["type"] == "train"]
    for key in ("loss", "learning_rate", "tokens_per_second", "grad_norm"):
        got = mlflow_server.history(run.info.run_id, f"train/{key}")
        assert [s for s, _ in got] == [r["step"] for r in train], key
        assert [v for _, v in got] == pytest.approx([r[key] for r in train]), key
    for split in ("validation", "extra"):
        evals = [r for r in records if r["type"] == "eval" and r["split"] == split]
        assert [s for s, _ in mlflow_server.history(run.info.run_id, f"{split}/f1")] == [1, 2, 3]
        got = mlflow_server.history(run.info.run_id, f"{split}/loss")
        assert [v for _, v in got] == pytest.approx([r["loss"] for r in evals]), split
    # ... and the final results, at the last step
    final = run.data.metrics
    assert final["results/validation/f1"] == pytest.approx(res["validation"]["f1"])
    assert final["results/extra/recall"] == pytest.approx(res["extra"]["recall"])
    assert final["results/train_tokens_per_second"] == pytest.approx(res["train_tokens_per_second"])
    assert final["results/global_steps"] == 3

    # Artifacts: results.json, the model card and its plots
    client = mlflow_server.client()
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"results.json", "card"}
    card = {a.path for a in client.list_artifacts(run.info.run_id, "card")}
    assert card == {
        f"card/{n}" for n in ("README.md", "learning_curves.png", "per_type.png", "confusion.png")
    }
    got = Path(client.download_artifacts(run.info.run_id, "results.json", str(tmp_path / "dl")))
    assert json.loads(got.read_text()) == json.loads((run_dir / "results.json").read_text())


def test_a_resumed_run_continues_its_mlflow_run(mlflow_server, tmp_path, monkeypatch):
    common = [*TINY, "train.max_steps=4", f"tracking.mlflow_uri={mlflow_server.uri}"]
    common.append("tracking.mlflow_experiment=resume")
    restore = kill_training_at_micro_batch(monkeypatch, 4)  # dies in step 4: checkpoint step 3 saved
    with pytest.raises(KeyboardInterrupt):
        train_demo(tmp_path, "again", *common)
    restore()
    (first,) = mlflow_server.runs("resume")
    assert first.info.status == "KILLED"
    assert [s for s, _ in mlflow_server.history(first.info.run_id, "train/loss")] == [1, 2, 3]

    res = train_demo(tmp_path, "again", *common)
    assert res["resumed_from"] == "step-00000003"
    (run,) = mlflow_server.runs("resume")  # the same MLflow run, not a second one
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert [s for s, _ in mlflow_server.history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert run.data.metrics["results/global_steps"] == 4


def test_a_sweeps_trials_are_runs_of_one_experiment(mlflow_server, tmp_path, monkeypatch):
    # The standard MLFLOW_TRACKING_URI turns tracking on; the experiment is the sweep's name.
    from raytag.launcher.sweep import plan
    from raytag.trainer.config import to_dict
    from raytag.trainer.loop import train_loop

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    items = [f"run.storage={tmp_path}", "run.name=lrs", *TINY, "train.max_steps=1"]
    _, _, trials = plan(DEMO, [*items, "sweep.train.learning_rate=[1e-3,3e-3]"], 1, None)
    for t in trials:  # what each Ray Tune trial runs (tests/test_sweep.py runs them on Ray)
        train_loop(to_dict(t.config))
    runs = mlflow_server.runs("lrs")
    assert [r.info.run_name for r in runs] == ["trial-000", "trial-001"]
    assert [r.data.params["train.learning_rate"] for r in runs] == ["0.001", "0.003"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_an_unreachable_server_is_one_warning_and_the_run_trains_on(tmp_path, caplog):
    (port,) = free_ports(1)  # nothing listens there
    caplog.set_level("INFO", logger="raytag")
    t0 = time.monotonic()
    res = train_demo(
        tmp_path, "offline", *TINY, "train.max_steps=2", f"tracking.mlflow_uri=http://127.0.0.1:{port}"
    )
    took = time.monotonic() - t0
    assert res["global_steps"] == 2 and (tmp_path / "offline" / "results.json").is_file()
    warnings = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "MLflow" in r.getMessage()
    ]
    assert len(warnings) == 2, warnings  # one when it fails, one at the end naming what it missed
    assert "unreachable" in warnings[0] and "trains on" in warnings[0]
    assert "did not get" in warnings[1] and "the artifacts" in warnings[1] and "metrics.jsonl" in warnings[1]
    assert took < 60, took  # no waiting on retries


def test_a_bad_uri_is_a_one_line_error(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(MAIN),
            "--config",
            str(DEMO),
            f"run.storage={tmp_path}",
            "tracking.mlflow_uri=localhost:5000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"raytag: error: {DEMO}: tracking.mlflow_uri: 'localhost:5000' has no scheme; did you mean "
        "'http://localhost:5000'?"
    ]


@pytest.mark.parametrize(
    "uri, problem",
    [
        ("htp://host:5000", "unsupported scheme 'htp'"),
        ("s3://bucket/mlflow", "unsupported scheme 's3'"),
        ("http://host:port", "port that is not a number"),
        ("http://", "names no host"),
        ("http://host :5000", "with spaces"),
    ],
)
def test_uris_that_cannot_be_tracking_uris_are_config_errors(uri, problem, monkeypatch):
    from raytag.trainer.config import ConfigError, load_config
    from raytag.trainer.tracking import resolve

    with pytest.raises(ConfigError, match=f"tracking.mlflow_uri: .*{problem}"):
        load_config(None, [f"tracking.mlflow_uri={uri}"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the environment's, checked before the run starts
    with pytest.raises(ConfigError, match=f"MLFLOW_TRACKING_URI: .*{problem}"):
        resolve(load_config(None))


def test_the_environment_tracking_settings_travel_in_the_config(monkeypatch):
    # Ray's workers start with the cluster's environment, not the driver's: the driver puts them in
    # the config that every worker's train_loop gets (here the in-process one's).
    import raytag.trainer.loop
    from raytag.launcher.dispatch import run
    from raytag.trainer.config import load_config

    got = []
    monkeypatch.setattr(raytag.trainer.loop, "train_loop", lambda config: got.append(config["tracking"]))
    for name in ("RAY_ADDRESS", "RAY_JOB_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    run(load_config(DEMO))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ner")
    run(load_config(DEMO))
    run(
        load_config(DEMO, ["tracking.mlflow_uri=http://h:1", "tracking.mlflow_experiment=x"])
    )  # the config's win
    assert got == [
        {"mlflow_uri": None, "mlflow_experiment": None},
        {"mlflow_uri": "https://mlflow.example.com", "mlflow_experiment": "ner"},
        {"mlflow_uri": "http://h:1", "mlflow_experiment": "x"},
    ]
