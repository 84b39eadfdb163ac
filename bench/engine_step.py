#!/usr/bin/env python3
"""One optimizer step under DeepSpeed, by ZeRO stage, on one worker: forward, backward, step times.

Backs the loop's choice to run ZeRO-0 when there is a single worker (ZeRO-1/2 partition across
data-parallel ranks; with one rank they only add flat-buffer copies). Each stage runs in its
own subprocess (one process group each), with the same model, batch and seed.

    python bench/engine_step.py                        # the offline encoder from bench/out/encoder
    python bench/engine_step.py --model builtin:tiny-xlmr --stages 0 1 2 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(model_name: str, stage: int, steps: int, batch: int, length: int) -> dict:
    import torch

    from raytag.trainer.engine import EngineSpec, build_engine, end_local_process_group
    from raytag.trainer.model import load_model, load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(model_name)
    labels = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    model = load_model(model_name, labels, tok, seed=0)
    spec = EngineSpec(2e-4, 0.01, (0.9, 0.999), 1e-8, steps + 1, 1, stage, "fp32", 1, 1.0, 1, {})
    engine = build_engine(model, spec)
    vocab = min(len(tok), 30000)
    x = torch.randint(5, vocab, (batch, length))
    y = torch.randint(0, len(labels), (batch, length))
    times: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = engine(input_ids=x, labels=y)
        t1 = time.perf_counter()
        engine.backward(out.loss, scale_wrt_gas=False)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        if i:  # the first step warms up allocators and kernels
            times["forward"].append(t1 - t0)
            times["backward"].append(t2 - t1)
            times["step"].append(t3 - t2)
    end_local_process_group()
    return {k: statistics.mean(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "bench" / "out" / "encoder"))
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16, help="sentences per batch")
    ap.add_argument("--length", type=int, default=23, help="tokens per sentence (CoNLL-2003 mean: 23)")
    ap.add_argument("--_worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker is not None:
        print(json.dumps(worker(args.model, args._worker, args.steps, args.batch, args.length)))
        return 0
    if not args.model.startswith("builtin:") and not Path(args.model).exists():
        print(
            f"bench/engine_step.py: {args.model} not found: run bench/quality.py once to build the offline "
            "encoder, or pass --model builtin:tiny-xlmr",
            file=sys.stderr,
        )
        return 2
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    print(
        f"model {args.model}; batch {args.batch} x {args.length} tokens; {args.steps} timed steps; "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'ZeRO':>5} {'forward s':>10} {'backward s':>11} {'step s':>8} {'total s':>8} {'vs ZeRO-0':>10}")
    base = None
    for stage in args.stages:
        r = subprocess.run(
            [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--length",
                str(args.length),
                "--_worker",
                str(stage),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if r.returncode != 0:
            print(f"ZeRO-{stage} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        t = json.loads(r.stdout.strip().splitlines()[-1])
        total = t["forward"] + t["backward"] + t["step"]
        base = total if stage == 0 or base is None else base
        print(
            f"{stage:>5} {t['forward']:>10.3f} {t['backward']:>11.3f} {t['step']:>8.3f} {total:>8.3f} "
            f"{total / base:>9.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
