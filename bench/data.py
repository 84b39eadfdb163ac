"""Sharded data at scale: prepare 1,000,000 generated sentences once, from CoNLL text and from
Parquet, then train on them.

    .venv/bin/python bench/data.py [--sentences 1000000] [--files 100] [--steps 50] [--formats conll,parquet]

1. Generates the sentences (CoNLL-2003-like lengths: mean about 14 words, a fifth of them short
   headlines and bylines, a long tail to 120 words; words and entity types drawn from the demo
   data) as `--files` CoNLL files under bench/out/data/corpus/, and the same sentences as
   `--files` Parquet files in the hub's layout (`tokens`, `ner_tags` as ClassLabel ids, the names
   in the schema's `datasets` metadata, as `Dataset.to_parquet` writes them) under
   bench/out/data/parquet/.
2. `trainer/main.py prepare` on each format (a fresh subprocess, files prepared in parallel),
   alternating formats for `--repeat` rounds in this run (the best round of each is compared: a
   shared machine's load comes and goes): sentences per second, shard count, and the peak RSS of
   the process tree (the preparer and its pool), with the Parquet figures as ratios of the CoNLL
   ones. Both preparations must give the same windows (their index is compared).
3. The same command again: it finds the prepared shards and skips preparation (its time).
4. `trainer/main.py` for `--steps` optimizer steps on them, one worker, a tiny model with the
   same tokenizer: the peak RSS of that worker.

The tokenizer is XLM-R's own (../shared/models/xlm-roberta-base-tokenizer) when present, else
the demo's. Figures are printed, not asserted (bench/ never asserts absolute time); the issue's
bound (peaks under 2 GB) is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "data"
SHARED_TOKENIZER = ROOT.parent / "shared" / "models" / "xlm-roberta-base-tokenizer"
LIMIT = 2 << 30  # the bound on both peaks


TAG_NAMES = (
    ["O"]
    + [f"B-{t}" for t in ("PER", "ORG", "LOC", "MISC")]
    + [f"I-{t}" for t in ("PER", "ORG", "LOC", "MISC")]
)


def generate(folder: Path, sentences: int, files: int, seed: int = 0, parquet: Path | None = None) -> int:
    """Write `sentences` generated CoNLL sentences as `files` files (and as Parquet files in the hub's
    layout under `parquet`); returns the token count."""
    from raytag.trainer.conll import read_conll

    demo = read_conll(ROOT / "trainer" / "assets" / "demo" / "train.txt").sentences
    plain = sorted({w for s in demo for w, t in zip(s.words, s.tags, strict=True) if t == "O"})
    named = sorted({w for s in demo for w, t in zip(s.words, s.tags, strict=True) if t != "O"})
    types = ["PER", "ORG", "LOC", "MISC"]
    rng = np.random.default_rng(seed)
    short = rng.random(sentences) < 0.2  # headlines, bylines, "-- Reuters": 1-4 words
    lengths = np.where(
        short,
        rng.integers(1, 5, sentences),
        np.clip(np.round(rng.lognormal(np.log(15.5), 0.5, sentences)), 2, 120),
    ).astype(np.int64)
    total = int(lengths.sum())
    # Tags: an entity starts at about 9% of tokens, continues with probability 0.45 per token.
    start = rng.random(total) < 0.09
    kind = rng.integers(0, len(types), total)
    first = np.zeros(total, dtype=bool)
    first[np.cumsum(lengths)[:-1]] = True  # a sentence's first token continues nothing
    first[0] = True
    inside = np.zeros(total, dtype=bool)
    cont = rng.random(total) < 0.45
    for _ in range(4):  # up to 5-token entities
        prev = np.concatenate([[False], (start | inside)[:-1]])
        prev_kind = np.concatenate([[0], kind[:-1]])
        grow = prev & cont & ~first & ~start
        kind = np.where(grow, prev_kind, kind)
        inside |= grow
    words_o = rng.integers(0, len(plain), total)
    words_e = rng.integers(0, len(named), total)
    tag_names = TAG_NAMES
    tag_id = np.where(start, 1 + kind, np.where(inside, 5 + kind, 0))
    lines = [
        f"{named[we] if t else plain[wo]} {tag_names[t]}"
        for wo, we, t in zip(words_o.tolist(), words_e.tolist(), tag_id.tolist(), strict=True)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    ends = np.cumsum(lengths)
    per_file = -(-sentences // files)
    for f in range(files):
        a, b = f * per_file, min(sentences, (f + 1) * per_file)
        if a >= b:
            break
        t0 = int(ends[a - 1]) if a else 0
        parts, pos = [], t0
        for n in lengths[a:b].tolist():
            parts.append("\n".join(lines[pos : pos + n]))
            pos += n
        (folder / f"part-{f:04d}.conll").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    if parquet is not None:
        vocab = np.asarray(plain + named, dtype=object)
        word_id = np.where(tag_id > 0, len(plain) + words_e, words_o)
        write_parquet(parquet, lengths, vocab[word_id], tag_id, per_file)
    return total


def write_parquet(
    folder: Path, lengths: np.ndarray, words: np.ndarray, tags: np.ndarray, per_file: int
) -> None:
    """The sentences as Parquet files in the hub's layout: `tokens` and `ner_tags` (ClassLabel ids,
    the names in the schema's `datasets` metadata, as `Dataset.to_parquet` writes them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {
        "tokens": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"},
        "ner_tags": {"feature": {"names": TAG_NAMES, "_type": "ClassLabel"}, "_type": "List"},
    }
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    folder.mkdir(parents=True, exist_ok=True)
    ends = np.concatenate([[0], np.cumsum(lengths)])
    for f, a in enumerate(range(0, len(lengths), per_file)):
        b = min(len(lengths), a + per_file)
        t0, t1 = int(ends[a]), int(ends[b])
        offsets = pa.array(ends[a : b + 1] - t0, type=pa.int32())
        table = pa.table(
            {
                "tokens": pa.ListArray.from_arrays(
                    offsets, pa.array(words[t0:t1].tolist(), type=pa.string())
                ),
                "ner_tags": pa.ListArray.from_arrays(offsets, pa.array(tags[t0:t1], type=pa.int64())),
            }
        ).replace_schema_metadata(meta)
        pq.write_table(table, folder / f"part-{f:04d}.parquet")


class PeakRSS:
    """Polls a process and its children; `peak` is the largest summed RSS seen, `single` the largest one."""

    def __init__(self, proc: subprocess.Popen) -> None:
        import psutil

        self.proc, self.peak, self.single = psutil.Process(proc.pid), 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = [p.memory_info().rss for p in procs if p.is_running()]
            except psutil.Error:
                rss = []
            if rss:
                self.peak, self.single = max(self.peak, sum(rss)), max(self.single, max(rss))
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(cmd: list[str], log_file: Path) -> tuple[float, PeakRSS, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        watch = PeakRSS(proc)
        rc = proc.wait()
    watch.stop()
    took = time.monotonic() - t0
    text = log_file.read_text()
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}\n{text[-3000:]}")
    return took, watch, text


def tiny_model(folder: Path, tokenizer_path: str) -> str:
    """The demo's 2-layer, 128-wide XLM-R with the given tokenizer's vocabulary, saved as a model folder."""
    if (folder / "config.json").exists():
        return str(folder)
    from transformers import AutoTokenizer

    from raytag.trainer.model import TINY, load_model

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    labels = ["O"] + [f"{p}-{t}" for t in ("LOC", "MISC", "ORG", "PER") for p in ("B", "I")]
    load_model(TINY, labels, tok, seed=0).save_pretrained(folder)  # the demo's shape, this vocabulary
    tok.save_pretrained(folder)
    return str(folder)


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument(
        "--formats", default="conll,parquet", help="input formats to prepare, compared in one run"
    )
    ap.add_argument("--repeat", type=int, default=2, help="rounds of preparation per format, alternating")
    ap.add_argument(
        "--keep", action="store_true", help="reuse generated data and prepared shards from before"
    )
    args = ap.parse_args()

    corpus, parquet = OUT / "corpus", OUT / "parquet"
    storage = OUT / "runs"
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not args.keep:
        shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer = str(SHARED_TOKENIZER) if SHARED_TOKENIZER.is_dir() else None
    if not corpus.is_dir() or ("parquet" in formats and not parquet.is_dir()):
        t0 = time.monotonic()
        tokens = generate(
            corpus, args.sentences, args.files, parquet=parquet if "parquet" in formats else None
        )
        mb = {
            d.name: sum(f.stat().st_size for f in d.iterdir()) / 1e6 for d in (corpus, parquet) if d.is_dir()
        }
        print(
            f"generated {args.sentences:,} sentences ({tokens:,} tokens, {tokens / args.sentences:.1f} per sentence) "
            f"in {args.files} files per format ({', '.join(f'{k} {v:.0f} MB' for k, v in mb.items())}), "
            f"{time.monotonic() - t0:.1f} s"
        )
    if tokenizer is not None:
        model = tiny_model(OUT / "tiny-model", tokenizer)
        print(f"tokenizer: XLM-R's ({tokenizer}); model: the demo's 2-layer XLM-R with its vocabulary")
    else:
        model = "builtin:tiny-xlmr"
        print(
            "tokenizer: the demo's (../shared/models/xlm-roberta-base-tokenizer is absent); model: builtin:tiny-xlmr"
        )
    main_py = [sys.executable, str(ROOT / "trainer" / "main.py")]
    common = [
        f"model.name_or_path={model}",
        "model.max_length=128",
        f"run.storage={storage}",
        "data.validation=null",
        "data.test=null",
    ]
    keys = [f"data.train={corpus}", *common]
    inputs = {"conll": corpus, "parquet": parquet}
    figures: dict[str, dict[str, float]] = {}
    index: dict[str, bytes] = {}
    for round_ in range(args.repeat):  # formats alternate: a busy machine's noise hits both
        for fmt in formats:
            rebuild = ["--rebuild"] if round_ else []
            took, rss, text = run(
                [*main_py, "prepare", *rebuild, f"data.train={inputs[fmt]}", *common],
                OUT / f"prepare-{fmt}-{round_}.log",
            )
            if "preparation skipped" in text:
                print(f"prepare {fmt}: found from before (--keep), {took:.1f} s")
                continue
            where = Path(text.strip().splitlines()[-1])
            manifest = json.loads((where / "MANIFEST.json").read_text())
            index[fmt] = (where / "index.parquet").read_bytes()
            rate = manifest["sentences"] / manifest["prepare_seconds"]
            best = figures.setdefault(fmt, {"rate": 0.0, "peak": 0, "single": 0, "rates": []})
            best["rates"].append(rate)
            best["rate"] = max(best["rate"], rate)
            best["peak"], best["single"] = max(best["peak"], rss.peak), max(best["single"], rss.single)
            print(
                f"prepare {fmt} (round {round_ + 1}): {manifest['sentences']:,} sentences -> "
                f"{len(manifest['shards'])} shards, {manifest['windows']:,} windows in "
                f"{manifest['prepare_seconds']:.1f} s ({rate:,.0f} sentences/s; {took:.1f} s with start-up; "
                f"{manifest['executor']}, {os.cpu_count()} CPUs); peak RSS {gib(rss.peak)} for the process "
                f"tree (largest single process {gib(rss.single)}); bound {gib(LIMIT)}: "
                f"{'ok' if rss.peak < LIMIT else 'OVER'}"
            )
    if "conll" in figures and "parquet" in figures:
        c, p = figures["conll"], figures["parquet"]
        same = index["conll"] == index["parquet"]
        print(
            f"\n| input | sentences/s (best of {args.repeat}) | every round | peak RSS (tree) | largest process |"
            "\n|---|---|---|---|---|"
        )
        for fmt, x in figures.items():
            rounds = ", ".join(f"{r:,.0f}" for r in x["rates"])
            print(
                f"| {fmt} | {x['rate']:,.0f} | {rounds} | {gib(int(x['peak']))} | {gib(int(x['single']))} |"
            )
        print(
            f"| parquet / conll | {p['rate'] / c['rate']:.2f}x | | {p['peak'] / c['peak']:.2f}x | "
            f"{p['single'] / c['single']:.2f}x |\n"
        )
        print(f"the two preparations' windows (index.parquet): {'identical' if same else 'DIFFERENT'}")

    took, _, text = run([*main_py, "prepare", *keys], OUT / "prepare-2.log")
    found = "preparation skipped" in text
    print(
        f"prepare again: {'found prepared shards, skipped' if found else 'PREPARED AGAIN'} in {took:.1f} s "
        f"(whole command with Python start-up; bound 10 s: {'ok' if took < 10 else 'OVER'})"
    )

    took, rss, text = run(
        [
            *main_py,
            *keys,
            "run.name=bench-data",
            "run.new_run=true",
            f"train.max_steps={args.steps}",
            "train.batch_tokens=1024",
            f"train.log_every={max(1, args.steps // 5)}",
            "train.threads=2",
        ],
        OUT / "train.log",
    )
    steps = [ln for ln in text.splitlines() if " step " in ln and "/" in ln]
    print(
        f"train: {args.steps} steps on the prepared shards in {took:.1f} s (with start-up); worker peak RSS "
        f"{gib(rss.peak)} (bound {gib(LIMIT)}: {'ok' if rss.peak < LIMIT else 'OVER'})"
    )
    if steps:
        print(f"train: last log line: {steps[-1].split('raytag INFO ')[-1]}")
    reads = json.loads((storage / "bench-data" / "results.json").read_text())["train_data"]["reads"]["0"]
    print(
        f"train: the worker loaded {len(reads)} of the shards (one at a time) in its first {args.steps} steps"
    )


if __name__ == "__main__":
    main()
