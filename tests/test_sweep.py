"""`sweep`: the search space's points, and a sweep of 3 learning rates as Ray Tune trials on a 2-CPU Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raytag.launcher.sweep import Axis, parse_axis, plan, points, split_args, table
from raytag.trainer.config import ConfigError
from tests.helpers import ROOT
from tests.ray_cluster import RayCluster


def test_grid_axes_cross_in_the_order_given():
    axes, rest = split_args(
        ["sweep.train.learning_rate=[1e-5,3e-5]", "train.epochs=2", "sweep.train.seed=[1,2,3]"]
    )
    assert rest == ["train.epochs=2"]
    assert axes == [Axis("train.learning_rate", values=(1e-5, 3e-5)), Axis("train.seed", values=(1, 2, 3))]
    got = points(axes, samples=1, seed=0)
    assert got == [{"train.learning_rate": lr, "train.seed": s} for lr in (1e-5, 3e-5) for s in (1, 2, 3)]


def test_sampled_axes_are_drawn_again_the_same_from_the_seed():
    axes, _ = split_args(
        ["sweep.train.learning_rate=loguniform(1e-5,1e-3)", "sweep.train.warmup_ratio=[0,0.1]"]
    )
    a, b, c = points(axes, 3, seed=7), points(axes, 3, seed=7), points(axes, 3, seed=8)
    assert a == b and a != c and len(a) == 6
    lrs = [p["train.learning_rate"] for p in a]
    assert all(1e-5 <= lr <= 1e-3 for lr in lrs) and len(set(lrs)) == 6
    assert [p["train.warmup_ratio"] for p in a] == [0, 0.1] * 3


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("sweep.train.learning_rate=1e-5", "expected a list"),
        ("sweep.train.learning_rate=[]", "empty"),
        ("sweep.train.learning_rate=normal(0,1)", "unknown distribution 'normal'"),
        ("sweep.train.learning_rate=loguniform(1e-3,1e-5)", "low < high"),
        ("sweep.train.learning_rate=loguniform(0,1)", "positive lower bound"),
        ("sweep.=[1]", "expected sweep.dotted.key"),
    ],
)
def test_bad_axes_name_the_item(item, fragment):
    with pytest.raises(ConfigError) as e:
        split_args([item])
    assert item in str(e.value) and fragment in str(e.value)


def test_a_bad_key_or_value_in_the_space_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="train.learning_rat"):
        plan(None, [f"run.storage={tmp_path}", "sweep.train.learning_rat=[1e-5]"], 1, None)
    with pytest.raises(ConfigError, match="model.stride"):
        plan(None, [f"run.storage={tmp_path}", "sweep.model.stride=[-1]"], 1, None)


def test_trials_are_runs_under_the_sweep(tmp_path):
    base, _, trials = plan(
        None, [f"run.storage={tmp_path}", "run.name=lr", "sweep.train.learning_rate=[1e-5,3e-5]"], 1, None
    )
    assert [t.name for t in trials] == ["trial-000", "trial-001"]
    assert [t.config.train.learning_rate for t in trials] == [1e-5, 3e-5]
    assert {t.config.run.storage for t in trials} == {f"{tmp_path}/lr"}
    assert {t.config.data.prepared for t in trials} == {f"{tmp_path}/prepared-data"}  # shared with plain runs


def test_table_names_the_best_finished_trial():
    rows = [
        {
            "trial": "trial-000",
            "overrides": ["a=1"],
            "status": "finished",
            "validation_f1": 0.5,
            "test_f1": 0.4,
            "train_runtime_seconds": 3.0,
            "global_steps": 4,
            "run": "r/trial-000",
        },
        {
            "trial": "trial-001",
            "overrides": ["a=2"],
            "status": "stopped",
            "validation_f1": 0.9,
            "test_f1": None,
            "train_runtime_seconds": None,
            "global_steps": None,
            "run": "r/trial-001",
        },
        {
            "trial": "trial-002",
            "overrides": ["a=3"],
            "status": "finished",
            "validation_f1": 0.7,
            "test_f1": 0.6,
            "train_runtime_seconds": 3.0,
            "global_steps": 4,
            "run": "r/trial-002",
        },
    ]
    text = table(
        {
            "sweep": "r",
            "axes": ["a in [1, 2, 3]"],
            "best": "trial-002",
            "best_run": "r/trial-002",
            "trials": rows,
        }
    )
    lines = [ln for ln in text.splitlines() if ln.startswith("| trial-")]
    assert [ln.split(" | ")[0] for ln in lines] == ["| trial-001", "| trial-002", "| trial-000"]  # by F1
    assert text.rstrip().endswith("best: trial-002 (validation F1 0.7000): r/trial-002")


def test_parse_axis_reads_numbers_written_without_a_dot():
    assert parse_axis("train.learning_rate", "[1e-5, 2E-4, 3]", "x").values == (1e-5, 2e-4, 3)


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with 2 CPUs on free loopback ports, authentication off."""
    with RayCluster() as cluster:
        cluster.start_head(num_cpus=2)
        yield cluster.env


def sweep(env: dict[str, str], storage: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "trainer" / "main.py"),
            "sweep",
            f"run.storage={storage}",
            "data.max_train_samples=96",
            "data.max_eval_samples=48",
            "train.batch_tokens=512",
            *(args or ("run.name=lr", "train.max_steps=6", "sweep.train.learning_rate=[3e-5,1e-3,1e-1]")),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.distributed
@pytest.mark.slow
def test_sweep_runs_each_point_on_ray_then_finds_them_finished(ray_head, tmp_path):
    storage = tmp_path / "runs"
    r = sweep(ray_head, storage)
    assert r.returncode == 0, r.stderr[-6000:]
    sweep_dir = storage / "lr"
    f1 = {}
    for i, lr in enumerate([3e-5, 1e-3, 1e-1]):
        run = sweep_dir / f"trial-{i:03d}"
        results = json.loads((run / "results.json").read_text())
        assert results["provenance"]["config"]["train"]["learning_rate"] == lr
        assert results["global_steps"] == 6 and (run / "model" / "README.md").is_file()
        f1[f"trial-{i:03d}"] = results["validation"]["f1"]
    assert "_trial_main" in r.stderr  # the trials ran as Ray Tune trials, their log lines forwarded
    record = json.loads((sweep_dir / "sweep.json").read_text())
    best = max(f1, key=lambda k: f1[k])
    assert record["best"] == best and [t["status"] for t in record["trials"]] == ["finished"] * 3
    assert {t["trial"]: t["validation_f1"] for t in record["trials"]} == f1
    assert (sweep_dir / "sweep.md").read_text() == r.stdout
    assert f"best: {best} (validation F1 {f1[best]:.4f})" in r.stdout and r.stdout.count("| trial-") == 3

    # The same command again: the finished trials are read, not trained again.
    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trial-*/metrics.jsonl")}
    again = sweep(ray_head, storage)
    assert again.returncode == 0, again.stderr[-6000:]
    assert again.stderr.count("finished earlier") == 3 and "_trial_main" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again.stdout == r.stdout


@pytest.mark.distributed
@pytest.mark.slow
def test_early_stop_stops_the_trial_behind_and_a_rerun_keeps_it_stopped(ray_head, tmp_path):
    # One trial at a time, in order: at its first evaluation (step 2) trial-001 (lr 3e-3 knocks the
    # tiny model's F1 to 0) is below trial-000's (lr 1e-9: the initial model's F1, 0.05), so ASHA
    # stops it at its first rung; trial-000 runs on to step 8.
    args = [
        "--early-stop",
        "--max-concurrent",
        "1",
        "run.name=asha",
        "train.max_steps=8",
        "train.eval_every=2",
    ]
    r = sweep(ray_head, tmp_path, *args, "sweep.train.learning_rate=[1e-9,3e-3]")
    assert r.returncode == 0, r.stderr[-6000:]
    record = json.loads((tmp_path / "asha" / "sweep.json").read_text())
    rows = {t["trial"]: t for t in record["trials"]}
    assert rows["trial-000"]["status"] == "finished" and rows["trial-000"]["global_steps"] == 8
    assert rows["trial-001"]["status"] == "stopped" and rows["trial-001"]["global_steps"] == 2
    assert rows["trial-001"]["validation_f1"] < rows["trial-000"]["validation_f1"]
    assert record["best"] == "trial-000"
    assert not (tmp_path / "asha" / "trial-001" / "results.json").exists()
    again = sweep(ray_head, tmp_path, *args, "sweep.train.learning_rate=[1e-9,3e-3]")
    assert again.returncode == 0 and "_trial_main" not in again.stderr, again.stderr[-6000:]
    assert json.loads((tmp_path / "asha" / "sweep.json").read_text()) == record
