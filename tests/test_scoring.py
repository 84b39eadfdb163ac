"""Tests for raytag.trainer.scoring, checked against PyPI's ``conlleval`` port and hand-counted cases."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import conlleval
import pytest

from raytag.trainer.scoring import chunks, score, write_conlleval_file

Tags = list[list[str]]


def _reference(gold: Tags, pred: Tags) -> dict[str, Any]:
    """PyPI conlleval on the same sentences, each followed by a boundary line.

    The boundary is conlleval's ``-X-`` line rather than a blank line: PyPI conlleval 0.2 takes the
    number of columns from the first line, so an empty first sentence would make it reject the file.
    """
    lines: list[str] = []
    for i, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        lines.extend(f"w{i}.{j} {g} {p}" for j, (g, p) in enumerate(zip(gold_tags, pred_tags, strict=True)))
        lines.append("-X- O O")
    return conlleval.evaluate(lines)


def _assert_prf(ours: dict[str, Any], reference: dict[str, Any]) -> None:
    stats, evals = reference["stats"], reference["evals"]
    # PyPI conlleval reports precision 1.0 when nothing is predicted; conlleval.pl (and score) report 0.
    expected_precision = 0.0 if stats["pred"] == 0 else evals["prec"]
    assert ours["precision"] == expected_precision
    assert ours["recall"] == evals["rec"]
    assert ours["f1"] == evals["f1"]


def _assert_matches_conlleval(gold: Tags, pred: Tags) -> dict[str, Any]:
    ours: dict[str, Any] = dict(score(gold, pred))
    reference = _reference(gold, pred)
    chunks = reference["overall"]["chunks"]
    assert (ours["num_gold"], ours["num_pred"], ours["num_correct"]) == (
        chunks["stats"]["gold"],
        chunks["stats"]["pred"],
        chunks["stats"]["correct"],
    )
    _assert_prf(ours, chunks)
    tags = reference["overall"]["tags"]["stats"]
    assert ours["num_tokens"] == tags["gold"]
    assert ours["accuracy"] == (tags["correct"] / tags["gold"] if tags["gold"] else 0.0)

    slots = reference["slots"]["chunks"]
    assert sorted(ours["per_type"]) == sorted(slots)
    for type_, scores in ours["per_type"].items():
        slot = slots[type_]
        assert (scores["support"], scores["predicted"]) == (slot["stats"]["gold"], slot["stats"]["pred"])
        _assert_prf(dict(scores), slot)
    return ours


# (gold, pred, (gold chunks, predicted chunks, correct chunks)), counted by hand.
CASES: dict[str, tuple[Tags, Tags, tuple[int, int, int]]] = {
    "exact iob2": ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]], (2, 2, 2)),
    "I- after O starts a chunk": ([["O", "I-PER", "I-PER", "O"]], [["O", "B-PER", "I-PER", "O"]], (1, 1, 1)),
    "I- at sentence start": ([["I-PER", "O"]], [["B-PER", "O"]], (1, 1, 1)),
    "I-X after B-Y starts X": ([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]], (1, 2, 0)),
    "B-X after I-X splits": ([["B-PER", "I-PER", "B-PER"]], [["B-PER", "I-PER", "I-PER"]], (2, 1, 0)),
    "consecutive B-X B-X": ([["B-ORG", "B-ORG"]], [["B-ORG", "I-ORG"]], (2, 1, 0)),
    "iob1 B between same type": (
        [["I-PER", "I-PER", "B-PER", "I-PER"]],
        [["B-PER", "I-PER", "B-PER", "I-PER"]],
        (2, 2, 2),
    ),
    "iob1 type change inside I run": ([["I-PER", "I-LOC", "O"]], [["I-PER", "I-PER", "O"]], (2, 1, 0)),
    "entity at sentence end": ([["O", "B-LOC", "I-LOC"]], [["O", "B-LOC", "I-LOC"]], (1, 1, 1)),
    "entity at sentence end, pred too short": ([["O", "B-LOC", "I-LOC"]], [["O", "B-LOC", "O"]], (1, 1, 0)),
    "pred runs on": ([["B-PER", "O"]], [["B-PER", "I-PER"]], (1, 1, 0)),
    "wrong type same span": ([["B-PER", "I-PER"]], [["B-ORG", "I-ORG"]], (1, 1, 0)),
    "entity across sentence boundary is split": (
        [["O", "B-PER"], ["I-PER", "O"]],
        [["O", "B-PER"], ["B-PER", "O"]],
        (2, 2, 2),
    ),
    "boundary ends a correct chunk": ([["B-PER"], ["I-PER"]], [["B-PER"], ["O"]], (2, 1, 1)),
    "type only in predictions": ([["B-PER", "O"]], [["B-PER", "B-MISC"]], (1, 2, 1)),
    "all O": ([["O", "O"], ["O"]], [["O", "O"], ["O"]], (0, 0, 0)),
    "empty predictions": ([["B-PER", "I-PER", "O", "B-LOC"]], [["O", "O", "O", "O"]], (2, 0, 0)),
    "nothing in gold": ([["O", "O"]], [["B-LOC", "O"]], (0, 1, 0)),
    "empty sentences": ([[], ["B-PER"], []], [[], ["B-PER"], []], (1, 1, 1)),
    "no sentences": ([], [], (0, 0, 0)),
    "hyphen in type": ([["B-ART-WORK", "I-ART-WORK"]], [["B-ART-WORK", "I-ART-WORK"]], (1, 1, 1)),
    "iobes": (
        [["S-PER", "B-LOC", "E-LOC", "S-LOC", "O"]],
        [["S-PER", "B-LOC", "E-LOC", "B-LOC", "I-LOC"]],
        (3, 3, 2),
    ),
    "iobes S S": ([["S-PER", "S-PER"]], [["B-PER", "E-PER"]], (2, 1, 0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_crafted_cases_match_conlleval(name: str) -> None:
    gold, pred, expected = CASES[name]
    ours = _assert_matches_conlleval(gold, pred)
    assert (ours["num_gold"], ours["num_pred"], ours["num_correct"]) == expected


def test_counts_and_fractions() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-PER"], ["B-ORG", "O"]]
    result = score(gold, pred)
    assert result["num_tokens"] == 6
    assert result["accuracy"] == 5 / 6
    assert result["precision"] == result["recall"] == 2 / 3
    assert result["f1"] == pytest.approx(2 / 3)
    assert list(result["per_type"]) == ["LOC", "ORG", "PER"]
    assert result["per_type"]["LOC"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
        "predicted": 0,
    }
    assert result["per_type"]["PER"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3)} | {
        "support": 1,
        "predicted": 2,
    }


def test_zero_divisions_give_zero() -> None:
    result = score([["O"]], [["O"]])
    assert (result["precision"], result["recall"], result["f1"], result["accuracy"]) == (0.0, 0.0, 0.0, 1.0)
    assert result["per_type"] == {}
    empty = score([], [])
    assert (empty["accuracy"], empty["num_tokens"], empty["f1"]) == (0.0, 0, 0.0)


def test_type_only_in_predictions_is_reported() -> None:
    result = score([["B-PER", "O"]], [["B-PER", "B-MISC"]])
    assert result["per_type"]["MISC"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
        "predicted": 1,
    }


# Where the Perl script and PyPI's port disagree (prefixes ".", "[", "]" next to B/E/S, and the type "0"),
# score follows the Perl script; these counts are what conlleval.pl prints.
PERL_ONLY_CASES: list[tuple[Tags, Tags, tuple[int, int, int, int, int]]] = [
    # (gold, pred, (tokens, correct tags, gold chunks, predicted chunks, correct chunks))
    ([[".-A", "B-A"]], [[".-A", "B-A"]], (2, 2, 0, 0, 0)),
    ([["]-A", "B-A"]], [["B-A", "B-A"]], (2, 1, 1, 2, 1)),
    ([["[-A", ".-A", ".-A", "O"]], [["[-A", ".-A", ".-A", "O"]], (4, 4, 1, 1, 1)),
    ([["E-A", ".-A", "O"]], [["E-A", "O", "O"]], (3, 2, 1, 1, 0)),
    ([["S-A", "]-A"]], [["S-A", "O"]], (2, 1, 2, 1, 0)),
    ([["B-0", "I-0", "O"]], [["B-0", "I-0", "O"]], (3, 3, 1, 1, 1)),
]


@pytest.mark.parametrize(("gold", "pred", "expected"), PERL_ONLY_CASES)
def test_perl_semantics_for_other_prefixes(gold: Tags, pred: Tags, expected: tuple[int, ...]) -> None:
    result = score(gold, pred)
    tokens = result["num_tokens"]
    counts = (tokens, round(result["accuracy"] * tokens), result["num_gold"], result["num_pred"])
    assert counts + (result["num_correct"],) == expected


def test_type_zero_counts_overall_but_has_no_per_type_entry() -> None:
    result = score([["B-0", "O"]], [["B-0", "O"]])
    assert (result["num_gold"], result["num_correct"], result["f1"]) == (1, 1, 1.0)
    assert result["per_type"] == {}


def test_random_sequences_match_conlleval() -> None:
    rng = random.Random(20240601)
    alphabet = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-MISC", "B-MISC", "E-PER", "S-LOC"]
    iob_only = [tag for tag in alphabet if tag[0] in "BIO"]
    for case in range(400):
        tags = iob_only if case % 2 else alphabet
        gold = [[rng.choice(tags) for _ in range(rng.randint(0, 9))] for _ in range(rng.randint(0, 5))]
        # Half the predictions are a noisy copy of gold, so that correct chunks are common.
        if case % 4 < 2:
            pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in sentence] for sentence in gold]
        else:
            pred = [[rng.choice(tags) for _ in sentence] for sentence in gold]
        _assert_matches_conlleval(gold, pred)


def test_length_mismatch_names_the_sentence() -> None:
    with pytest.raises(ValueError, match=r"^sentence 1: 2 gold tags but 1 predicted tags$"):
        score([["O"], ["B-PER", "O"]], [["O"], ["B-PER"]])
    with pytest.raises(ValueError, match=r"gold has 2 sentences but pred has 1"):
        score([["O"], ["O"]], [["O"]])


def test_bad_tags_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"sentence 0: tag 'B PER'"):
        score([["B PER"]], [["O"]])
    with pytest.raises(ValueError, match=r"sentence 0: tag ''"):
        score([["O"]], [[""]])
    with pytest.raises(TypeError, match=r"sentence 0"):
        score(["B-PER"], ["B-PER"])


def test_write_conlleval_file_format(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    write_conlleval_file(
        path,
        [["New York", "is"], ["", "-X-", "a\tb"]],
        [["B-LOC", "O"], ["O", "O", "B-PER"]],
        [["B-LOC", "B-PER"], ["O", "O", "O"]],
    )
    assert path.read_text(encoding="utf-8") == (
        "New_York B-LOC B-LOC\nis O B-PER\n\n_ O O\n_-X- O O\na_b B-PER O\n\n"
    )


def test_write_conlleval_file_reproduces_score(tmp_path: Path) -> None:
    rng = random.Random(7)
    alphabet = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-ORG"]
    gold = [[rng.choice(alphabet) for _ in range(rng.randint(0, 12))] for _ in range(60)]
    pred = [[t if rng.random() < 0.6 else rng.choice(alphabet) for t in sentence] for sentence in gold]
    # Words that need escaping to keep conlleval's columns and sentences intact.
    specials = ["New York", "", "-X-", "x\u00a0y", "Ünïcödé"]
    words = [[rng.choice(specials) if rng.random() < 0.2 else f"w{j}" for j in range(len(s))] for s in gold]
    path = tmp_path / "eval.txt"
    write_conlleval_file(path, words, gold, pred)

    with open(path, encoding="utf-8") as handle:
        reference = conlleval.evaluate(handle)
    ours = score(gold, pred)
    chunks = reference["overall"]["chunks"]
    assert (ours["num_gold"], ours["num_pred"], ours["num_correct"]) == (
        chunks["stats"]["gold"],
        chunks["stats"]["pred"],
        chunks["stats"]["correct"],
    )
    assert ours["num_gold"] > 0 and ours["num_correct"] > 0
    _assert_prf(dict(ours), chunks)
    tags = reference["overall"]["tags"]["stats"]
    assert (ours["num_tokens"], ours["accuracy"]) == (tags["gold"], tags["correct"] / tags["gold"])


def test_write_conlleval_file_checks_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^sentence 1: 1 words, 2 gold tags and 2 predicted tags$"):
        write_conlleval_file(tmp_path / "x.txt", [["a"], ["b"]], [["O"], ["O", "O"]], [["O"], ["O", "O"]])
    with pytest.raises(ValueError, match=r"1, 2 and 2 sentences"):
        write_conlleval_file(tmp_path / "x.txt", [["a"]], [["O"], ["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match=r"sentence 0: tag 'B-A B'"):
        write_conlleval_file(tmp_path / "x.txt", [["a"]], [["B-A B"]], [["O"]])
    assert not (tmp_path / "x.txt").exists()


def test_chunks_are_the_chunks_score_counts() -> None:
    """`chunks` (predict's entity decoder) finds exactly the chunks `score` counts: their number and
    types for any tags, and their spans for typed IOB2/IOBES tags, where a chunk is correct exactly
    when gold and prediction have it with the same span and type; and IOB2 spans equal seqeval's."""
    from collections import Counter

    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(7)
    iob2 = ["O"] + [f"{p}-{t}" for p in "BI" for t in ("PER", "ORG", "LOC")]
    iobes = iob2 + [f"{p}-{t}" for p in "ES" for t in ("PER", "ORG")]
    odd = iobes + ["B", "I", "[", "]", ".-X", "B-0"]
    for alphabet in (iob2, iobes, odd):
        for _ in range(1500):
            gold = [[rng.choice(alphabet) for _ in range(rng.randint(0, 9))] for _ in range(3)]
            pred = [[rng.choice(alphabet) for _ in sentence] for sentence in gold]
            s = score(gold, pred)
            found = [chunks(sentence) for sentence in pred]
            assert sum(map(len, found)) == s["num_pred"], pred
            typed = Counter(t for sentence in found for t, _, _ in sentence if t)
            assert typed == Counter({t: v["predicted"] for t, v in s["per_type"].items() if v["predicted"]})
            for sentence in found:
                assert all(0 <= a < b for _, a, b in sentence)
                assert all(b1 <= a2 for (_, _, b1), (_, a2, _) in zip(sentence, sentence[1:], strict=False))
            if alphabet is odd:
                continue  # conlleval's correct-chunk state machine has its own quirks on bracket tags
            both = sum(len(set(chunks(g)) & set(chunks(p))) for g, p in zip(gold, pred, strict=True))
            assert both == s["num_correct"], (gold, pred)
            if alphabet is iob2:
                for sentence in pred:
                    assert chunks(sentence) == [(t, a, b + 1) for t, a, b in get_entities(sentence)]


def test_chunks_examples() -> None:
    assert chunks(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG", "I-ORG", "O"]) == [
        ("PER", 0, 2),
        ("LOC", 3, 4),
        ("LOC", 4, 5),
        ("ORG", 5, 7),  # a stray I- starts a chunk, as conlleval reads it
    ]
    assert chunks([]) == [] and chunks(["O", "O"]) == []
    assert chunks(["I-MISC"]) == [("MISC", 0, 1)]
