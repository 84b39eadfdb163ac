#!/usr/bin/env python3
"""The levers of a time-budgeted run, measured: dev F1 of raytag at one `train.time_budget` on the
full CoNLL-2003 set, per variant of the recipe.

    python bench/levers.py                               # the default variants, 250.9 s, seed 1
    python bench/levers.py --budget 1003.6 --variants base onerate llrd1
    python bench/levers.py --variant "head30 train.head_lr_scale=30" --variants base
    python bench/levers.py --budget 30 --train-samples 600 --eval-samples 200 --variants base onerate

Each variant is one raytag run (`trainer/main.py --config configs/xlmr-base-conll2003.yaml`) on the
offline encoder of quality.py (built into bench/out/encoder the first time), with the learning rate
(`--lr`, 2e-4: the offline encoder's; levers are relative to it), the seed and the budget, plus the
variant's own `key=value` overrides. The default budget, 250.9 s, is a quarter of the Hugging Face
recipe's one-epoch training time measured by `quality.py --budget-of-hf` on this machine (1003.6 s,
bench/README.md); give `--budget` the quarter of your own machine's figure. The runs follow one
another in the order given (seeds alternate the order against load drift), so compare only the
figures of one invocation. It prints a line per run, then a table (variant, overrides, planned
steps and epochs, seconds used of the budget, dev F1, its difference to the first variant), and
writes the record to bench/out/levers-<stamp>.json. Exit status 0, 2 when a run failed or
../shared is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import CONLL, ENCODER, OUT, REPO, ensure_encoder, raytag_run, sample_caps, tail  # noqa: E402

# name -> overrides; `base` is the config's defaults (the head at 10x the rate, layer decay 0.9, dropout 0)
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "onerate": ["train.head_lr_scale=1", "train.layer_lr_decay=1"],  # Hugging Face's: one rate for all
    "head1": ["train.head_lr_scale=1"],
    "head30": ["train.head_lr_scale=30"],
    "llrd1": ["train.layer_lr_decay=1"],
    "llrd0.8": ["train.layer_lr_decay=0.8"],
    "warmup0.05": ["train.warmup_ratio=0.05"],
    "warmup0.2": ["train.warmup_ratio=0.2"],
    "lr3e-4": ["train.learning_rate=3e-4"],
    "batch2x": ["train.batch_tokens=684"],
    "batch0.5x": ["train.batch_tokens=171"],
    "eval0.25": ["train.eval_every=250"],
    "dropout0": ["model.dropout=0"],  # no dropout masks (bench/profile_step.py: 12% of a CPU step)
    "dropout0.1": ["model.dropout=0.1"],  # the model's own (the config sets 0)
    "sdpa": ["model.attention=sdpa"],  # torch's fused attention instead of auto's eager on CPU bf16
}
# the defaults, one rate for all, and each lever moved off the defaults (A+B joins A's and B's overrides)
DEFAULT = [
    "base",
    "onerate",
    "dropout0.1",
    "llrd1",
    "head30",
    "llrd0.8",
    "lr3e-4",
    "warmup0.05",
    "batch2x",
    "batch0.5x",
]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, *overrides = text.split()
    if not overrides or any("=" not in o for o in overrides):
        raise argparse.ArgumentTypeError(f"expected 'NAME key=value ...', got {text!r}")
    return name, overrides


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=250.9, help="train.time_budget in seconds")
    ap.add_argument(
        "--variants", nargs="+", default=None, help=f"of {', '.join(VARIANTS)} (default: {DEFAULT})"
    )
    ap.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="'NAME key=value ...'",
        help="a variant of your own (repeatable), run after --variants",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument(
        "--lr", type=float, default=2e-4, help="train.learning_rate of every run (a variant may set its own)"
    )
    ap.add_argument(
        "--train-samples", type=int, default=None, help="first N training sentences (default: all)"
    )
    ap.add_argument(
        "--eval-samples", type=int, default=None, help="first N validation sentences (default: all)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    names = args.variants if args.variants is not None else ([] if args.variant else DEFAULT)
    unknown = [part for n in names for part in n.split("+") if part not in VARIANTS]
    if unknown:
        ap.error(
            f"unknown variant {unknown[0]!r}: one of {', '.join(VARIANTS)}, joined with + (head1+warmup0.05), "
            "or --variant 'NAME key=value ...'"
        )
    variants = [(n, [o for part in n.split("+") for o in VARIANTS[part]]) for n in names] + args.variant
    if not variants:
        ap.error("no variant to run")
    for f in ("train.txt", "validation.txt"):
        if not (CONLL / f).is_file():
            print(f"levers.py: {CONLL / f} is absent: this benchmark needs ../shared", file=sys.stderr)
            return 2
    args.threads = args.threads or len(os.sched_getaffinity(0))
    ensure_encoder()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(
        f"budget {args.budget:g} s, lr {args.lr:g}, seeds {args.seeds}, {len(variants)} variant(s)",
        flush=True,
    )
    base = [
        f"data.train={CONLL / 'train.txt'}",
        f"data.validation={CONLL / 'validation.txt'}",
        "data.test=null",
        f"model.name_or_path={ENCODER.relative_to(REPO)}",
        "train.epochs=1",  # as quality.py: `batch_tokens: auto` sizes its batches for one epoch
        f"train.learning_rate={args.lr}",
        f"train.time_budget={args.budget:g}",
        *sample_caps(args.train_samples, args.eval_samples),
    ]

    runs: list[dict] = []
    for k, seed in enumerate(args.seeds):
        for name, overrides in variants if k % 2 == 0 else variants[::-1]:
            run = raytag_run(
                f"levers-{name}-s{seed}-{stamp}", [*base, f"train.seed={seed}", *overrides], args.threads
            )
            row = {"variant": name, "overrides": overrides, "seed": seed}
            if "error" in run:
                print(
                    f"{name} seed {seed}: FAILED ({run['error']}), log {run['log']}:\n{tail(REPO / run['log'])}"
                )
                runs.append({**row, **run})
                continue
            raw = run.pop("raw")
            plan = raw.get("time_budget") or {}
            row.update(
                f1=(raw.get("validation") or {}).get("f1"),
                planned_steps=plan.get("planned_steps"),
                planned_epochs=plan.get("planned_epochs"),
                seconds_used=plan.get("seconds_used"),
                seconds_per_step=plan.get("seconds_per_step"),
                time_budget=plan,
                **run,
            )
            runs.append(row)
            print(
                f"{name} seed {seed}: dev F1 {row['f1']:.4f}, {row['planned_steps']} steps "
                f"({row['planned_epochs']} epochs), {row['seconds_used']} of {args.budget:g} s "
                f"(batch_tokens {(run['auto_batch_tokens'] or 'set').split()[0]})",
                flush=True,
            )
    failed = any("error" in r for r in runs)
    good = [r for r in runs if "error" not in r]
    first = variants[0][0]
    ref = statistics.mean([r["f1"] for r in good if r["variant"] == first] or [float("nan")])
    print()
    print(
        f"| variant | overrides | seed | steps | epochs | s used of {args.budget:g} | dev F1 | vs {first} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in good:
        print(
            f"| {r['variant']} | {' '.join(r['overrides']) or '(defaults)'} | {r['seed']} | {r['planned_steps']} "
            f"| {r['planned_epochs']} | {r['seconds_used']} | {r['f1']:.4f} | {r['f1'] - ref:+.4f} |"
        )
    out = OUT / f"levers-{stamp}.json"
    out.write_text(json.dumps({"stamp": stamp, "args": vars(args), "runs": runs}, indent=1, default=str))
    print(f"\nrecord: {out.relative_to(REPO)}")
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
