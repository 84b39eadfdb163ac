"""Run outputs written by rank 0: metrics.jsonl, results.json, predictions, the exported model.

Files are written into the run's local folder; the storage layer (raytag.cluster) mirrors them
to the run's storage (a no-op when that folder already is the storage).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from .scoring import write_conlleval_file

PACKAGES = (
    "raytag",
    "torch",
    "transformers",
    "tokenizers",
    "deepspeed",
    "ray",
    "datasets",
    "boto3",
    "pyarrow",
)


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    """The checkout's commit (with '-dirty' when it has uncommitted changes), if raytag runs from one."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: write null for them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step and per evaluation, appended as they happen."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            # A resumed run keeps what was logged up to its checkpoint and drops what came after
            # (that work is redone), so each step appears once.
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")


def write_predictions(path: Path, words, gold, pred) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_conlleval_file(path, words, gold, pred)


def export_model(model, state_dict, tokenizer, out: Path, extra: dict[str, Any], card: str) -> None:
    """Hugging Face folder: config (with label names), weights, tokenizer, raytag.json, README.md."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would clutter the run's log
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "raytag.json", extra)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
