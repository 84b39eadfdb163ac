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
from typing import TYPE_CHECKING, Any

from .scoring import write_conlleval_file

if TYPE_CHECKING:
    from .tracking import MlflowLog

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
    """metrics.jsonl: one JSON object per logged step and per evaluation, appended as they happen,
    and the same records as TensorBoard scalars under tensorboard/ when `tensorboard` is set, and
    as MLflow metrics when given an `mlflow` log (trainer/tracking.py), which also gets the run's
    final results and files (`results`).

    `files()` names what changed for the run's storage to mirror after each write.
    """

    def __init__(
        self, path: Path, resume_step: int | None, tensorboard: bool = False, mlflow: MlflowLog | None = None
    ):
        self.path = path
        self.tensorboard = TensorBoardLog(path.parent / "tensorboard", resume_step) if tensorboard else None
        self.mlflow = mlflow
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
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        if self.mlflow is not None:
            self.mlflow.write(record)

    def results(self, results: dict[str, Any], step: int, files: dict[str, Path]) -> None:
        """The run's final `results` (results.json's) at `step`, and `files` (artifact path -> file)."""
        if self.mlflow is not None:
            self.mlflow.results(results, step, files)

    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run these metrics go to, once the tracking server has opened it."""
        return self.mlflow.run_id if self.mlflow is not None else None

    def files(self) -> list[str]:
        """The files `write` changes, relative to the run folder."""
        out = [self.path.name]
        if self.tensorboard is not None and self.tensorboard.file is not None:
            out.append(f"tensorboard/{self.tensorboard.file.name}")
        return out

    def close(self, success: bool = True) -> None:
        """Flush and close the sinks; `success`: the run finished (MLflow records how it ended)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.close(success)


TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu", "epoch")
EVAL_KEYS = ("f1", "precision", "recall", "accuracy", "loss")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as named numbers, tagged as the Hugging Face Trainer tags them:
    `train/loss`, `train/learning_rate`, `train/grad_norm`, `train/tokens_per_second`, `train/mfu`,
    `train/epoch`; each evaluation set under its own name (`validation/f1`, `validation/loss`, ...,
    `validation/PER/f1`). Only finite numbers; other records (`resize`) give none."""
    named: dict[str, Any] = {}
    if record.get("type") == "train":
        named = {f"train/{k}": record.get(k) for k in TRAIN_KEYS}
    elif record.get("type") == "eval":
        split = record["split"]
        named = {f"{split}/{k}": record.get(k) for k in EVAL_KEYS}
        for entity_type, m in sorted((record.get("per_type") or {}).items()):
            named.update({f"{split}/{entity_type}/{k}": m.get(k) for k in ("f1", "precision", "recall")})
    return {
        tag: float(v)
        for tag, v in named.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class TensorBoardLog:
    """tensorboard/: the records of metrics.jsonl as TensorBoard scalars (`scalars`' tags), one point
    per logged step. A resumed run's writer starts with a purge at the step after its checkpoint,
    so TensorBoard drops the points the earlier attempt logged past it (they are redone), as
    metrics.jsonl does.
    """

    def __init__(self, logdir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        logdir.mkdir(parents=True, exist_ok=True)
        before = set(logdir.iterdir())
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(logdir), purge_step=purge, flush_secs=3600)
        self.writer.flush()  # creates the event file now, so its name is known
        made = sorted(set(logdir.iterdir()) - before)
        self.file = made[-1] if made else None

    def write(self, record: dict[str, Any]) -> None:
        step, walltime = int(record["step"]), record.get("time")
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step, walltime=walltime)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def write_predictions(path: Path, words, gold, pred) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_conlleval_file(path, words, gold, pred)


def export_model(
    model,
    state_dict,
    tokenizer,
    out: Path,
    extra: dict[str, Any],
    card: str,
    files: dict[str, bytes] | None = None,
) -> None:
    """Hugging Face folder: config (with label names), weights, tokenizer, raytag.json, README.md,
    and `files` (name -> bytes: the card's plots)."""
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
    for name, data in (files or {}).items():
        (tmp / name).write_bytes(data)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
