#!/usr/bin/env python3
"""Tagging speed of raytag's `predict` against the Hugging Face pipeline, on the same model and text.

The CoNLL-2003 test sentences (3,453, without -DOCSTART-), each written as one line of plain text
(its words joined by spaces), are tagged

  raytag    by the whole command a user runs, timed from start to exit: interpreter start,
            imports, model load, reading, tagging, writing:
            `python trainer/main.py predict --model M --input test.txt --format text --output out.jsonl`
            (run twice, before and after the pipeline: the faster counts);
  pipeline  by `pipeline("token-classification", model=M, aggregation_strategy="first")`, its
            inference loop alone (`pipe(lines, batch_size=B)`), the model already loaded and warmed
            up, at batch sizes 1, 8 and 32: the fastest counts.

Both in subprocesses with the same torch thread count. Speed is CoNLL words (tokens) per second.
Agreement is the share of words given the same entity type (B-/I- aside, O included): raytag's
type of a word is that of the entity covering its first character; the pipeline's is its own tag
of the word's first sub-token (`aggregation_strategy="none"`, O tags kept).

The model: --model, or one trained here once (bench/out/runs/tag-model/model): raytag's
xlmr-base-conll2003 config on the offline encoder (../shared/tools, as bench/quality.py builds it),
3000 training sentences, one epoch (about 4 minutes on 2 cores). Needs ../shared and the `bench`
extra for that. Everything goes under bench/out/ (git-ignored); the record to
bench/out/tag-<stamp>.json.

    python bench/tag.py                       # the table: raytag, pipeline at 1 / 8 / 32, ratio, agreement
    python bench/tag.py --limit 300 --batch-sizes 8      # a smoke run

Other jobs on the same cores slow both sides, the pipeline's many small forward passes most
(each waits for both threads): compare only figures of one run. Exit status 0, 2 when a side failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from quality import child_env  # bench/ is this script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OUT = REPO / "bench" / "out"
CONLL_TEST = SHARED / "data" / "conll2003" / "test.txt"
MODEL_RUN = "tag-model"
GOAL_RATIO = 3.0
GOAL_AGREEMENT = 0.995


def read_sentences(path: Path, limit: int | None) -> list[list[str]]:
    """The words of each sentence of a CoNLL file, -DOCSTART- lines left out."""
    sentences, words = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("-DOCSTART-"):
            if words:
                sentences.append(words)
                words = []
            continue
        words.append(line.split()[0])
    if words:
        sentences.append(words)
    return sentences[:limit] if limit else sentences


def word_starts(words: list[str]) -> list[int]:
    """The character offset of each word in the line `" ".join(words)`."""
    starts, pos = [], 0
    for w in words:
        starts.append(pos)
        pos += len(w) + 1
    return starts


def ensure_model() -> Path:
    """The bench model: trained once into bench/out/runs/tag-model on the offline encoder."""
    model = OUT / "runs" / MODEL_RUN / "model"
    if (model / "config.json").is_file() and (model / "raytag.json").is_file():
        return model
    from quality import ENCODER, ensure_encoder

    ensure_encoder()
    conll = SHARED / "data" / "conll2003"
    cmd = [
        sys.executable,
        "trainer/main.py",
        "--config",
        "configs/xlmr-base-conll2003.yaml",
        f"data.train={conll / 'train.txt'}",
        f"data.validation={conll / 'validation.txt'}",
        "data.test=null",
        "data.max_train_samples=3000",
        "data.max_eval_samples=300",
        f"model.name_or_path={ENCODER}",
        "train.epochs=1",
        "train.learning_rate=2e-4",
        f"run.storage={OUT / 'runs'}",
        f"run.name={MODEL_RUN}",
        "run.new_run=true",
    ]
    print(f"training the bench model into {model.relative_to(REPO)} (once, about 4 minutes) ...", flush=True)
    log = OUT / "logs" / "tag-model.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(
            cmd, cwd=REPO, env=child_env(os.cpu_count() or 1), stdout=f, stderr=subprocess.STDOUT
        )
    if rc.returncode != 0:
        raise SystemExit(f"tag.py: training the bench model failed (exit {rc.returncode}): see {log}")
    return model


def env_for(threads: int) -> dict[str, str]:
    """quality.py's child environment (threads, offline hub), tagging in this process, not on a cluster."""
    env = child_env(threads)
    env.pop("RAY_ADDRESS", None)
    return env


def run_raytag(model: Path, text: Path, out: Path, threads: int) -> dict:
    """The whole `predict` command, timed from start to exit."""
    cmd = [sys.executable, "trainer/main.py", "predict", "--model", str(model), "--input", str(text)]
    cmd += ["--format", "text", "--output", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env_for(threads), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}: {r.stderr[-2000:]}"}
    return {"seconds": seconds, "log": [ln for ln in r.stderr.splitlines() if " raytag " in ln]}


def pipeline_worker(spec: dict) -> dict:
    """In its own process: the pipeline loaded once, then each batch size timed over all lines, then
    the per-token tags (untimed) for the agreement."""
    import torch
    from transformers import pipeline

    lines = Path(spec["text"]).read_text(encoding="utf-8").splitlines()
    pipe = pipeline("token-classification", model=spec["model"], aggregation_strategy="first", device="cpu")
    pipe(lines[:16], batch_size=8)  # warm-up: first calls pay one-time costs
    timings = {}
    for bs in spec["batch_sizes"]:
        t0 = time.perf_counter()
        pipe(lines, batch_size=bs)
        timings[str(bs)] = time.perf_counter() - t0
        print(f"  pipeline batch {bs}: {timings[str(bs)]:.1f} s", flush=True)
    tokens = pipeline(
        "token-classification",
        model=spec["model"],
        aggregation_strategy="none",
        ignore_labels=[],
        device="cpu",
    )(lines, batch_size=32)
    tags = [[(t["start"], t["entity"]) for t in sorted(toks, key=lambda t: t["index"])] for toks in tokens]
    return {"seconds": timings, "tags": tags, "threads": torch.get_num_threads()}


def run_pipeline(model: Path, text: Path, batch_sizes: list[int], threads: int, work: Path) -> dict:
    spec = work / "pipeline-spec.json"
    spec.write_text(json.dumps({"model": str(model), "text": str(text), "batch_sizes": batch_sizes}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--pipeline-worker", str(spec)]
    r = subprocess.run(cmd, cwd=REPO, env=env_for(threads), stdout=None, stderr=subprocess.PIPE, text=True)
    result = work / "pipeline-result.json"
    if r.returncode != 0 or not result.is_file():
        return {"error": f"exit {r.returncode}: {r.stderr[-2000:]}"}
    return json.loads(result.read_text())


def entity_type(tag: str) -> str:
    return tag.split("-", 1)[1] if tag[:2] in ("B-", "I-") else tag


def agreement(sentences: list[list[str]], raytag_out: Path, pipe_tags: list) -> tuple[int, int]:
    """(words given the same entity type by both, words)."""
    records = [json.loads(line) for line in raytag_out.read_text(encoding="utf-8").splitlines()]
    same = total = 0
    for words, rec, toks in zip(sentences, records, pipe_tags, strict=True):
        for start in word_starts(words):
            ours = next((e["type"] for e in rec["entities"] if e["start"] <= start < e["end"]), "O")
            first = next((tag for s, tag in toks if s == start), None)
            theirs = entity_type(first) if first is not None else "O"
            same += ours == theirs
            total += 1
    return same, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", type=Path, help="an exported model folder (default: the bench model, trained once)"
    )
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="pipeline batch sizes")
    ap.add_argument("--limit", type=int, default=None, help="first N test sentences (default: all)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads on both sides (default: all cores)"
    )
    ap.add_argument("--pipeline-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.pipeline_worker is not None:
        result = pipeline_worker(json.loads(args.pipeline_worker.read_text()))
        (args.pipeline_worker.parent / "pipeline-result.json").write_text(json.dumps(result))
        return 0
    if not CONLL_TEST.is_file():
        print(f"tag.py: {CONLL_TEST} is absent: this benchmark needs ../shared (CoNLL-2003)", file=sys.stderr)
        return 2
    threads = args.threads or len(os.sched_getaffinity(0))
    model = args.model or ensure_model()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = OUT / f"tag-{stamp}"
    work.mkdir(parents=True)
    sentences = read_sentences(CONLL_TEST, args.limit)
    words = sum(len(s) for s in sentences)
    text = work / "conll2003-test.txt"
    text.write_text("".join(" ".join(s) + "\n" for s in sentences), encoding="utf-8")
    load_before = os.getloadavg()
    print(f"{len(sentences):,} sentences, {words:,} words; model {model}; {threads} threads", flush=True)

    print("raytag predict (1) ...", flush=True)
    first = run_raytag(model, text, work / "raytag-1.jsonl", threads)
    print("pipeline ...", flush=True)
    pipe = run_pipeline(model, text, args.batch_sizes, threads, work)
    print("raytag predict (2) ...", flush=True)
    second = run_raytag(model, text, work / "raytag-2.jsonl", threads)
    load_after = os.getloadavg()
    failed = [name for name, r in (("raytag", first), ("pipeline", pipe), ("raytag", second)) if "error" in r]
    if failed:
        for r in (first, pipe, second):
            if "error" in r:
                print(r["error"], file=sys.stderr)
        return 2

    rows = [("raytag predict, whole command (1)", "-", first["seconds"])]
    rows.append(("raytag predict, whole command (2)", "-", second["seconds"]))
    rows += [("pipeline, inference loop", bs, s) for bs, s in pipe["seconds"].items()]
    ours = min(first["seconds"], second["seconds"])
    best_bs, theirs = min(pipe["seconds"].items(), key=lambda kv: kv[1])
    same, total = agreement(sentences, work / "raytag-1.jsonl", pipe["tags"])
    print()
    print(f"| {'side':<34} | batch | seconds | words/s | vs pipeline best |")
    print(f"|{'-' * 36}|-------|---------|---------|------------------|")
    for name, bs, s in rows:
        print(f"| {name:<34} | {bs:>5} | {s:7.1f} | {words / s:7,.0f} | {theirs / s:15.2f}x |")
    ratio = theirs / ours
    print()
    print(f"raytag (best of 2) / pipeline (best: batch {best_bs}): {ratio:.2f}x  (goal >= {GOAL_RATIO:.0f}x)")
    print(
        f"agreement: {same / total:.4f} of {total:,} words get the same entity type "
        f"(goal >= {GOAL_AGREEMENT})"
    )
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
    record = {
        "stamp": stamp,
        "sentences": len(sentences),
        "words": words,
        "model": str(model),
        "threads": threads,
        "raytag_seconds": [first["seconds"], second["seconds"]],
        "raytag_log": first["log"],
        "pipeline_seconds": pipe["seconds"],
        "pipeline_threads": pipe["threads"],
        "ratio": ratio,
        "agreement": same / total,
        "load_average": [load_before, load_after],
    }
    (OUT / f"tag-{stamp}.json").write_text(json.dumps(record, indent=1))
    print(f"record: {(OUT / f'tag-{stamp}.json').relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
