"""The Hugging Face Trainer recipe on the same data, model and device as bench/gpu.sh's raytag runs.

    python bench/gpu_hf.py --summary OUT.json --model builtin:xlmr-base-random:TOKENIZER \\
        --data DIR --epochs 3 [--max-steps N] [--bf16]

The model is built as raytag builds it (the same architecture and initialisation seed) and
saved to a folder, then bench/quality.py's `hf_worker` runs run_ner.py's recipe on it: batch 8
(TrainingArguments' default), lr 5e-5 (the config's), linear decay after a 10% warm-up, bf16
autocast with --bf16, followed by an evaluation on the validation file. Its figures are printed
as `gpu.sh: HF Trainer: ...` lines and written to --summary. Needs `accelerate` (the Trainer's)
besides raytag's own dependencies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
HF_BATCH = 8  # TrainingArguments' per_device_train_batch_size default, run_ner's


def _say(text: str) -> None:
    print(f"gpu.sh: HF Trainer: {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", required=True, type=Path)
    ap.add_argument("--model", required=True, help="a raytag model name (builtin:...) or folder")
    ap.add_argument("--data", required=True, type=Path, help="a folder with train.txt and validation.txt")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args(argv)

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    from raytag.trainer.model import load_model, load_tokenizer

    labels = sorted({t for _, tags in quality.read_conll(args.data / "train.txt") for t in tags})
    with tempfile.TemporaryDirectory(prefix="raytag-gpu-hf-") as tmp:
        folder = Path(tmp) / "model"
        tokenizer = load_tokenizer(args.model)
        load_model(args.model, labels, tokenizer, seed=42).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        spec = {
            "seed": 42,
            "threads": torch.get_num_threads(),
            "model": str(folder),
            "train_file": str(args.data / "train.txt"),
            "validation_file": str(args.data / "validation.txt"),
            "train_samples": None,
            "eval_samples": None,
            "lr": args.lr,
            "hf_batch": HF_BATCH,
            "epochs": args.epochs,
            "max_steps": args.max_steps,
            "bf16": args.bf16,
            "output_dir": str(Path(tmp) / "out"),
        }
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.monotonic()
        result = quality.hf_worker(spec)
        wall = time.monotonic() - started
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    summary = {
        "model": args.model,
        "bf16": args.bf16,
        "batch": HF_BATCH,
        "epochs": args.epochs,
        "train_tokens_per_second": result["train_tokens_per_second"],
        "train_runtime_seconds": result["train_runtime_seconds"],
        "train_steps": result["train_steps"],
        "validation_f1": result["validation"]["f1"],
        "eval_seconds": result["eval_seconds"],
        "wall_seconds": wall,
        "peak_gpu_memory_allocated_bytes": peak,
    }
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _say(f"batch {HF_BATCH}, {'bf16' if args.bf16 else 'fp32'}, {summary['train_steps']} steps")
    _say(f"train tokens/s: {summary['train_tokens_per_second']:.0f}")
    _say(f"train seconds: {summary['train_runtime_seconds']:.1f}")
    _say(f"wall seconds (model set-up, data, training, evaluation): {wall:.1f}")
    _say(f"peak GPU memory: {'n/a (no GPU)' if peak is None else f'{peak / GIB:.2f} GiB allocated'}")
    _say(f"validation F1: {summary['validation_f1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
