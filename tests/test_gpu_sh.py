"""bench/gpu.sh, rehearsed on the CPU: the tiny run completes and prints its figures.

On a machine without a GPU the script says that it skips the wheel install and the gpu tests,
then trains the demo's tiny model for a few steps in bf16 at ZeRO-0 and ZeRO-2, and the Hugging
Face Trainer recipe on the same data, and prints the same figure lines as on a GPU (peak GPU
memory: n/a; MFU against the CPU's measured matmul peak). The full-size run refuses to start without a GPU, and a
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

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

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
    for stage in ("ZeRO-0", "ZeRO-2"):
        tokens_per_s = float(_figure(out, f"{stage}: train tokens/s"))
        train_s = float(_figure(out, f"{stage}: train seconds"))
        wall_s = float(
            _figure(out, f"{stage}: wall seconds (set-up, training, evaluation, checkpoint, export)")
        )
        peak = _figure(out, f"{stage}: peak GPU memory")
        mfu = _figure(out, f"{stage}: train MFU")
        assert tokens_per_s > 0 and 0 < train_s < wall_s
        assert re.match(r"[\d.]+% \(peak [\d.e+]+ FLOP/s: ", mfu), mfu
        if torch.cuda.is_available():
            assert re.fullmatch(r"[\d.]+ GiB allocated, [\d.]+ GiB reserved", peak), peak
        else:
            assert peak == "n/a (no GPU)"
            assert "matmul measured at start" in mfu, mfu
        summary = json.loads(
            (tmp_path / "out" / f"gpu-summary-{stage.lower().replace('-', '')}.json").read_text()
        )
        assert summary["precision"] == "bf16" and summary["workers"] == 1
        assert summary["model"] == "builtin:tiny-xlmr"
        assert summary["global_steps"] == 4 and 0 < summary["train_mfu"] < 1
        assert summary["train_tokens_per_second"] == pytest.approx(tokens_per_s, rel=1e-3, abs=1)
    results = {z: json.loads((tmp_path / "out" / f"results-zero{z}.json").read_text()) for z in (0, 2)}
    assert results[0]["global_steps"] == 4 and results[2]["global_steps"] == 4
    assert results[0]["provenance"]["config"]["train"]["precision"] == "bf16"
    assert results[2]["provenance"]["config"]["train"]["deepspeed"] == {"zero_optimization": {"stage": 2}}
    assert (tmp_path / "out" / "metrics-zero0.jsonl").is_file() and (
        tmp_path / "out" / "run-zero2.log"
    ).is_file()
    # The Hugging Face Trainer recipe on the same device, and raytag's speed over its.
    assert float(_figure(out, "HF Trainer: train tokens/s")) > 0
    assert 0 <= float(_figure(out, "HF Trainer: validation F1")) <= 1
    assert float(_figure(out, "raytag/HF Trainer train tokens/s")) > 0
    assert json.loads((tmp_path / "out" / "hf-summary.json").read_text())["train_steps"] == 4
    assert re.search(
        r"^gpu\.sh: done: gpu tests skipped, runs finished, HF Trainer finished", out, re.MULTILINE
    ), out
    # The runs' folders (checkpoints, model) stay out of the figures' folder.
    assert (tmp_path / "runs" / "runs" / "gpu-sh-tiny-zero0" / "model" / "model.safetensors").is_file()
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
