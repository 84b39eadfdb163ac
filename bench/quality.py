#!/usr/bin/env python3
"""Quality and throughput of raytag against the Hugging Face Trainer recipe, side by side.

For each training size and seed, two runs on the same first N CoNLL-2003 training sentences,
the same pretrained encoder folder, the same torch thread count, one epoch, the same learning
rate and linear decay, each in its own subprocess:

  hf      the recipe of transformers' examples/pytorch/token-classification/run_ner.py
          (first-sub-token labels, DataCollatorForTokenClassification, Trainer, seqeval
          metrics as run_ner's compute_metrics), written out below in `hf_worker`, with
          warmup ratio 0.1 and weight decay 0.01;
  raytag  `python trainer/main.py --config configs/xlmr-base-conll2003.yaml ...`.

Two modes, and a budget. --defaults: each side with its own defaults (HF: TrainingArguments' batch of 8;
raytag: the config with only epochs, learning rate and seed set, so its `batch_tokens: auto`),
at 1000, 3000 and all sentences; the check is "raytag F1 >= HF F1 - 0.005 and raytag trains
faster" at every size. Matched (the default mode): HF batch 16, and raytag's token budget per
micro-batch derived from the data so that its sentences per optimizer step match it, plus the
same warmup and weight decay; the check is "raytag mean F1 >= HF mean F1 - 0.01".
--budget-of-hf (with either mode): the HF recipe runs first and its one-epoch training time on this
machine becomes raytag's `train.time_budget` in the same run: raytag plans its steps (and epochs) to
end inside that time, its evaluations included; the check is the same F1 check, at equal time.

Prints dev F1, training seconds, optimizer steps and real (non-pad) training tokens per
second per run, the means per size, the raytag/HF ratios and the check, and writes all of it
to bench/out/quality-<stamp>.json.

Needs ../shared (CoNLL data and tools/make_offline_encoder.py) and the `bench` extra
(`pip install -e .[bench]`). Exit status: 0 PASS (or nothing to compare), 1 FAIL, 2 a run
failed or the setup is missing.

    python bench/quality.py --defaults --seeds 1             # 1000 / 3000 / all, own defaults
    python bench/quality.py                                  # 3 seeds x 3000 sentences, matched
    python bench/quality.py --only hf --train-samples 200 --eval-samples 200 --seeds 1
    python bench/quality.py --budget-of-hf --seeds 1                 # raytag in HF's one-epoch time
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OUT = REPO / "bench" / "out"
ENCODER = OUT / "encoder"  # gitignored (bench/out/)
CONLL = SHARED / "data" / "conll2003"
RAYTAG_CONFIG = "configs/xlmr-base-conll2003.yaml"

WARMUP_RATIO = 0.1
WEIGHT_DECAY = 0.01
MAX_LENGTH = 512  # run_ner truncates at the tokenizer's model_max_length, 512 for XLM-R
F1_TOLERANCE = {False: 0.01, True: 0.005}  # the check's margin: matched mode, --defaults


# --------------------------------------------------------------------------- data


def read_conll(path: Path, limit: int | None = None) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL file as (words, tags): word in the first column, tag in the last.

    `-DOCSTART-` lines are skipped and blank lines end a sentence. Raises ValueError naming
    the file and line for a line with fewer than two columns.
    """
    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                if words:
                    sentences.append((words, tags))
                    words, tags = [], []
                    if limit is not None and len(sentences) >= limit:
                        return sentences
                continue
            if len(cols) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'word ... tag', got {line.rstrip()!r}")
            words.append(cols[0])
            tags.append(cols[-1])
    if words:
        sentences.append((words, tags))
    return sentences[:limit] if limit is not None else sentences


def token_lengths(sentences: list[tuple[list[str], list[str]]]) -> list[int]:
    """Untruncated XLM-R token counts (special tokens included) of each sentence.

    Uses the `tokenizers` library on the encoder's tokenizer.json: the same pipeline a
    fast tokenizer runs for `is_split_into_words=True`, without importing torch here.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ENCODER / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    encodings = tok.encode_batch([words for words, _ in sentences], is_pretokenized=True)
    return [len(e.ids) for e in encodings]


# --------------------------------------------------------------------------- HF worker


def hf_worker(spec: dict) -> dict:
    """One run of run_ner.py's recipe (do_train + do_eval) in this process; returns its figures."""
    import torch

    torch.set_num_threads(spec["threads"])

    import numpy as np
    import transformers
    from datasets import Dataset
    from seqeval.metrics import accuracy_score, classification_report
    from transformers import (
        AutoConfig,
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        Trainer,
        set_seed,
    )

    t_start = time.perf_counter()
    # run_ner: "Set seed before initializing model."
    set_seed(spec["seed"])

    train_rows = read_conll(Path(spec["train_file"]), spec["train_samples"])
    eval_rows = read_conll(Path(spec["validation_file"]), spec["eval_samples"])
    raw_train = Dataset.from_dict(
        {"tokens": [w for w, _ in train_rows], "ner_tags": [t for _, t in train_rows]}
    )
    raw_eval = Dataset.from_dict({"tokens": [w for w, _ in eval_rows], "ner_tags": [t for _, t in eval_rows]})

    # run_ner with string labels: the sorted set of the training file's tags.
    label_list = sorted({tag for tags in raw_train["ner_tags"] for tag in tags})
    missing = sorted({tag for tags in raw_eval["ner_tags"] for tag in tags} - set(label_list))
    if missing:
        # run_ner would raise KeyError here; a small --train-samples slice can lack a rare tag.
        print(f"note: validation tags absent from the training slice, appended to the labels: {missing}")
        label_list += missing
    label_to_id = {label: i for i, label in enumerate(label_list)}
    num_labels = len(label_list)

    model_path = spec["model"]
    config = AutoConfig.from_pretrained(model_path, num_labels=num_labels, finetuning_task="ner")
    # run_ner passes add_prefix_space=True only for bloom/gpt2/roberta/deberta; this encoder is "bert".
    tokenizer_kwargs = (
        {"add_prefix_space": True} if config.model_type in {"bloom", "gpt2", "roberta", "deberta"} else {}
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=True, **tokenizer_kwargs)
    model = AutoModelForTokenClassification.from_pretrained(model_path, config=config)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("run_ner's recipe needs a fast tokenizer (word_ids)")
    # run_ner reorders label_list only when the checkpoint already has matching labels; a bare
    # encoder has none, so it sets the mapping from the data.
    model.config.label2id = {label: i for i, label in enumerate(label_list)}
    model.config.id2label = dict(enumerate(label_list))

    def tokenize_and_align_labels(examples):
        tokenized_inputs = tokenizer(
            examples["tokens"],
            padding=False,
            truncation=True,
            max_length=MAX_LENGTH,
            is_split_into_words=True,
        )
        labels = []
        for i, label in enumerate(examples["ner_tags"]):
            word_ids = tokenized_inputs.word_ids(batch_index=i)
            previous_word_idx = None
            label_ids = []
            for word_idx in word_ids:
                if word_idx is None:  # special tokens
                    label_ids.append(-100)
                elif word_idx != previous_word_idx:  # first sub-token of a word
                    label_ids.append(label_to_id[label[word_idx]])
                else:  # label_all_tokens=False
                    label_ids.append(-100)
                previous_word_idx = word_idx
            labels.append(label_ids)
        tokenized_inputs["labels"] = labels
        return tokenized_inputs

    train_dataset = raw_train.map(tokenize_and_align_labels, batched=True, desc="tokenize train")
    eval_dataset = raw_eval.map(tokenize_and_align_labels, batched=True, desc="tokenize validation")

    def truncation_report(raw, mapped) -> dict:
        full = tokenizer(list(raw["tokens"]), truncation=False, is_split_into_words=True)["input_ids"]
        n_words = sum(len(t) for t in raw["tokens"])
        n_labelled = sum(sum(1 for x in labels if x != -100) for labels in mapped["labels"])
        return {
            "sentences": len(raw),
            "words": n_words,
            "truncated_sentences": sum(1 for ids in full if len(ids) > MAX_LENGTH),
            "longest_tokens": max((len(ids) for ids in full), default=0),
            # words that carry no label (truncated away, or tokenised to nothing): run_ner's
            # metric drops them from gold and prediction alike.
            "unlabelled_words": n_words - n_labelled,
        }

    truncation = {
        "train": truncation_report(raw_train, train_dataset),
        "validation": truncation_report(raw_eval, eval_dataset),
    }
    train_real_tokens = sum(len(ids) for ids in train_dataset["input_ids"])

    data_collator = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=None)

    def compute_metrics(p):
        predictions, labels = p
        predictions = np.argmax(predictions, axis=2)
        true_predictions = [
            [label_list[p] for (p, lab) in zip(prediction, label, strict=True) if lab != -100]
            for prediction, label in zip(predictions, labels, strict=True)
        ]
        true_labels = [
            [label_list[lab] for (p, lab) in zip(prediction, label, strict=True) if lab != -100]
            for prediction, label in zip(predictions, labels, strict=True)
        ]
        # evaluate's "seqeval" metric: classification_report in default mode, micro average.
        report = classification_report(
            true_labels, true_predictions, output_dict=True, mode=None, scheme=None, zero_division="warn"
        )
        overall = report["micro avg"]
        return {
            "precision": float(overall["precision"]),
            "recall": float(overall["recall"]),
            "f1": float(overall["f1-score"]),
            "accuracy": float(accuracy_score(true_labels, true_predictions)),
        }

    use_gpu = torch.cuda.is_available()
    args = training_arguments(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["hf_batch"],
        learning_rate=spec["lr"],
        num_train_epochs=spec.get("epochs", 1),
        max_steps=spec.get("max_steps") or -1,
        warmup_ratio=WARMUP_RATIO,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="linear",
        seed=spec["seed"],
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        dataloader_num_workers=0,
        disable_tqdm=True,  # logs go to a file; the loss lines still print
        use_cpu=not use_gpu,
        bf16=bool(spec.get("bf16")),  # run_ner's --bf16: autocast, fp32 weights (on CPU too)
    )
    trainer_kwargs = {
        "model": model,
        "args": args,
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        "data_collator": data_collator,
        "compute_metrics": compute_metrics,
    }
    # transformers 5 takes the tokenizer as `processing_class`; 4.x before 4.46 as `tokenizer`.
    trainer_params = inspect.signature(Trainer.__init__).parameters
    trainer_kwargs["processing_class" if "processing_class" in trainer_params else "tokenizer"] = tokenizer
    trainer = Trainer(**trainer_kwargs)

    t0 = time.perf_counter()
    train_result = trainer.train()
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = trainer.evaluate()
    eval_seconds = time.perf_counter() - t1

    steps = int(train_result.global_step)
    return {
        "validation": {k: metrics.get(f"eval_{k}") for k in ("f1", "precision", "recall", "accuracy")},
        "train_runtime_seconds": train_seconds,
        "train_tokens_per_second": train_real_tokens / train_seconds,
        "train_real_tokens": train_real_tokens,
        "train_sentences": len(train_dataset),
        "train_steps": steps,
        "train_sentences_per_step": len(train_dataset) / steps if steps else None,
        "train_loss": float(train_result.training_loss),
        "trainer_train_runtime": train_result.metrics.get("train_runtime"),
        "eval_seconds": eval_seconds,
        "worker_seconds": time.perf_counter() - t_start,
        "labels": label_list,
        "truncation": truncation,
        "device": "cuda" if use_gpu else "cpu",
        "torch_threads": torch.get_num_threads(),
        "model_dtype": str(next(model.parameters()).dtype),
        "optimizer": str(args.optim),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def training_arguments(**kwargs):
    """TrainingArguments across transformers 4.x and 5.x.

    5.x dropped `warmup_ratio` (a float `warmup_steps` below 1 is the ratio) and `no_cuda`;
    4.x before 4.41 spells `eval_strategy` as `evaluation_strategy`.
    """
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "warmup_ratio" not in fields:
        kwargs["warmup_steps"] = kwargs.pop("warmup_ratio")
    if "eval_strategy" not in fields:
        kwargs["evaluation_strategy"] = kwargs.pop("eval_strategy")
    if "use_cpu" not in fields:
        kwargs["no_cuda"] = kwargs.pop("use_cpu")
    return TrainingArguments(**kwargs)


# --------------------------------------------------------------------------- orchestration


def parse_samples(value: str) -> int | None:
    if value.lower() in {"0", "all"}:
        return None
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a positive count, 0 or 'all', got {value!r}")
    return n


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def ensure_encoder() -> None:
    """Build the pretrained offline encoder into bench/out/encoder once (about a minute)."""
    if (ENCODER / "config.json").is_file() and (ENCODER / "model.safetensors").is_file():
        return
    tool = SHARED / "tools" / "make_offline_encoder.py"
    tmp = OUT / "encoder.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    print(
        f"building the offline encoder into {ENCODER.relative_to(REPO)} (once, about a minute) ...",
        flush=True,
    )
    proc = subprocess.run([sys.executable, str(tool), str(tmp)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        print(
            f"quality.py: {tool} failed (exit {proc.returncode}); it needs the bench extra: pip install -e '.[bench]'",
            file=sys.stderr,
        )
        raise SystemExit(2)
    shutil.rmtree(ENCODER, ignore_errors=True)
    tmp.rename(ENCODER)  # only a complete folder ever sits at ENCODER


def run_logged(cmd: list[str], log: Path, threads: int) -> tuple[int, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(
            cmd, cwd=REPO, env=child_env(threads), stdout=f, stderr=subprocess.STDOUT
        ).returncode
    return rc, time.perf_counter() - t0


RUNS = "bench/out/runs"  # raytag's run.storage (gitignored)


def raytag_run(name: str, overrides: list[str], threads: int) -> dict:
    """`python trainer/main.py --config RAYTAG_CONFIG OVERRIDES run.storage=RUNS run.name=NAME`,
    its output in bench/out/logs/NAME.log. Returns {"raw": results.json, "log", "wall_seconds",
    "auto_batch_tokens": the token budget `train.batch_tokens=auto` chose (its log line), else None}
    or, when the run failed, {"error", "log", "wall_seconds"}."""
    cmd = [sys.executable, "trainer/main.py", "--config", RAYTAG_CONFIG, *overrides]
    cmd += [f"run.storage={RUNS}", f"run.name={name}"]
    log = OUT / "logs" / f"{name}.log"
    rc, wall = run_logged(cmd, log, threads)
    results_file = REPO / RUNS / name / "results.json"
    where = {"log": str(log.relative_to(REPO)), "wall_seconds": wall}
    if rc != 0 or not results_file.is_file():
        return {"error": f"exit {rc}", **where}
    auto = None
    for line in log.read_text(errors="replace").splitlines():
        if "train.batch_tokens=auto:" in line:  # the loop's one line on the auto budget
            auto = line.split("train.batch_tokens=auto:", 1)[1].strip()
    return {
        "raw": json.loads(results_file.read_text()),
        "results_json": str(results_file.relative_to(REPO)),
        "auto_batch_tokens": auto,
        **where,
    }


def sample_caps(train: int | None, evals: int | None) -> list[str]:
    """raytag's overrides for the first N training and validation sentences (None: all)."""
    caps = [f"data.max_train_samples={train}"] if train is not None else []
    return caps + ([f"data.max_eval_samples={evals}"] if evals is not None else [])


def tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join("    | " + line for line in lines[-n:])


def run_hf(args, size: int | None, seed: int, stamp: str, bf16: bool = False) -> dict:
    name = f"quality-{size_name(size)}-s{seed}-{stamp}" + ("-bf16" if bf16 else "")
    spec = {
        "bf16": bf16,
        "seed": seed,
        "threads": args.threads,
        "model": str(ENCODER),
        "train_file": str(CONLL / "train.txt"),
        "validation_file": str(CONLL / "validation.txt"),
        "train_samples": size,
        "eval_samples": args.eval_samples,
        "lr": args.lr,
        "hf_batch": args.hf_batch,
        "output_dir": str(OUT / "hf" / name),
    }
    work = OUT / "hf" / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec, indent=2))
    log = OUT / "logs" / f"{name}-hf.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", str(work / "spec.json")]
    rc, wall = run_logged(cmd, log, args.threads)
    result_file = work / "result.json"
    if rc != 0 or not result_file.is_file():
        return {"error": f"exit {rc}", "log": str(log.relative_to(REPO)), "wall_seconds": wall}
    result = json.loads(result_file.read_text())
    result.update(log=str(log.relative_to(REPO)), wall_seconds=wall)
    return result


def run_raytag(
    args,
    size: int | None,
    seed: int,
    stamp: str,
    batch_tokens: int | None,
    budget_s: float | None = None,
    suffix: str = "",
) -> dict:
    """One raytag run. `batch_tokens` None (--defaults): the config's own budget, warm-up and decay.
    `budget_s`: train.time_budget in seconds (--budget-of-hf), instead of one epoch. `suffix` tells
    runs of one size and seed apart (a fraction of the budget)."""
    name = f"quality-{size_name(size)}-s{seed}{suffix}-{stamp}"
    cmd = [
        f"data.train={CONLL / 'train.txt'}",
        f"data.validation={CONLL / 'validation.txt'}",
        "data.test=null",
    ]
    cmd += sample_caps(size, args.eval_samples)
    cmd += [
        f"model.name_or_path={ENCODER.relative_to(REPO)}",
        "train.epochs=1",
        f"train.learning_rate={args.lr}",
        f"train.seed={seed}",
    ]
    if batch_tokens is not None:
        cmd += [
            f"train.warmup_ratio={WARMUP_RATIO}",
            f"train.weight_decay={WEIGHT_DECAY}",
            f"train.batch_tokens={batch_tokens}",
            "train.head_lr_scale=1",  # HF's recipe: one rate for every parameter
            "train.layer_lr_decay=1",
            "model.dropout=null",  # and the model's own dropout (the config sets 0)
        ]
    if budget_s is not None:
        cmd.append(f"train.time_budget={budget_s:.1f}")
    run = raytag_run(f"{name}-raytag", [*cmd, *args.raytag_set], args.threads)
    if "error" in run:
        return run
    raw = run.pop("raw")
    val = raw.get("validation") or {}
    auto_line = run["auto_batch_tokens"]
    return {
        "validation": {k: val.get(k) for k in ("f1", "precision", "recall", "accuracy")},
        "train_runtime_seconds": raw.get("train_runtime_seconds"),
        "train_tokens_per_second": raw.get("train_tokens_per_second"),
        "train_sentences_per_step": raw.get("train_sentences_per_step"),
        "train_steps": raw.get("global_steps"),
        "batch_tokens": int(auto_line.split()[0]) if auto_line else batch_tokens,
        **run,
        "epochs": raw.get("epochs"),
        "time_budget": raw.get("time_budget"),  # the plan and the seconds used and left (--budget-of-hf)
    }


def earlier_hf(record: Path, size: int | None, seed: int) -> dict:
    """The HF run of `size` and `seed` in an earlier record of this script (--hf-from)."""
    data = json.loads(record.read_text())
    for block in data.get("sizes", []):
        if block.get("train_samples") == size:
            for row in block.get("runs", []):
                if row.get("seed") == seed and "error" not in (row.get("hf") or {"error": 1}):
                    return {**row["hf"], "from_record": str(record)}
    raise SystemExit(
        f"quality.py: --hf-from {record}: no HF run of size {size_name(size)} and seed {seed} in it"
    )


def size_name(size: int | None) -> str:
    return "all" if size is None else f"n{size}"


def mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def run_size(args, size: int | None, stamp: str) -> dict:
    """Both sides on the first `size` sentences (None: all) for every seed; prints per-run lines."""
    train_sents = read_conll(CONLL / "train.txt", size)
    eval_sents = read_conll(CONLL / "validation.txt", args.eval_samples)
    lengths = token_lengths(train_sents)
    eval_lengths = token_lengths(eval_sents)
    mean_len = statistics.fmean(lengths)
    if args.defaults:
        batch_tokens = args.batch_tokens  # None: raytag's own default (auto)
        how = "raytag's config default" if batch_tokens is None else "--batch-tokens"
    else:
        # hf_batch sentences of mean real length. raytag's batches group similar lengths, so
        # padded tokens are close to real ones and sentences per step land near hf_batch.
        batch_tokens = args.batch_tokens or round(args.hf_batch * mean_len)
        how = "--batch-tokens" if args.batch_tokens else f"= round({args.hf_batch} x {mean_len:.2f})"
    data = {
        "train_file": str(CONLL / "train.txt"),
        "validation_file": str(CONLL / "validation.txt"),
        "train_sentences": len(train_sents),
        "validation_sentences": len(eval_sents),
        "train_real_tokens": sum(lengths),
        "train_mean_tokens": mean_len,
        "train_max_tokens": max(lengths),
        "train_over_max_length": sum(1 for n in lengths if n > MAX_LENGTH),
        "validation_over_max_length": sum(1 for n in eval_lengths if n > MAX_LENGTH),
    }
    tag = size_name(size)
    print(
        f"\n[{tag}] data: {len(train_sents)} train sentences ({sum(lengths)} real tokens, mean {mean_len:.1f}, "
        f"max {max(lengths)}), {len(eval_sents)} validation; HF batch {args.hf_batch} sentences; "
        f"raytag batch_tokens {batch_tokens if batch_tokens is not None else 'auto'} ({how})"
    )
    if data["train_over_max_length"] or data["validation_over_max_length"]:
        print(
            f"[{tag}] WARNING: sentences over {MAX_LENGTH} tokens, truncated by the HF recipe: "
            f"train {data['train_over_max_length']}, validation {data['validation_over_max_length']}"
        )

    runs: list[dict] = []
    for k, seed in enumerate(args.seeds):
        row: dict = {"seed": seed}
        # The order alternates between seeds, so that a load that drifts over time (other jobs on
        # the same cores) does not always fall on the same side.
        sides = ("hf", "hf_bf16", "raytag") if k % 2 == 0 else ("raytag", "hf_bf16", "hf")
        if args.budget_of_hf:  # raytag's budget is the HF run's time: HF first
            sides = ("hf", "hf_bf16", "raytag")
        for side in sides:
            if args.only not in (side.split("_")[0], "both") or (side == "hf_bf16" and not args.hf_bf16):
                continue
            print(f"[{tag} seed {seed}] {side}: running ...", flush=True)
            if side == "hf" and args.hf_from is not None:
                res = earlier_hf(args.hf_from, size, seed)
                print(
                    f"[{tag} seed {seed}] hf: from {args.hf_from} (not run again): trained "
                    f"{res['train_runtime_seconds']:.1f} s, dev F1 {res['validation']['f1']:.4f}"
                )
            elif side.startswith("hf"):
                res = run_hf(args, size, seed, stamp, bf16=side == "hf_bf16")
            elif args.budget_of_hf:
                budget_s = (row.get("hf") or {}).get("train_runtime_seconds")
                if budget_s is None:
                    print(f"[{tag} seed {seed}] raytag: skipped (no HF training time to use as its budget)")
                    continue
                print(f"[{tag} seed {seed}] raytag: train.time_budget = HF's training time, {budget_s:.1f} s")
                res = run_raytag(args, size, seed, stamp, batch_tokens, budget_s=budget_s)
                for frac in args.budget_fractions:  # the same recipe in a share of that time
                    part = budget_s * frac
                    print(
                        f"[{tag} seed {seed}] raytag: train.time_budget = {frac:g} x HF's, {part:.1f} s",
                        flush=True,
                    )
                    row[budget_side(frac)] = run_raytag(
                        args, size, seed, stamp, batch_tokens, budget_s=part, suffix=f"-b{frac:g}"
                    )
                    print(f"[{tag} seed {seed}] {budget_line(row[budget_side(frac)])}", flush=True)
            else:
                res = run_raytag(args, size, seed, stamp, batch_tokens)
            row[side] = res
            if "error" in res:
                print(
                    f"[{tag} seed {seed}] {side}: FAILED ({res['error']}), log {res['log']}:\n{tail(REPO / res['log'])}"
                )
                continue
            extra = ""
            if side.startswith("hf"):
                tr = res["truncation"]
                if tr["train"]["truncated_sentences"] or tr["validation"]["truncated_sentences"]:
                    extra = (
                        f", truncated sentences train {tr['train']['truncated_sentences']}"
                        f" / validation {tr['validation']['truncated_sentences']}"
                    )
                if res["train_real_tokens"] != data["train_real_tokens"]:
                    extra += f" (real tokens {res['train_real_tokens']} != {data['train_real_tokens']} computed here)"
            else:
                extra = f", batch_tokens {res.get('batch_tokens')}"
                if res.get("time_budget"):
                    extra += "; " + budget_line(res)
            print(
                f"[{tag} seed {seed}] {side}: dev F1 {fmt(res['validation']['f1'], '.4f')}, "
                f"train {fmt(res['train_runtime_seconds'], '.1f')} s, "
                f"{fmt(res['train_tokens_per_second'], '.0f')} tokens/s, {fmt(res.get('train_steps'), 'd')} steps, "
                f"{fmt(res.get('train_sentences_per_step'), '.2f')} sentences/step, "
                f"process {res['wall_seconds']:.1f} s{extra}",
                flush=True,
            )
        runs.append(row)

    summary: dict = {}
    for side in ("hf", "hf_bf16", "raytag"):
        for key in (
            "f1",
            "train_tokens_per_second",
            "train_runtime_seconds",
            "train_sentences_per_step",
            "train_steps",
        ):
            vals = []
            for r in runs:
                res = r.get(side) or {}
                vals.append((res.get("validation") or {}).get("f1") if key == "f1" else res.get(key))
            summary[f"{side}_{key}_mean"], summary[f"{side}_{key}_std"] = mean_std(vals)

    def ratio(key: str) -> float | None:
        a, b = summary[f"raytag_{key}_mean"], summary[f"hf_{key}_mean"]
        return a / b if a is not None and b else None

    summary["ratio_tokens_per_second"] = ratio("train_tokens_per_second")
    summary["ratio_train_seconds"] = ratio("train_runtime_seconds")
    a, b = summary["raytag_train_runtime_seconds_mean"], summary["hf_bf16_train_runtime_seconds_mean"]
    summary["ratio_train_seconds_vs_hf_bf16"] = a / b if a is not None and b else None
    hf_f1, rt_f1 = summary["hf_f1_mean"], summary["raytag_f1_mean"]
    if hf_f1 is None or rt_f1 is None:
        summary["acceptance"] = "n/a"
    else:
        ok = rt_f1 >= hf_f1 - args.f1_tolerance
        if args.defaults and not args.budget_of_hf:  # the defaults must also train faster (a budget: as long)
            ok = ok and (summary["ratio_train_seconds"] or math.inf) < 1.0
        summary["acceptance"] = "PASS" if ok else "FAIL"
    return {
        "train_samples": size,
        "raytag_batch_tokens": batch_tokens,
        "data": data,
        "runs": runs,
        "summary": summary,
    }


def budget_side(frac: float) -> str:
    """A row's key for the raytag run in `frac` of HF's time (--budget-fractions)."""
    return f"raytag_budget_{frac:g}"


def budget_line(res: dict) -> str:
    """What a budgeted raytag run planned and used, for its progress line."""
    if "error" in res:
        return f"FAILED ({res['error']}), log {res['log']}"
    tb = res.get("time_budget") or {}
    return (
        f"dev F1 {fmt(res['validation']['f1'], '.4f')}; budget {tb.get('budget_seconds', 0):.1f} s: planned "
        f"{tb.get('planned_steps')} steps ({tb.get('planned_epochs')} epochs) at {tb.get('seconds_per_step')} s "
        f"a step, used {tb.get('seconds_used', 0):.1f} s (evaluations included), {tb.get('seconds_left', 0):.1f} s left"
    )


def print_budget_table(args, results: list[dict]) -> None:
    """--budget-of-hf: each raytag run's F1 in its share of HF's one-epoch time, HF's F1 beside it."""
    header = (
        f"{'size':>6} {'seed':>5} {'share':>6} {'budget s':>9} {'used s':>8} {'planned steps':>13} "
        f"{'epochs':>7} {'raytag F1':>9} {'HF F1':>7} {'diff':>7}"
    )
    print("raytag in a share of HF's one-epoch training time (HF: one epoch, its own time):")
    print(header)
    print("-" * len(header))
    for res in results:
        tag = size_name(res["train_samples"])
        for r in res["runs"]:
            hf_f1 = ((r.get("hf") or {}).get("validation") or {}).get("f1")
            for frac, side in [(1.0, "raytag")] + [(f, budget_side(f)) for f in args.budget_fractions]:
                rt = r.get(side) or {}
                tb = rt.get("time_budget") or {}
                f1 = (rt.get("validation") or {}).get("f1")
                diff = f1 - hf_f1 if f1 is not None and hf_f1 is not None else None
                print(
                    f"{tag:>6} {r['seed']:>5} {frac:>6g} {fmt(tb.get('budget_seconds'), '.1f'):>9} "
                    f"{fmt(tb.get('seconds_used'), '.1f'):>8} {fmt(tb.get('planned_steps'), 'd'):>13} "
                    f"{fmt(tb.get('planned_epochs'), '.2f'):>7} {fmt(f1, '.4f'):>9} {fmt(hf_f1, '.4f'):>7} "
                    f"{fmt(diff, '+.4f'):>7}"
                )
    print("-" * len(header))


def print_tables(args, results: list[dict]) -> None:
    header = (
        f"{'size':>6} {'seed':>5} {'HF F1':>7} {'raytag F1':>9} {'HF train s':>10} {'raytag train s':>14} "
        f"{'HF steps':>8} {'raytag steps':>12} {'HF tok/s':>8} {'raytag tok/s':>12} {'raytag tokens':>13}"
    )
    print()
    print(header)
    print("-" * len(header))
    for res in results:
        tag = "all" if res["train_samples"] is None else str(res["train_samples"])
        for r in res["runs"]:
            hf, rt = r.get("hf") or {}, r.get("raytag") or {}
            print(
                f"{tag:>6} {r['seed']:>5} {fmt((hf.get('validation') or {}).get('f1'), '.4f'):>7} "
                f"{fmt((rt.get('validation') or {}).get('f1'), '.4f'):>9} "
                f"{fmt(hf.get('train_runtime_seconds'), '.1f'):>10} {fmt(rt.get('train_runtime_seconds'), '.1f'):>14} "
                f"{fmt(hf.get('train_steps'), 'd'):>8} {fmt(rt.get('train_steps'), 'd'):>12} "
                f"{fmt(hf.get('train_tokens_per_second'), '.0f'):>8} {fmt(rt.get('train_tokens_per_second'), '.0f'):>12} "
                f"{fmt(rt.get('batch_tokens'), 'd'):>13}"
            )
    print("-" * len(header))
    check = f"F1 >= HF - {args.f1_tolerance:g}" + (
        " and faster" if args.defaults and not args.budget_of_hf else ""
    )
    header = (
        f"{'size':>6} {'HF F1':>7} {'raytag F1':>9} {'diff':>7} {'HF train s':>10} {'raytag train s':>14} "
        f"{'raytag/HF s':>11} {'HF sent/step':>12} {'raytag sent/step':>16}  {check}"
    )
    print(f"means over seeds {' '.join(map(str, args.seeds))}:")
    print(header)
    print("-" * len(header))
    for res in results:
        s = res["summary"]
        tag = "all" if res["train_samples"] is None else str(res["train_samples"])
        diff = (
            s["raytag_f1_mean"] - s["hf_f1_mean"]
            if s["raytag_f1_mean"] is not None and s["hf_f1_mean"] is not None
            else None
        )
        print(
            f"{tag:>6} {fmt(s['hf_f1_mean'], '.4f'):>7} {fmt(s['raytag_f1_mean'], '.4f'):>9} {fmt(diff, '+.4f'):>7} "
            f"{fmt(s['hf_train_runtime_seconds_mean'], '.1f'):>10} {fmt(s['raytag_train_runtime_seconds_mean'], '.1f'):>14} "
            f"{fmt(s['ratio_train_seconds'], '.2f'):>11} {fmt(s['hf_train_sentences_per_step_mean'], '.2f'):>12} "
            f"{fmt(s['raytag_train_sentences_per_step_mean'], '.2f'):>16}  {s['acceptance']}"
        )
    if args.hf_bf16:
        print("the HF recipe with --bf16 (autocast), the engines at equal precision:")
        header = (
            f"{'size':>6} {'HF bf16 F1':>10} {'raytag F1':>9} {'HF bf16 train s':>15} {'raytag train s':>14} "
            f"{'raytag/HF bf16 s':>16} {'raytag/HF fp32 s':>16}"
        )
        print(header)
        print("-" * len(header))
        for res in results:
            s = res["summary"]
            tag = "all" if res["train_samples"] is None else str(res["train_samples"])
            print(
                f"{tag:>6} {fmt(s['hf_bf16_f1_mean'], '.4f'):>10} {fmt(s['raytag_f1_mean'], '.4f'):>9} "
                f"{fmt(s['hf_bf16_train_runtime_seconds_mean'], '.1f'):>15} "
                f"{fmt(s['raytag_train_runtime_seconds_mean'], '.1f'):>14} "
                f"{fmt(s['ratio_train_seconds_vs_hf_bf16'], '.2f'):>16} {fmt(s['ratio_train_seconds'], '.2f'):>16}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--defaults",
        action="store_true",
        help="each side with its own defaults: HF batch 8 (run_ner's), raytag's config with only the "
        "learning rate (and 1 epoch, the seed) set; sizes 1000 3000 all; the check adds 'raytag trains faster'",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument(
        "--train-samples",
        type=parse_samples,
        nargs="+",
        default=None,
        help="first N sentences, one or more sizes; 0 or 'all': all (default: 3000; --defaults: 1000 3000 all)",
    )
    ap.add_argument("--eval-samples", type=parse_samples, default=None, help="cap on validation sentences")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument(
        "--hf-batch",
        type=int,
        default=None,
        help="HF per_device_train_batch_size (default 16; --defaults: 8)",
    )
    ap.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="raytag train.batch_tokens (default: derived from --hf-batch; --defaults: raytag's own)",
    )
    ap.add_argument(
        "--f1-tolerance",
        type=float,
        default=None,
        help="check: raytag F1 >= HF F1 - this (0.01; --defaults: 0.005)",
    )
    ap.add_argument("--only", choices=["hf", "raytag", "both"], default="both")
    ap.add_argument(
        "--budget-of-hf",
        action="store_true",
        help="run the HF recipe (one epoch) first, then raytag with train.time_budget set to HF's training "
        "time on this machine: the F1 each reaches in the same time",
    )
    ap.add_argument(
        "--budget-fractions",
        type=float,
        nargs="+",
        default=[],
        metavar="F",
        help="with --budget-of-hf: also raytag in these shares of HF's time (e.g. 0.25), after the full one",
    )
    ap.add_argument(
        "--hf-bf16",
        action="store_true",
        help="also run the HF recipe with --bf16 (autocast), to compare the engines at equal precision",
    )
    ap.add_argument(
        "--raytag-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra raytag config override (repeatable), e.g. train.precision=fp32",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads on both sides (default: all cores)"
    )
    ap.add_argument(
        "--hf-from",
        type=Path,
        default=None,
        metavar="RECORD",
        help="take the HF runs (fp32) from an earlier record bench/out/quality-<stamp>.json of the same "
        "sizes and seeds instead of running them again (its time becomes --budget-of-hf's budget)",
    )
    ap.add_argument("--hf-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.hf_worker is not None:
        spec = json.loads(args.hf_worker.read_text())
        result = hf_worker(spec)
        (args.hf_worker.parent / "result.json").write_text(json.dumps(result, indent=2))
        return 0

    if args.train_samples is None:
        args.train_samples = [1000, 3000, None] if args.defaults else [3000]
    if args.hf_batch is None:
        args.hf_batch = 8 if args.defaults else 16  # 8: TrainingArguments' per_device_train_batch_size
    if args.f1_tolerance is None:
        args.f1_tolerance = F1_TOLERANCE[args.defaults]
    if args.budget_of_hf and args.only != "both":
        ap.error("--budget-of-hf runs both sides: raytag's budget is the HF run's time")
    if args.budget_fractions and not args.budget_of_hf:
        ap.error("--budget-fractions needs --budget-of-hf: the fractions are of HF's training time")
    if any(not 0 < f < 1 for f in args.budget_fractions):
        ap.error(
            f"--budget-fractions: each share is above 0 and below 1 (the full budget always runs), got {args.budget_fractions}"
        )

    if not SHARED.is_dir():
        print(
            f"quality.py: {SHARED} is absent: this benchmark needs ../shared (CoNLL data, encoder tool)",
            file=sys.stderr,
        )
        return 2
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.threads is None:
        args.threads = cpus
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ensure_encoder()

    versions = {}
    for pkg in ("torch", "transformers", "tokenizers", "accelerate", "deepspeed", "seqeval", "datasets"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    env = {
        "python": platform.python_version(),
        "cpus": cpus,
        "os_cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "versions": versions,
    }
    print(
        f"torch {versions['torch']}, transformers {versions['transformers']}, deepspeed {versions['deepspeed']}, "
        f"python {env['python']}; {cpus} CPUs, {args.threads} torch threads on both sides; model {ENCODER.relative_to(REPO)}"
    )
    if args.defaults:
        print(
            f"mode --defaults: 1 epoch, lr {args.lr:g} on both sides; HF: batch {args.hf_batch}, warmup ratio "
            f"{WARMUP_RATIO}, weight decay {WEIGHT_DECAY}, linear decay; raytag: {RAYTAG_CONFIG} as it is "
            f"(batch_tokens {'auto' if args.batch_tokens is None else args.batch_tokens}, its warm-up and decay, "
            "its head's rate and layer-wise decay)"
        )
    else:
        print(
            f"mode matched: 1 epoch, lr {args.lr:g} for every parameter, the model's dropout, warmup ratio {WARMUP_RATIO}, weight "
            f"decay {WEIGHT_DECAY}, linear decay on both sides; HF batch {args.hf_batch} sentences, raytag "
            "batch_tokens to match"
        )
    if args.budget_of_hf:
        print(
            "--budget-of-hf: raytag trains for the HF run's training time (train.time_budget), its epochs "
            "planned to fit it with its evaluations, instead of one epoch"
        )

    results = [run_size(args, size, stamp) for size in args.train_samples]
    print_tables(args, results)
    if args.budget_of_hf:
        print_budget_table(args, results)
    verdicts = [r["summary"]["acceptance"] for r in results]
    overall = "FAIL" if "FAIL" in verdicts else ("PASS" if "PASS" in verdicts else "n/a")
    faster = args.defaults and not args.budget_of_hf
    print(
        f"acceptance ({'each side its own defaults' if args.defaults else 'matched batches'}"
        f"{', raytag in HF training time' if args.budget_of_hf else ''}): raytag mean F1 >= "
        f"HF mean F1 - {args.f1_tolerance:g}{' and raytag trains faster' if faster else ''}, "
        f"at every size: {overall}"
    )

    report = {
        "stamp": stamp,
        "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "hf_worker"
        },
        "recipe": {
            "epochs": 1,
            "learning_rate": args.lr,
            "warmup_ratio": WARMUP_RATIO,
            "weight_decay": WEIGHT_DECAY,
            "scheduler": "linear",
            "hf_batch": args.hf_batch,
            "max_length": MAX_LENGTH,
            "raytag": "config defaults" if args.defaults else "matched to HF",
            "raytag_time_budget": "the HF run's training time" if args.budget_of_hf else None,
        },
        "environment": env,
        "model": str(ENCODER.relative_to(REPO)),
        "sizes": results,
        "acceptance": overall,
    }
    out_file = OUT / f"quality-{stamp}.json"
    out_file.write_text(json.dumps(report, indent=2))
    print(f"wrote {out_file.relative_to(REPO)}")

    if any(
        "error" in (r.get(side) or {})
        for res in results
        for r in res["runs"]
        for side in ("hf", "hf_bf16", "raytag", *map(budget_side, args.budget_fractions))
    ):
        return 2
    return 1 if overall == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
