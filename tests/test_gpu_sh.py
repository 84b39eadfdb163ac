"""bench/gpu.sh, rehearsed on the CPU: the tiny run completes and prints its figures.

On a machine without a GPU the script says that it skips the wheel install and the gpu tests,
then trains the demo's tiny model for a few steps in bf16 and prints the same figure lines
as on a GPU (peak GPU memory: n/a). The full-size run refuses to start without a GPU, and a
missing wheel folder is named with the script that fills it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.sh"


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAYTAG_GPU_SH_")}
    base.update(
        RAYTAG_GPU_SH_PYTHON=sys.executable,
        RAYTAG_GPU_SH_OUT=str(tmp_path / "out"),
        RAYTAG_GPU_SH_RUNS=str(tmp_path / "runs"),
        RAYTAG_GPU_SH_SKIP_TESTS="1",  # on a GPU machine: no pytest inside pytest
    )
    base.update(env)
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=base, capture_output=True, text=True, timeout=600
    )


def _figure(stdout: str, label: str) -> str:
    match = re.search(rf"^gpu\.sh: {re.escape(label)}: (.+)$", stdout, re.MULTILINE)
    assert match, f"no 'gpu.sh: {label}:' line in:\n{stdout}"
    return match.group(1)


def test_tiny_run_completes_and_prints_its_figures(tmp_path):
    proc = _run(tmp_path, RAYTAG_GPU_SH_TINY="1")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    if not torch.cuda.is_available():
        assert (
            "gpu.sh: no GPU (torch.cuda.is_available() is false): skipping the wheel install and the gpu tests"
            in out
        )
    assert "gpu.sh: step 2: gpu tests skipped" in out
    tokens_per_s = float(_figure(out, "train tokens/s"))
    train_s = float(_figure(out, "train seconds"))
    wall_s = float(_figure(out, "wall seconds (set-up, training, evaluation, checkpoint, export)"))
    peak = _figure(out, "peak GPU memory")
    assert tokens_per_s > 0 and 0 < train_s < wall_s
    if torch.cuda.is_available():
        assert re.fullmatch(r"[\d.]+ GiB allocated, [\d.]+ GiB reserved", peak), peak
    else:
        assert peak == "n/a (no GPU)"
    assert re.search(r"^gpu\.sh: done: gpu tests skipped, run finished", out, re.MULTILINE), out

    summary = json.loads((tmp_path / "out" / "gpu-summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["workers"] == 1
    assert summary["model"] == "builtin:tiny-xlmr"
    assert summary["global_steps"] == 4
    assert summary["train_tokens_per_second"] == pytest.approx(tokens_per_s, rel=1e-3, abs=1)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["global_steps"] == 4
    assert results["provenance"]["config"]["train"]["precision"] == "bf16"
    assert (tmp_path / "out" / "metrics.jsonl").is_file() and (tmp_path / "out" / "run.log").is_file()
    # The run's folder (checkpoints, model) stays out of the figures' folder.
    assert (tmp_path / "runs" / "runs" / "gpu-sh-tiny" / "model" / "model.safetensors").is_file()
    assert not list((tmp_path / "out").rglob("*.safetensors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_full_run_refuses_without_a_gpu(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu.sh: error: no GPU: an epoch of xlm-roberta-base on the CPU takes hours" in proc.stderr


def test_missing_wheels_name_the_script_that_fills_them(tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    proc = _run(
        tmp_path, RAYTAG_GPU_SH_TINY="1", RAYTAG_GPU_SH_WHEELS="always", RAYTAG_GPU_SH_WHEEL_DIR=str(empty)
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{empty} holds no wheels" in proc.stderr and "bash bench/gpu_wheels.sh" in proc.stderr
