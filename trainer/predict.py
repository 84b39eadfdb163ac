"""Tag a CoNLL file or plain text with an exported model, windowing long sentences as in training."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from .conll import parse_conll_lines, read_conll
from .evaluate import predict_windows
from .features import encode, stitch
from .scoring import score

log = logging.getLogger("raytag")


def load_exported(model_dir: str):
    """The model, tokenizer and windowing settings of a raytag export (any HF token-classification folder)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json)")
    meta = {}
    if (path / "raytag.json").exists():
        meta = json.loads((path / "raytag.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kernel = {"attn_implementation": meta["attention"]} if meta.get("attention") else {}
    model = AutoModelForTokenClassification.from_pretrained(model_dir, **kernel)
    model.eval()
    return model, tokenizer, meta


def inference_autocast(meta: dict, device: torch.device):
    """bf16 autocast when the run evaluated in bf16 and this device computes bf16 natively, else none.

    The run's own evaluation used it, so the same windows then score exactly as in results.json.
    """
    from contextlib import nullcontext

    from .engine import cpu_has_bf16

    if meta.get("precision") != "bf16":
        return nullcontext()
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def read_input(path: str, fmt: str) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]] | None]:
    """Words per sentence (and gold tags when a CoNLL file has them)."""
    if fmt == "text":
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        sentences = [tuple(line.split()) for line in text.splitlines() if line.strip()]
        return sentences, None
    lines = sys.stdin.readlines() if path == "-" else None
    if lines is not None:
        # Labelled input is detected from the first token line: more than one column means gold tags.
        labelled = any(
            len(line.split()) > 1 for line in lines if line.strip() and not line.startswith("-DOCSTART-")
        )
        cf = parse_conll_lines(lines, "<stdin>", require_tags=labelled)
    else:
        with open(path, "rb") as f:
            head = [ln.decode("utf-8", "replace") for ln in f.readlines()[:50]]
        labelled = any(
            len(line.split()) > 1 for line in head if line.strip() and not line.startswith("-DOCSTART-")
        )
        cf = read_conll(path, require_tags=labelled)
    words = [s.words for s in cf.sentences]
    gold = [s.tags for s in cf.sentences] if labelled else None
    return words, gold


def predict(
    model_dir: str, input_path: str, output: str, fmt: str = "conll", batch_tokens: int = 16384
) -> dict:
    """Tag `input_path`, write `word [gold] pred` columns to `output` ('-' for stdout).

    Returns scores when the input had gold tags, else {}.
    """
    model, tokenizer, meta = load_exported(model_dir)
    id2label = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    words, gold = read_input(input_path, fmt)
    enc = encode(words, None, tokenizer, None, meta.get("max_length"), meta.get("stride", 64))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with inference_autocast(meta, device):
        preds, _, _ = predict_windows(model, enc, pad_id, device, batch_tokens)
    per_sentence = stitch(enc, [preds[i] for i in range(len(enc.windows))])
    pred_tags = [[id2label[int(t)] for t in arr] for arr in per_sentence]
    out = sys.stdout if output == "-" else open(output, "w", encoding="utf-8")
    try:
        for si, ws in enumerate(words):
            for i, w in enumerate(ws):
                cols = [w, gold[si][i], pred_tags[si][i]] if gold is not None else [w, pred_tags[si][i]]
                out.write(" ".join(cols) + "\n")
            out.write("\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return dict(score(gold, pred_tags)) if gold is not None else {}
