"""Entity-level scoring with the semantics of the CoNLL ``conlleval`` Perl script.

:func:`score` is a port of the chunk logic of conlleval (CoNLL-2000 evaluation script, version
2004-01-26, Erik Tjong Kim Sang): the same ``startOfChunk``/``endOfChunk`` rules over
``(prevTag, tag, prevType, type)``, the same "correct chunk" state machine, the same counts. A tag is split
at its first hyphen into a prefix and a type (``B-PER-X`` -> ``B``, ``PER-X``; ``O`` -> ``O``, ``""``);
the prefixes ``O``, ``B``, ``I``, ``E``, ``.``, ``[`` and ``]`` act as in the script, other prefixes only
through type changes. The ``S`` prefix follows the IOBES extension of the script that circulates alongside
it (``S`` is a one-token chunk; ``E-X`` followed by ``B-X`` or ``S-X`` starts a new chunk); input without
``S`` tags and without an ``E`` tag directly followed by ``B`` scores exactly as in the CoNLL-2000 script.

As in conlleval:

* sentence boundaries (conlleval's blank lines) end chunks: an entity never spans two sentences;
* a chunk is correct when gold and prediction start it at the same token with the same type and end it
  at the same token;
* the accuracy counts tokens whose gold and predicted tags are equal (compared as prefix and type);
* the entity type ``0`` reads as no type (Perl treats the string "0" as false), and chunks without a type
  count in the overall figures but get no ``per_type`` entry (as in the per-type table of later
  conlleval releases).

Unlike conlleval's report, precision, recall and F1 are fractions in [0, 1], not percentages; every
division by zero gives 0.0 (the script's defaults).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TypedDict

__all__ = ["Scores", "TypeScores", "chunks", "score", "write_conlleval_file"]

# conlleval's sentence boundary marker in the first column (its -X- convention).
_BOUNDARY_WORD = "-X-"
_WHITESPACE = re.compile(r"\s")

# endOfChunk: (previous tag, tag) pairs that end a chunk between two tokens.
_END_PAIRS = frozenset(
    [("B", t) for t in ("B", "O", "S")]
    + [("I", t) for t in ("B", "O", "S")]
    + [("E", t) for t in ("B", "E", "I", "O", "S")]
    + [("S", t) for t in ("B", "E", "I", "O", "S")]
)
# startOfChunk: (previous tag, tag) pairs that start a chunk at the current token.
_START_PAIRS = frozenset(
    [(p, "B") for p in ("B", "E", "I", "O", "S")]
    + [(p, "S") for p in ("B", "E", "I", "O", "S")]
    + [(p, "I") for p in ("E", "O", "S")]
    + [(p, "E") for p in ("E", "O", "S")]
)
# Prefixes for which a type change does not end (previous tag) or start (tag) a chunk.
_TYPELESS = frozenset(("O", "."))
# Bracket chunks have length one: they always start and always end.
_BRACKETS = frozenset(("[", "]"))
# What conlleval reads at a sentence boundary: tag "O", no type, not a token.
_OUTSIDE = ("O", "")


class TypeScores(TypedDict):
    """Scores of one entity type."""

    precision: float
    recall: float
    f1: float
    support: int  # gold chunks of this type
    predicted: int  # predicted chunks of this type


class Scores(TypedDict):
    """Result of :func:`score`."""

    precision: float
    recall: float
    f1: float
    accuracy: float  # token accuracy
    per_type: dict[str, TypeScores]  # sorted by type; types seen in gold or in predictions
    num_gold: int  # gold chunks
    num_pred: int  # predicted chunks
    num_correct: int  # correctly predicted chunks
    num_tokens: int


def score(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> Scores:
    """Score predicted tag sequences against gold ones, sentence by sentence, as conlleval does.

    Args:
        gold: one tag sequence per sentence.
        pred: the predicted tags, with the same shape as ``gold``.

    Returns:
        Overall precision, recall, F1 (fractions) and token accuracy, the chunk and token counts, and
        ``per_type`` scores for every type found in gold or predicted chunks (``support`` = gold chunks,
        ``predicted`` = predicted chunks).

    Raises:
        ValueError: ``gold`` and ``pred`` have a different number of sentences, a sentence has a
            different number of gold and predicted tags (the message names the sentence index), or a tag
            is empty or contains whitespace (it could not be written for conlleval).
        TypeError: a sentence is a string rather than a sequence of tags.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")

    found_gold: Counter[str] = Counter()
    found_pred: Counter[str] = Counter()
    correct_chunks: Counter[str] = Counter()
    correct_tags = 0
    tokens = 0

    in_correct = False
    last_correct, last_correct_type = _OUTSIDE
    last_guessed, last_guessed_type = _OUTSIDE
    for (correct, correct_type), (guessed, guessed_type), is_token in _token_stream(gold, pred):
        end_correct = _end_of_chunk(last_correct, correct, last_correct_type, correct_type)
        end_guessed = _end_of_chunk(last_guessed, guessed, last_guessed_type, guessed_type)
        start_correct = _start_of_chunk(last_correct, correct, last_correct_type, correct_type)
        start_guessed = _start_of_chunk(last_guessed, guessed, last_guessed_type, guessed_type)

        if in_correct:
            if end_correct and end_guessed and last_guessed_type == last_correct_type:
                in_correct = False
                correct_chunks[last_correct_type] += 1
            elif end_correct != end_guessed or guessed_type != correct_type:
                in_correct = False
        if start_correct and start_guessed and guessed_type == correct_type:
            in_correct = True
        if start_correct:
            found_gold[correct_type] += 1
        if start_guessed:
            found_pred[guessed_type] += 1
        if is_token:
            if correct == guessed and correct_type == guessed_type:
                correct_tags += 1
            tokens += 1

        last_correct, last_correct_type = correct, correct_type
        last_guessed, last_guessed_type = guessed, guessed_type
    if in_correct:
        correct_chunks[last_correct_type] += 1

    num_gold = sum(found_gold.values())
    num_pred = sum(found_pred.values())
    num_correct = sum(correct_chunks.values())
    precision, recall, f1 = _prf(num_correct, num_pred, num_gold)
    per_type: dict[str, TypeScores] = {}
    for type_ in sorted((found_gold.keys() | found_pred.keys()) - {""}):
        p, r, f = _prf(correct_chunks[type_], found_pred[type_], found_gold[type_])
        per_type[type_] = {
            "precision": p,
            "recall": r,
            "f1": f,
            "support": found_gold[type_],
            "predicted": found_pred[type_],
        }
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": correct_tags / tokens if tokens else 0.0,
        "per_type": per_type,
        "num_gold": num_gold,
        "num_pred": num_pred,
        "num_correct": num_correct,
        "num_tokens": tokens,
    }


def chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The chunks (entities) of one sentence's tags, as :func:`score` counts them: ``(type, start, end)``
    with ``tags[start:end]`` the chunk's tokens, in order.

    The same ``startOfChunk``/``endOfChunk`` rules, so predicted entities are exactly the chunks that the
    scores count (``num_pred``, ``per_type[t]["predicted"]``). A chunk without a type has type ``""``.

    Raises:
        ValueError: a tag is empty or contains whitespace.
    """
    found: list[tuple[str, int, int]] = []
    open_at, open_type = -1, ""
    last, last_type = _OUTSIDE
    for i, tag in enumerate([*tags, None]):  # None: the sentence boundary, which ends any chunk
        cur, cur_type = _OUTSIDE if tag is None else _split_tag(tag, 0)
        if open_at >= 0 and _end_of_chunk(last, cur, last_type, cur_type):
            found.append((open_type, open_at, i))
            open_at = -1
        if tag is not None and _start_of_chunk(last, cur, last_type, cur_type):
            if open_at >= 0:  # a start the rules do not pair with an end: the open chunk ends here
                found.append((open_type, open_at, i))
            open_at, open_type = i, cur_type
        last, last_type = cur, cur_type
    return found


def write_conlleval_file(
    path: str | os.PathLike[str],
    words: Sequence[Sequence[str]],
    gold: Sequence[Sequence[str]],
    pred: Sequence[Sequence[str]],
) -> None:
    """Write ``word gold pred`` lines, with a blank line after each sentence: the input of conlleval.

    The file is UTF-8 with ``\\n`` line ends and single spaces between the columns; feeding it to
    conlleval reproduces :func:`score` on ``gold`` and ``pred``. Words should not contain whitespace; to
    keep the columns aligned, any whitespace character inside a word is written as ``_``, an empty word as
    ``_`` and the word ``-X-`` (conlleval's sentence boundary marker) as ``_-X-``.

    Raises:
        ValueError: the three arguments differ in their number of sentences, or a sentence in the number
            of words or tags (the message names the sentence index), or a tag is empty or contains
            whitespace.
        OSError: the file cannot be written.
    """
    if not len(words) == len(gold) == len(pred):
        raise ValueError(
            f"words, gold and pred have {len(words)}, {len(gold)} and {len(pred)} sentences: they must match"
        )
    lines: list[str] = []
    for index, (sentence_words, sentence_gold, sentence_pred) in enumerate(
        zip(words, gold, pred, strict=True)
    ):
        if not len(sentence_words) == len(sentence_gold) == len(sentence_pred):
            raise ValueError(
                f"sentence {index}: {len(sentence_words)} words, {len(sentence_gold)} gold tags and "
                f"{len(sentence_pred)} predicted tags"
            )
        for word, gold_tag, pred_tag in zip(sentence_words, sentence_gold, sentence_pred, strict=True):
            _check_tag(gold_tag, index)
            _check_tag(pred_tag, index)
            lines.append(f"{_conlleval_word(word)} {gold_tag} {pred_tag}\n")
        lines.append("\n")
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(lines)


def _token_stream(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]
) -> Iterator[tuple[tuple[str, str], tuple[str, str], bool]]:
    """Yield ((gold prefix, type), (pred prefix, type), is_token) for every token, then one boundary
    (not a token) after every sentence: what conlleval reads from a file written by write_conlleval_file.
    """
    parsed: dict[str, tuple[str, str]] = {}
    for index, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if isinstance(gold_tags, str) or isinstance(pred_tags, str):
            raise TypeError(f"sentence {index}: expected a sequence of tags, got a string")
        if len(gold_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {index}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted tags"
            )
        for gold_tag, pred_tag in zip(gold_tags, pred_tags, strict=True):
            gold_parts = parsed.get(gold_tag)
            if gold_parts is None:
                gold_parts = parsed[gold_tag] = _split_tag(gold_tag, index)
            pred_parts = parsed.get(pred_tag)
            if pred_parts is None:
                pred_parts = parsed[pred_tag] = _split_tag(pred_tag, index)
            yield gold_parts, pred_parts, True
        yield _OUTSIDE, _OUTSIDE, False


def _split_tag(tag: str, index: int) -> tuple[str, str]:
    """Split a tag as conlleval does (``/^([^-]*)-(.*)$/``; a type "0" is Perl-false, so no type)."""
    _check_tag(tag, index)
    prefix, hyphen, type_ = tag.partition("-")
    if not hyphen or type_ == "0":
        return prefix, ""
    return prefix, type_


def _check_tag(tag: str, index: int) -> None:
    if not isinstance(tag, str) or not tag or _WHITESPACE.search(tag):
        raise ValueError(f"sentence {index}: tag {tag!r} is not a non-empty string without whitespace")


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """conlleval's endOfChunk: did a chunk end between the previous and the current token?"""
    return (
        (prev_tag, tag) in _END_PAIRS
        or (prev_tag not in _TYPELESS and prev_type != type_)
        or prev_tag in _BRACKETS
    )


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """conlleval's startOfChunk: did a chunk start at the current token?"""
    return (
        (prev_tag, tag) in _START_PAIRS or (tag not in _TYPELESS and prev_type != type_) or tag in _BRACKETS
    )


def _prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _conlleval_word(word: str) -> str:
    if not word:
        return "_"
    if word == _BOUNDARY_WORD:
        return "_" + word
    return _WHITESPACE.sub("_", word)
