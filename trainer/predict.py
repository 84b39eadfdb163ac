"""`predict` on one file: tag it with an exported model into one output file, as `tag_corpus`
(trainer/tag_job.py) tags each part of a corpus; the model's folder and an entity's record.

Output is CoNLL columns (`word [gold] predicted`), or for text, JSON Lines and Parquet input one
record per input line with its entities and their character offsets (`--output-format entities`,
or `parquet`).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .scoring import chunks, score

# torch, numpy, regex and the model code are imported where used: the command line imports this
# module for PredictError on every start, `--help` included.

log = logging.getLogger("raytag")


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
    batch_tokens: int | None = None,
    output_format: str = "conll",
    text_field: str = "text",
) -> dict:
    """Tag one input file (a path, an s3:// object, '-' for stdin) into one output file ('-' for
    stdout), written whole: a temporary file beside it, renamed into place at the end.

    `fmt` is the input's format (text, jsonl, parquet, conll) and `output_format` the output's:
    `conll` columns (`word [gold] pred`), `entities` JSON Lines, one object per input line:
    `{"line": N, "text": LINE, "entities": [{"text", "type", "start", "end", "score"}, ...]}` (a
    JSON record's own fields in place of `text`), or `parquet` (the same, one row per line).

    Returns scores when the input was CoNLL with gold tags, else {}. Raises PredictError for a
    combination of formats that makes no sense (before the model is loaded), TagInputError for
    input that cannot be parsed (naming its line).
    """
    import os
    import uuid

    from raytag.cluster.inputs import read_input

    from .tag import BATCH_TOKENS, Tagger
    from .tag_io import OutputWriter, check_formats, read_units
    from .tag_job import local_model, tag_units

    check_formats(fmt, output_format)
    name = "<stdin>" if input_path == "-" else input_path
    data = sys.stdin.buffer.read() if input_path == "-" else read_input(input_path)
    units = read_units(data, name, fmt, text_field)
    tagger = Tagger(local_model(model_dir), batch_tokens or BATCH_TOKENS)
    target = None if output == "-" else Path(output)
    tmp = None if target is None else target.with_name(f".raytag-tmp-{uuid.uuid4().hex}-{target.name}")
    out = sys.stdout.buffer if tmp is None else open(tmp, "wb")
    try:
        writer = OutputWriter(out, output_format, fmt)
        tags = tag_units(tagger, units, writer)
        writer.close(name)
        if tmp is not None and target is not None:
            out.close()
            os.replace(tmp, target)
    finally:
        if tmp is not None:
            out.close()
            tmp.unlink(missing_ok=True)
        else:
            sys.stdout.flush()
    gold = [u.gold for u in units if u.gold is not None]
    return dict(score(gold, tags)) if gold and len(gold) == len(tags) else {}
