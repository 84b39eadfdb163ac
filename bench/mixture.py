"""English alone against a weighted English-Spanish-Dutch mixture: validation F1 per language.

    python bench/mixture.py                       # 1 seed, 1 epoch, es and nl at weight 0.5
    python bench/mixture.py --epochs 2 --seeds 1 2
    python bench/mixture.py --train-samples 300 --eval-samples 100    # a smoke run

Each seed trains raytag twice on the offline encoder of quality.py (built into bench/out/encoder
the first time), with configs/xlmr-base-conll2003.yaml and the same learning rate, seed and epochs:

- **en**: CoNLL-2003 English's training set alone;
- **mix**: the same English set (weight 1: every English sentence once an epoch, as in `en`)
  with CoNLL-2002 Spanish and Dutch as weighted corpora (`--weights`, the share of their shards
  drawn each epoch).

Both are evaluated on the three validation sets (English as `validation`, Spanish and Dutch as
`data.eval_sets`), so the English-only run's Spanish and Dutch figures are zero-shot transfer.
It prints a table of dev F1 per language, training seconds and steps, and the check: the
mixture's English F1 is at most 0.005 below English alone (mean over seeds). The record goes to
`bench/out/mixture-<stamp>.json`, the logs to `bench/out/logs/`, the runs to `bench/out/runs/`.
Exit status 0 when the check holds, 1 when not, 2 when a run failed or ../shared is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CONLL, ENCODER, OUT, REPO, SHARED, ensure_encoder, raytag_run, sample_caps, tail

CONLL2002 = SHARED / "data" / "conll2002"
LANGS = ("en", "es", "nl")
EN_DROP = 0.005  # the mixture's English F1 may be this much below English alone


def train_file(lang: str) -> Path:
    return CONLL / "train.txt" if lang == "en" else CONLL2002 / lang / "train.txt"


def validation_file(lang: str) -> Path:
    return CONLL / "validation.txt" if lang == "en" else CONLL2002 / lang / "validation.txt"


def run(args, kind: str, seed: int, stamp: str) -> dict:
    """One raytag run, `kind` en or mix; its F1 per language from results.json."""
    name = f"mixture-{kind}-s{seed}-{stamp}"
    if kind == "en":
        train = str(train_file("en"))
    else:
        corpora = {"en": 1.0, **args.weights}
        train = (
            "{"
            + ", ".join(f"{k}: {{path: {train_file(k)}, weight: {w:g}}}" for k, w in corpora.items())
            + "}"
        )
    cmd = [
        f"data.train={train}",
        f"data.validation={validation_file('en')}",
        f"data.eval_sets.es={validation_file('es')}",
        f"data.eval_sets.nl={validation_file('nl')}",
        "data.test=null",
        f"model.name_or_path={ENCODER.relative_to(REPO)}",
        f"train.epochs={args.epochs}",
        f"train.learning_rate={args.lr}",
        f"train.seed={seed}",
    ]
    run = raytag_run(name, cmd + sample_caps(args.train_samples, args.eval_samples), args.threads)
    if "error" in run:
        return run
    raw = run.pop("raw")
    auto = run.pop("auto_batch_tokens")
    return {
        "f1": {"en": raw["validation"]["f1"], "es": raw["es"]["f1"], "nl": raw["nl"]["f1"]},
        "train_runtime_seconds": raw.get("train_runtime_seconds"),
        "train_steps": raw.get("global_steps"),
        "batch_tokens": int(auto.split()[0]) if auto else None,  # what `auto` chose for this data
        "corpora": (raw.get("train_data") or {}).get("corpora"),
        **run,
    }


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def parse_weight(text: str) -> tuple[str, float]:
    lang, _, w = text.partition("=")
    if lang not in ("es", "nl") or not w:
        raise argparse.ArgumentTypeError(f"{text!r}: expected es=W or nl=W")
    return lang, float(w)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--lr", type=float, default=2e-4, help="both runs (the offline encoder wants about 2e-4)")
    ap.add_argument(
        "--weights",
        type=parse_weight,
        nargs="+",
        default=[("es", 0.5), ("nl", 0.5)],
        metavar="LANG=W",
        help="the mixture's Spanish and Dutch weights (English is 1)",
    )
    ap.add_argument("--train-samples", type=int, default=None, help="first N sentences of each corpus")
    ap.add_argument("--eval-samples", type=int, default=None, help="first N sentences of each validation set")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    args.weights = dict(args.weights)
    missing = [p for lang in LANGS for p in (train_file(lang), validation_file(lang)) if not p.is_file()]
    if missing:
        print(f"mixture.py: {missing[0]} is absent: this benchmark needs ../shared", file=sys.stderr)
        return 2
    args.threads = args.threads or len(os.sched_getaffinity(0))
    ensure_encoder()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    weights = ", ".join(f"{k} {w:g}" for k, w in args.weights.items())
    print(
        f"{args.epochs:g} epoch(s), lr {args.lr:g}, seeds {args.seeds}; mixture: en 1, {weights}", flush=True
    )

    runs: list[dict] = []
    failed = False
    for k, seed in enumerate(args.seeds):
        row: dict = {"seed": seed}
        for kind in ("en", "mix") if k % 2 == 0 else ("mix", "en"):  # alternate against load drift
            print(f"[seed {seed}] {kind}: running ...", flush=True)
            res = row[kind] = run(args, kind, seed, stamp)
            if "error" in res:
                failed = True
                print(
                    f"[seed {seed}] {kind}: FAILED ({res['error']}), log {res['log']}:\n{tail(REPO / res['log'])}"
                )
                continue
            f1 = " ".join(f"{lang} {res['f1'][lang]:.4f}" for lang in LANGS)
            print(
                f"[seed {seed}] {kind}: dev F1 {f1}; train {res['train_runtime_seconds']:.1f} s, "
                f"{res['train_steps']} steps, batch_tokens {res['batch_tokens']}",
                flush=True,
            )
        runs.append(row)
    if failed:
        return 2

    print()
    print("| run | seed | en dev F1 | es dev F1 | nl dev F1 | train s | steps | batch tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for row in runs:
        for kind in ("en", "mix"):
            r = row[kind]
            f1 = " | ".join(f"{r['f1'][lang]:.4f}" for lang in LANGS)
            print(
                f"| {kind} | {row['seed']} | {f1} | {r['train_runtime_seconds']:.1f} | {r['train_steps']} | {r['batch_tokens']} |"
            )
    means = {
        kind: {lang: mean([r[kind]["f1"][lang] for r in runs]) for lang in LANGS} for kind in ("en", "mix")
    }
    if len(runs) > 1:
        for kind in ("en", "mix"):
            f1 = " | ".join(f"{means[kind][lang]:.4f}" for lang in LANGS)
            print(f"| {kind} (mean) | - | {f1} | - | - | - |")
    drop = means["en"]["en"] - means["mix"]["en"]
    ok = drop <= EN_DROP
    print()
    print(
        f"English dev F1: alone {means['en']['en']:.4f}, in the mixture {means['mix']['en']:.4f} "
        f"({-drop:+.4f}; allowed -{EN_DROP}): {'PASS' if ok else 'FAIL'}"
    )
    record = {
        "stamp": stamp,
        "args": vars(args),
        "runs": runs,
        "means": means,
        "check": "PASS" if ok else "FAIL",
    }
    out = OUT / f"mixture-{stamp}.json"
    out.write_text(json.dumps(record, indent=2, default=str))
    print(f"record: {out.relative_to(REPO)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
