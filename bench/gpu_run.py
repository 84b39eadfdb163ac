"""One local training run (one worker, in this process), then its figures: tokens/s, peak GPU memory, wall time.

    python bench/gpu_run.py --summary OUT.json --config configs/xlmr-base-conll2003.yaml -- key=value ...

bench/gpu.sh calls it. The run goes through raytag's command line (`trainer/main.py`'s `main`)
in this process, so that torch's peak-memory counters cover the whole run: model set-up,
training, evaluation, checkpoint and export. Training figures come from the run's
results.json (`train_tokens_per_second`: real, non-pad tokens over the time spent in training
steps; `train_runtime_seconds`); the wall time counts everything from the start of the run to
its end. Every figure is printed as a `gpu.sh: ...` line and written to `--summary` as JSON.
Exit status: the run's (0, or 2 for a user error), 1 when the run left no results.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "deepspeed", "transformers", "tokenizers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _device() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "cuda": None}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "cuda": torch.version.cuda,
        "compute_capability": f"{props.major}.{props.minor}",
        "gpu_memory_bytes": props.total_memory,
    }


def _peak_memory() -> dict[str, int | None]:
    import torch

    if not torch.cuda.is_available():
        return {"peak_gpu_memory_allocated_bytes": None, "peak_gpu_memory_reserved_bytes": None}
    return {
        "peak_gpu_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_gpu_memory_reserved_bytes": torch.cuda.max_memory_reserved(),
    }


LABEL = ""  # --label: a prefix for every figure line ("ZeRO-0: train tokens/s: ...")


def _say(text: str) -> None:
    print(f"gpu.sh: {LABEL}{text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="raytag config file")
    p.add_argument("--summary", required=True, type=Path, help="where to write the figures as JSON")
    p.add_argument("--label", default="", help="a prefix for the figure lines, e.g. ZeRO-0")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="raytag config overrides")
    args = p.parse_args(argv)
    global LABEL
    LABEL = f"{args.label}: " if args.label else ""

    try:
        import raytag.trainer  # noqa: F401  (installed, or bench/gpu.sh's link farm)
    except ImportError:  # a bare checkout: trainer/main.py maps its folders onto `raytag`
        import importlib.util

        spec = importlib.util.spec_from_file_location("raytag_checkout_main", ROOT / "trainer" / "main.py")
        assert spec is not None and spec.loader is not None
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    from raytag.launcher.cli import main as raytag_main
    from raytag.trainer.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad key fails here, before any figure
    run_dir = Path(cfg.run.storage) / cfg.run.name

    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    status = raytag_main(["--config", args.config, *args.overrides])
    wall = time.monotonic() - started
    if status != 0:
        _say(f"the run failed (exit status {status})")
        return status
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        _say(f"the run left no {results_file}")
        return 1
    results = json.loads(results_file.read_text(encoding="utf-8"))

    summary: dict[str, Any] = {
        **_device(),
        "versions": _versions(),
        "model": cfg.model.name_or_path,
        "precision": cfg.train.precision,
        "batch_tokens": cfg.train.batch_tokens,
        "workers": cfg.scaling.num_workers,
        "train_tokens_per_second": results["train_tokens_per_second"],
        "train_mfu": results.get("train_mfu"),
        "peak_flops_per_device": results.get("peak_flops_per_device"),
        "peak_flops_source": results.get("peak_flops_source"),
        "train_runtime_seconds": results["train_runtime_seconds"],
        "train_tokens": results["train_tokens"],
        "global_steps": results["global_steps"],
        "epochs": results["epochs"],
        "train_sentences_per_step": results["train_sentences_per_step"],
        "wall_seconds": wall,
        **_peak_memory(),
        "validation_f1": (results.get("validation") or {}).get("f1"),
        "test_f1": (results.get("test") or {}).get("f1"),
        "run_dir": str(run_dir),
        "overrides": args.overrides,
    }
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    v = summary["versions"]
    _say(
        f"{summary['device']} (CUDA {summary['cuda']}), torch {v['torch']}, deepspeed {v['deepspeed']}, "
        f"transformers {v['transformers']}"
    )
    _say(
        f"{summary['model']}, {summary['precision']}, {summary['workers']} worker in-process, "
        f"batch_tokens {summary['batch_tokens']}: {summary['global_steps']} steps, "
        f"{summary['train_tokens']} tokens, {summary['train_sentences_per_step']:.1f} sentences/step"
    )
    _say(f"train tokens/s: {summary['train_tokens_per_second']:.0f}")
    _say(f"train seconds: {summary['train_runtime_seconds']:.1f}")
    mfu = summary["train_mfu"]
    _say(
        f"train MFU: {'n/a' if mfu is None else f'{100 * mfu:.2f}%'} "
        f"(peak {summary['peak_flops_per_device'] or 'unknown'} FLOP/s: {summary['peak_flops_source']})"
    )
    _say(f"wall seconds (set-up, training, evaluation, checkpoint, export): {wall:.1f}")
    peak = summary["peak_gpu_memory_allocated_bytes"]
    if peak is None:
        _say("peak GPU memory: n/a (no GPU)")
    else:
        reserved = summary["peak_gpu_memory_reserved_bytes"]
        _say(f"peak GPU memory: {peak / GIB:.2f} GiB allocated, {reserved / GIB:.2f} GiB reserved")
    f1 = " ".join(
        f"{k} F1 {summary[k + '_f1']:.4f}" for k in ("validation", "test") if summary[k + "_f1"] is not None
    )
    _say(f"scores (random init, so only a sanity check): {f1 or 'none'}")
    _say(f"summary: {args.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
