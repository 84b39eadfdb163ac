"""Ray Train end to end: `ray start --head`, `ray job submit -- python trainer/main.py`, 2 CPU workers.

One Ray run serves two checks (Ray fits cost 20-30 s each here): the submitted job's outputs,
and data-parallel equivalence against an in-process run with 1 worker and 2 accumulation
steps fed the same global batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import RAY_SMALL, ROOT, assert_matches_one_worker, submit_job, train_losses, wait_job
from tests.ray_cluster import RayCluster

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = RAY_SMALL


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head (2 CPUs) on free loopback ports, authentication off; stops only the processes it started."""
    with RayCluster() as cluster:
        cluster.start_head(num_cpus=2)
        yield cluster.dashboard_url, cluster.env


def _losses(run_dir: Path) -> dict[int, float]:
    return train_losses((run_dir / "metrics.jsonl").read_text().splitlines())


def test_ray_job_submit_two_workers(ray_head, tmp_path):
    address, env = ray_head
    storage = tmp_path / "runs"
    job_id = submit_job(
        address, env, "scaling.num_workers=2", f"run.storage={storage}", "run.name=job", *COMMON
    )
    status, logs = wait_job(address, job_id)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "2 worker(s)" in logs

    run_dir = storage / "job"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_steps"] == 6
    for split in ("validation", "test"):
        assert {"f1", "precision", "recall", "accuracy", "per_type"} <= set(results[split])
    assert sorted(_losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    # Checkpoints: complete (manifest) and holding both ranks' DeepSpeed shards and RNG states.
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000006"] or "step-00000006" in [c.name for c in ckpts]
    last = run_dir / "checkpoints" / "step-00000006"
    manifest = json.loads((last / "MANIFEST.json").read_text())
    names = {f["path"] for f in manifest["files"]}
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= names
    assert any("zero_pp_rank_1_" in n for n in names) and any("zero_pp_rank_0_" in n for n in names)
    card = (run_dir / "model" / "README.md").read_text()
    assert "More information needed" not in card and "| workers | 2 |" in card
    assert (run_dir / "ray").is_dir()  # Ray's own run state sits beside raytag's outputs

    # Data-parallel equivalence: 1 worker with 2 accumulation steps sees the same global batches.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert_matches_one_worker(lines, results, COMMON, tmp_path / "single")


def test_prepare_spreads_files_over_ray_tasks(ray_head, tmp_path):
    """`trainer/main.py prepare --executor ray` against the cluster: each file's validation and
    tokenisation run as Ray tasks; a bad line in one of the files is one error naming file and line."""
    import subprocess
    import sys

    _, env = ray_head  # RAY_ADDRESS: the head's GCS
    text = (ROOT / "trainer/assets/demo/train.txt").read_text(encoding="utf-8")
    blocks = [b for b in text.split("\n\n") if b.strip() and not b.startswith("-DOCSTART-")][:120]
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"part-{i}.conll").write_text(
            "\n\n".join(blocks[i * 40 : (i + 1) * 40]) + "\n", encoding="utf-8"
        )
    cmd = [sys.executable, str(ROOT / "trainer" / "main.py"), "prepare", "--executor", "ray"]
    keys = [f"data.train={data}", f"run.storage={tmp_path / 'runs'}"]
    r = subprocess.run([*cmd, *keys], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    where = Path(r.stdout.strip().splitlines()[-1])
    manifest = json.loads((where / "MANIFEST.json").read_text())
    assert manifest["executor"] == "ray" and manifest["sentences"] == 120
    assert [Path(f["uri"]).name for f in manifest["corpora"]["train"]["files"]] == [
        "part-0.conll",
        "part-1.conll",
        "part-2.conll",
    ]
    bad = data / "part-1.conll"
    lines = bad.read_text().splitlines()
    lines[2] = lines[2].split(" ")[0]  # one column: no tag
    bad.write_text("\n".join(lines) + "\n")
    r = subprocess.run([*cmd, *keys], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("raytag: error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-4000:]
    assert f"{bad}:3: expected at least 2 columns" in errors[0], errors[0]
