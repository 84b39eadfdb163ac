#!/usr/bin/env python3
"""Dense against sparse word-embedding updates: step time, optimizer step time, dev F1.

Two parts, each mode in its own subprocess:

  step    one worker's engine (build_engine, ZeRO-0, the run's precision) on the offline encoder,
          fed real CoNLL-2003 sentences in batches of the sizes raytag's `batch_tokens: auto`
          uses (4 sentences on small data, 14 on all of CoNLL-2003 for one epoch, ~42 for three):
          the mean time of a whole step
          (forward, backward, optimizer) and of the optimizer step (`engine.step()`) alone;
  train   one epoch of raytag on the first N sentences (trainer/main.py with
          train.embedding_updates=dense or sparse, everything else the config's defaults):
          training seconds and dev F1.

Dense: the embedding gradient is a table-sized tensor (XLM-R: 250,002 rows) allocated, zeroed
and scattered into every step, and AdamW reads and writes every row. Sparse: the gradient holds
the touched rows and AdamW updates those, each row catching up on the momentum steps it missed
(trainer/sparse_adam.py, RowSparseAdamW).

Needs ../shared (CoNLL data, the encoder tool) and the `bench` extra.

    python bench/embeddings.py                      # steps, then one epoch on 3000 sentences
    python bench/embeddings.py --train-samples 1000 --skip-train
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (bench/quality.py: the encoder, CoNLL reading, raytag runs)

MODES = ("dense", "sparse")


def step_worker(mode: str, precision: str, batch: int, steps: int) -> dict:
    import torch

    from raytag.trainer.engine import EngineSpec, build_engine, end_local_process_group, resolve_precision
    from raytag.trainer.model import load_model, load_tokenizer
    from raytag.trainer.sparse_adam import catch_up_rows

    tok = load_tokenizer(str(quality.ENCODER))
    sentences = quality.read_conll(quality.CONLL / "train.txt", limit=batch * (steps + 2))
    labels = sorted({t for _, tags in sentences for t in tags})
    model = load_model(str(quality.ENCODER), labels, tok, seed=0, attention="eager")
    prec = resolve_precision(precision, False)
    spec = EngineSpec(
        2e-4, 0.01, (0.9, 0.999), 1e-8, 1000, 10, 0, prec, 1, 1.0, 1, {}, sparse_embeddings=mode == "sparse"
    )
    engine = build_engine(model, spec)
    label_id = {t: i for i, t in enumerate(labels)}
    step_s, opt_s = [], []
    for i in range(steps + 1):
        chunk = sentences[i * batch : (i + 1) * batch]
        enc = tok([w for w, _ in chunk], is_split_into_words=True, padding=True, return_tensors="pt")
        y = torch.full_like(enc["input_ids"], -100)
        for r, (_, tags) in enumerate(chunk):
            seen = set()
            for j, wid in enumerate(enc.word_ids(r)):
                if wid is not None and wid not in seen:
                    seen.add(wid)
                    y[r, j] = label_id[tags[wid]]
        t0 = time.perf_counter()
        out = engine(**enc, labels=y)
        engine.backward(out.loss, scale_wrt_gas=False)
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        if i:  # the first step warms up kernels and allocators
            step_s.append(t2 - t0)
            opt_s.append(t2 - t1)
    t0 = time.perf_counter()
    catch_up_rows(engine)  # before an evaluation: every row brought up to the current step (sparse)
    catch_up_s = time.perf_counter() - t0
    end_local_process_group()
    return {
        "precision": prec,
        "step_s": statistics.mean(step_s),
        "optimizer_s": statistics.mean(opt_s),
        "catch_up_s": catch_up_s,
        "steps": steps,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per batch size and mode")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 14, 42], help="sentences per step")
    ap.add_argument(
        "--precision", default="auto", help="train.precision for the step part (auto, fp32, bf16)"
    )
    ap.add_argument("--train-samples", type=int, default=3000, help="sentences for the training part")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-train", action="store_true", help="only the step timings")
    ap.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        mode, precision, batch, steps = args._worker
        print(json.dumps(step_worker(mode, precision, int(batch), int(steps))))
        return 0
    if not quality.SHARED.is_dir():
        print(f"embeddings.py: {quality.SHARED} is absent: this benchmark needs ../shared", file=sys.stderr)
        return 2
    quality.ensure_encoder()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = quality.child_env(cpus)
    print(f"model {quality.ENCODER.relative_to(quality.REPO)}; {cpus} CPUs; precision {args.precision}")
    report: dict = {"steps": [], "train": []}
    print(
        f"\n{'sentences':>9} {'mode':>6} {'step s':>8} {'optimizer s':>11} {'vs dense':>9} {'catch-up s':>10}"
    )
    for batch in args.batches:
        base = None
        for mode in MODES:
            r = subprocess.run(
                [sys.executable, __file__, "--_worker", mode, args.precision, str(batch), str(args.steps)],
                capture_output=True,
                text=True,
                env=env,
                cwd=quality.REPO,
            )
            if r.returncode != 0:
                print(f"{mode} at {batch} sentences failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                return 2
            t = json.loads(r.stdout.strip().splitlines()[-1])
            base = t["step_s"] if base is None else base
            print(
                f"{batch:>9} {mode:>6} {t['step_s']:>8.3f} {t['optimizer_s']:>11.3f} {t['step_s'] / base:>8.2f}x"
                f" {t['catch_up_s']:>10.3f}"
            )
            report["steps"].append({"sentences": batch, "mode": mode, **t})
    if not args.skip_train:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        print(f"\none epoch on the first {args.train_samples} sentences, lr {args.lr:g}:")
        print(f"{'seed':>4} {'mode':>6} {'dev F1':>7} {'train s':>8} {'steps':>6}")
        for seed, mode in ((seed, mode) for seed in args.seeds for mode in MODES):
            ns = Namespace(
                eval_samples=None,
                lr=args.lr,
                threads=cpus,
                raytag_set=[f"train.embedding_updates={mode}"],
            )
            res = quality.run_raytag(ns, args.train_samples, seed, f"{stamp}-{mode}", None)
            if "error" in res:
                print(f"{mode}: raytag failed ({res['error']}), log {res['log']}", file=sys.stderr)
                return 2
            f1 = res["validation"]["f1"]
            print(
                f"{seed:>4} {mode:>6} {f1:>7.4f} {res['train_runtime_seconds']:>8.1f} {res['train_steps']:>6}"
            )
            report["train"].append({"seed": seed, "mode": mode, **res})
        for mode in MODES:
            runs = [r for r in report["train"] if r["mode"] == mode]
            f1 = statistics.mean(r["validation"]["f1"] for r in runs)
            secs = statistics.mean(r["train_runtime_seconds"] for r in runs)
            print(f"mean {mode:>6} {f1:>7.4f} {secs:>8.1f}")
    out = quality.OUT / f"embeddings-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out.relative_to(quality.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
