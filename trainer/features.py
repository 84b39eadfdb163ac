"""Sentences to model inputs: sub-word tokens, first-sub-token labels, windows for long sentences.

A sentence whose sub-words do not fit the model's window is cut into overlapping windows at
word boundaries. Every word is *owned* by exactly one window (the one where it has the most
context on both sides); only owned words carry a training label, and each word's prediction
is read from its owner. So no word is ever lost or counted twice, however long the sentence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("raytag")

IGNORE = -100


@dataclass
class Window:
    """One model input: a window over one sentence."""

    sentence: int
    input_ids: np.ndarray  # int32, special tokens included
    labels: np.ndarray  # int32, IGNORE except at the first sub-token of owned words
    words: np.ndarray  # int32, sentence word index of each owned word, in order
    positions: np.ndarray  # int32, position in input_ids of each owned word's first sub-token

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Encoded:
    windows: list[Window]
    num_sentences: int
    num_words: list[int]  # words per sentence
    stats: dict[str, int] = field(default_factory=dict)


def window_budget(tokenizer, max_length: int | None) -> tuple[int, int, list[int], list[int]]:
    """Content tokens per window, and the special tokens placed before and after the content."""
    model_max = getattr(tokenizer, "model_max_length", 512) or 512
    if model_max > 100_000:  # tokenizers without a limit report a huge sentinel
        model_max = 512
    length = min(max_length, model_max) if max_length else model_max
    # The special tokens the tokenizer adds around one sentence (<s> ... </s> for XLM-R,
    # [CLS] ... [SEP] for BERT), read off a probe rather than assumed.
    probe = tokenizer(["a"], is_split_into_words=True, add_special_tokens=True)
    ids, wids = probe["input_ids"], probe.word_ids()
    first = wids.index(0)
    last = len(wids) - 1 - wids[::-1].index(0)
    prefix, suffix = list(ids[:first]), list(ids[last + 1 :])
    content = length - len(prefix) - len(suffix)
    if content < 2:
        raise ValueError(f"model.max_length {length} leaves no room for content tokens")
    return content, length, prefix, suffix


def plan_windows(pieces: Sequence[int], content: int, stride: int) -> list[tuple[int, int]]:
    """Split a sentence (sub-word counts per word) into word ranges [start, end) that fit `content`.

    Consecutive windows overlap by up to `stride` tokens of context. A single word longer than
    `content` gets a window of its own (its sub-words are cut to fit; it keeps its prediction).
    """
    n = len(pieces)
    if sum(pieces) <= content:
        return [(0, n)]
    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        end, used = start, 0
        while end < n and used + pieces[end] <= content:
            used += pieces[end]
            end += 1
        if end == start:  # one word longer than the whole window
            end = start + 1
        windows.append((start, end))
        if end >= n:
            return windows
        # Next window starts early enough to share about `stride` tokens of context, but always
        # moves forward by at least one word.
        nxt, shared = end, 0
        while nxt - 1 > start and shared + pieces[nxt - 1] <= stride:
            nxt -= 1
            shared += pieces[nxt]
        start = max(nxt, start + 1)


def owners(pieces: Sequence[int], ranges: list[tuple[int, int]]) -> list[int]:
    """For each word, the index of the window in which it has the most context on both sides."""
    n = len(pieces)
    cum = np.concatenate([[0], np.cumsum(pieces)])
    best = [-1] * n
    best_score = [-1] * n
    for w, (s, e) in enumerate(ranges):
        for i in range(s, e):
            left = cum[i] - cum[s]
            right = cum[e] - cum[i + 1]
            score = min(left, right)
            if score > best_score[i]:
                best_score[i], best[i] = score, w
    return best


def encode(
    words: Sequence[Sequence[str]],
    tags: Sequence[Sequence[str]] | None,
    tokenizer,
    label2id: dict[str, int] | None,
    max_length: int | None = None,
    stride: int = 64,
) -> Encoded:
    """Tokenise sentences and cut them into windows.

    `tags` may be None (prediction); labels are then all IGNORE. Raises ValueError when the
    tokenizer is not a fast one (word alignment needs it).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; word alignment needs one"
        )
    content, _, prefix, suffix = window_budget(tokenizer, max_length)
    stride = min(stride, content // 2)
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    stats = {"windows": 0, "split_sentences": 0, "cut_words": 0, "empty_words": 0}
    windows: list[Window] = []
    num_words = [len(w) for w in words]
    chunk = 2048  # tokenise in chunks: bounded memory on large files
    for c0 in range(0, len(words), chunk):
        batch = [list(w) for w in words[c0 : c0 + chunk]]
        enc = tokenizer(batch, is_split_into_words=True, add_special_tokens=False)
        for b, sent_words in enumerate(batch):
            si = c0 + b
            ids = enc["input_ids"][b]
            word_ids = enc.word_ids(b)
            per_word: list[list[int]] = [[] for _ in sent_words]
            for tok, wid in zip(ids, word_ids, strict=True):
                if wid is not None:
                    per_word[wid].append(tok)
            for pw in per_word:
                if not pw:  # e.g. a word of only zero-width characters: keep it, as <unk>
                    pw.append(unk)
                    stats["empty_words"] += 1
            pieces = [len(pw) for pw in per_word]
            ranges = plan_windows(pieces, content, stride)
            own = owners(pieces, ranges)
            if len(ranges) > 1:
                stats["split_sentences"] += 1
            sent_tags = tags[si] if tags is not None else None
            for w_idx, (s, e) in enumerate(ranges):
                input_ids = list(prefix)
                labels = [IGNORE] * len(prefix)
                owned_words, owned_pos = [], []
                for i in range(s, e):
                    pw = per_word[i]
                    room = content - (len(input_ids) - len(prefix))
                    if len(pw) > room:
                        pw = pw[:room]
                        stats["cut_words"] += 1
                    if not pw:
                        break
                    pos = len(input_ids)
                    input_ids.extend(pw)
                    labels.extend([IGNORE] * len(pw))
                    if own[i] == w_idx:
                        owned_words.append(i)
                        owned_pos.append(pos)
                        if sent_tags is not None and label2id is not None:
                            labels[pos] = label2id[sent_tags[i]]
                input_ids.extend(suffix)
                labels.extend([IGNORE] * len(suffix))
                windows.append(
                    Window(
                        sentence=si,
                        input_ids=np.asarray(input_ids, dtype=np.int32),
                        labels=np.asarray(labels, dtype=np.int32),
                        words=np.asarray(owned_words, dtype=np.int32),
                        positions=np.asarray(owned_pos, dtype=np.int32),
                    )
                )
    stats["windows"] = len(windows)
    return Encoded(windows=windows, num_sentences=len(words), num_words=num_words, stats=stats)


def stitch(encoded: Encoded, window_preds: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per-window predictions (one value per owned word) back to one array per sentence.

    The values are label ids (int64 out) or, when any window's are floating point, scores such as
    the predicted label's probability (float64 out; they must be >= 0).
    Raises ValueError if any word ends up without a prediction (a bug, never expected).
    """
    floats = any(np.asarray(p).dtype.kind == "f" for p in window_preds)
    dtype = np.float64 if floats else np.int64
    out = [np.full(n, -1, dtype=dtype) for n in encoded.num_words]
    if len(window_preds) != len(encoded.windows):
        raise ValueError(f"got predictions for {len(window_preds)} windows, expected {len(encoded.windows)}")
    for wi, (win, pred) in enumerate(zip(encoded.windows, window_preds, strict=True)):
        if len(pred) != len(win.words):
            raise ValueError(f"window {wi}: expected {len(win.words)} predictions, got {len(pred)}")
        out[win.sentence][win.words] = pred
    for si, arr in enumerate(out):
        if (arr < 0).any():
            missing = int((arr < 0).sum())
            raise ValueError(f"sentence {si}: {missing} word(s) got no prediction")
    return out
