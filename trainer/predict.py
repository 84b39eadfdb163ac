"""Tag a CoNLL file or plain text with an exported model, windowing long sentences as in training.

Output is CoNLL columns (`word [gold] predicted`), or for text input one JSON object per input
line with its entities and their character offsets (`--output-format entities`).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .conll import ConllOptions, parse_conll_lines, read_conll
from .scoring import chunks, score

if TYPE_CHECKING:
    import numpy as np
    import torch

# torch, numpy, regex and the model code are imported where used: the command line imports this
# module for PredictError on every start, `--help` included.

log = logging.getLogger("raytag")

INPUT_FORMATS = ("conll", "text")
OUTPUT_FORMATS = ("conll", "entities")


class PredictError(ValueError):
    """A user error in what `predict` was asked to do (a combination of formats that makes no sense)."""


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

    import torch

    from .engine import cpu_has_bf16

    if meta.get("precision") != "bf16":
        return nullcontext()
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file ('-': stdin), without line ends or a leading byte-order mark.

    A line ends at \\n, \\r\\n or \\r; other separators (U+2028, form feed) are whitespace in a line.
    """
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    lines = text.removeprefix("\ufeff").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final line end
    return lines


def read_conll_input(path: str) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]] | None]:
    """Words per sentence of a CoNLL file ('-': stdin), and its gold tags when it has them."""
    lines = sys.stdin.readlines() if path == "-" else None
    if lines is not None:
        # Labelled input is detected from the first token line: more than one column means gold tags.
        labelled = any(
            len(line.split()) > 1 for line in lines if line.strip() and not line.startswith("-DOCSTART-")
        )
        cf = parse_conll_lines(lines, "<stdin>", ConllOptions(require_tags=labelled))
    else:
        with open(path, "rb") as f:
            head = [ln.decode("utf-8", "replace") for ln in f.readlines()[:50]]
        labelled = any(
            len(line.split()) > 1 for line in head if line.strip() and not line.startswith("-DOCSTART-")
        )
        cf = read_conll(path, ConllOptions(require_tags=labelled))
    words = [s.words for s in cf.sentences]
    gold = [s.tags for s in cf.sentences] if labelled else None
    return words, gold


def tag_words(
    model, tokenizer, meta: dict, words, batch_tokens: int, with_probs: bool = False
) -> tuple[list[list[str]], list[np.ndarray] | None]:
    """Predicted tags per sentence, and (`with_probs`) each word's probability of its predicted tag,
    read at its first sub-token as the tag is."""
    import torch

    from .evaluate import predict_windows
    from .features import encode, stitch

    id2label = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    enc = encode(words, None, tokenizer, None, meta.get("max_length"), meta.get("stride", 64))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probs: dict[int, np.ndarray] | None = {} if with_probs else None
    with inference_autocast(meta, device):
        preds, _, _ = predict_windows(model, enc, pad_id, device, batch_tokens, probs=probs)
    per_sentence = stitch(enc, [preds[i] for i in range(len(enc.windows))])
    pred_tags = [[id2label[int(t)] for t in arr] for arr in per_sentence]
    if probs is None:
        return pred_tags, None
    return pred_tags, stitch(enc, [probs[i] for i in range(len(enc.windows))])


def line_entities(line: str, spans: list[tuple[int, int]], tags: list[str], probs) -> list[dict]:
    """The entities of one tagged line: chunks decoded as the scorer counts them (scoring.chunks),
    each from the start of its first word to the end of its last, `line[start:end] == text`;
    `score` is the mean of its words' probabilities (as the HF pipeline's "simple" aggregation)."""
    import numpy as np

    found = []
    for type_, first, last in chunks(tags):
        start, end = spans[first][0], spans[last - 1][1]
        found.append(
            {
                "text": line[start:end],
                "type": type_,
                "start": start,
                "end": end,
                "score": round(float(np.mean(probs[first:last])), 4),
            }
        )
    return found


def predict(
    model_dir: str,
    input_path: str,
    output: str,
    fmt: str = "conll",
    batch_tokens: int = 16384,
    output_format: str = "conll",
) -> dict:
    """Tag `input_path` and write to `output` ('-' for stdout): `word [gold] pred` columns, or with
    `output_format="entities"` (text input only) one JSON object per input line:
    `{"line": N, "text": LINE, "entities": [{"text", "type", "start", "end", "score"}, ...]}`.

    Returns scores when the input had gold tags, else {}. Raises PredictError for an unknown format
    or entities asked of CoNLL input (it has words but no original text to give offsets into).
    """
    if fmt not in INPUT_FORMATS:
        raise PredictError(f"unknown input format {fmt!r}: expected one of {', '.join(INPUT_FORMATS)}")
    if output_format not in OUTPUT_FORMATS:
        raise PredictError(
            f"unknown output format {output_format!r}: expected one of {', '.join(OUTPUT_FORMATS)}"
        )
    if output_format == "entities" and fmt != "text":
        raise PredictError(
            "--output-format entities needs --format text: character offsets point into raw text "
            "lines, and CoNLL input has words, not the text they came from"
        )
    from .words import word_spans

    model, tokenizer, meta = load_exported(model_dir)
    lines: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    if fmt == "text":  # each non-blank line a sentence, split into words as CoNLL writes them
        lines = read_lines(input_path)
        spans = [word_spans(line) for line in lines]
        words = [tuple(line[a:b] for a, b in sp) for line, sp in zip(lines, spans, strict=True) if sp]
        gold = None
    else:
        words, gold = read_conll_input(input_path)
    pred_tags, probs = tag_words(model, tokenizer, meta, words, batch_tokens, output_format == "entities")
    out = sys.stdout if output == "-" else open(output, "w", encoding="utf-8")
    try:
        if probs is not None:  # entities: one object per input line, blank lines included
            tagged = iter(zip(pred_tags, probs, strict=True))
            for n, (line, sp) in enumerate(zip(lines, spans, strict=True), start=1):
                ents = line_entities(line, sp, *next(tagged)) if sp else []
                out.write(json.dumps({"line": n, "text": line, "entities": ents}, ensure_ascii=False) + "\n")
        else:
            for si, ws in enumerate(words):
                for i, w in enumerate(ws):
                    cols = [w, gold[si][i], pred_tags[si][i]] if gold is not None else [w, pred_tags[si][i]]
                    out.write(" ".join(cols) + "\n")
                out.write("\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return dict(score(gold, pred_tags)) if gold is not None else {}
