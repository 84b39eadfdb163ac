"""Tests for raytag.trainer.conll: the CoNLL column reader."""

from __future__ import annotations

import io
import pickle
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from raytag.trainer.conll import (
    ConllError,
    ConllFile,
    ConllOptions,
    Sentence,
    entity_types,
    label_list,
    parse_conll_lines,
    read_conll,
)

PATH = "data/x.txt"


def parse(text: str, **kwargs: Any) -> ConllFile:
    return parse_conll_lines(text.split("\n"), PATH, ConllOptions(**kwargs))


def tags_of(conll: ConllFile) -> list[tuple[str, ...]]:
    return [sentence.tags for sentence in conll.sentences]


def raises_at(line: int | None, message: str, path: str = PATH) -> Any:
    """pytest.raises for a ConllError whose whole message is "path:line: message" (or "path: message")."""
    where = path if line is None else f"{path}:{line}"
    return pytest.raises(ConllError, match="^" + re.escape(f"{where}: {message}") + "$")


# --- format ------------------------------------------------------------------------------------------


def test_columns_word_first_tag_last() -> None:
    conll = parse("EU NNP B-NP B-ORG\nrejects\tVBZ\tB-VP  O\n\nPeter  \t B-PER \n")
    assert conll.sentences == [
        Sentence(("EU", "rejects"), ("B-ORG", "O"), 1),
        Sentence(("Peter",), ("B-PER",), 4),
    ]
    assert (conll.path, conll.scheme, conll.repaired, conll.docstarts) == (PATH, "iob2", 0, 0)


def test_words_are_kept_as_they_are() -> None:
    # Only spaces and tabs separate columns: a no-break space belongs to the word.
    conll = parse("Ünïcödé O\n10\u00a0000 O\n-X- O\n\u00ab O")
    assert conll.sentences[0].words == ("Ünïcödé", "10\u00a0000", "-X-", "\u00ab")


def test_whitespace_only_lines_end_sentences() -> None:
    conll = parse("a O\n \t \nb O\n\n\n   \nc O\n")
    assert [s.words for s in conll.sentences] == [("a",), ("b",), ("c",)]
    assert [s.line for s in conll.sentences] == [1, 3, 7]


def test_docstart_separates_documents_and_is_no_token() -> None:
    text = (
        "-DOCSTART- -X- -X- O\n"  # CoNLL-2003 style, followed by a blank line
        "\n"
        "EU NNP B-NP B-ORG\n"
        "-DOCSTART- -DOCSTART- O\n"  # CoNLL-2002 Dutch style: directly ends the sentence
        "De Art O\n"
        "\n"
        "-DOCSTART-\n"  # one column: still a document separator, not a one-column error
        "x O\n"
        "-DOCSTART- -X- O\n"
    )
    conll = parse(text)
    assert [(s.words, s.line) for s in conll.sentences] == [(("EU",), 3), (("De",), 5), (("x",), 8)]
    assert conll.docstarts == 4


def test_lines_with_line_ends_are_accepted() -> None:
    conll = parse_conll_lines(io.StringIO("a O\r\nb B-PER\r\n\r\nc O\n"), PATH)
    assert [(s.words, s.tags, s.line) for s in conll.sentences] == [
        (("a", "b"), ("O", "B-PER"), 1),
        (("c",), ("O",), 4),
    ]


def test_read_conll_crlf_bom_and_lone_cr(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"\xef\xbb\xbfa X O\r\nb X B-PER\r\n\r\nc X O\r\n")
    conll = read_conll(path)
    assert conll.path == str(path)
    assert [(s.words, s.tags, s.line) for s in conll.sentences] == [
        (("a", "b"), ("O", "B-PER"), 1),
        (("c",), ("O",), 4),
    ]
    old_mac = tmp_path / "cr.txt"
    old_mac.write_bytes(b"a O\rb O\r\rc O")
    assert [(s.words, s.line) for s in read_conll(old_mac).sentences] == [(("a", "b"), 1), (("c",), 4)]


def test_require_tags_false_reads_words_only() -> None:
    conll = parse("Hello\nworld\n\nsecond sentence X\nbad-tag-ignored E-PER\n", require_tags=False)
    assert [(s.words, s.tags) for s in conll.sentences] == [
        (("Hello", "world"), ()),
        (("second", "bad-tag-ignored"), ()),
    ]
    assert (conll.scheme, conll.repaired) == ("iob2", 0)


def test_max_sentences_reads_the_first_n() -> None:
    text = "a O\n\nb B-PER\n\nc O\n\nthis-line-is-never-read E-PER\n"
    conll = parse(text, max_sentences=2)
    assert [s.words for s in conll.sentences] == [("a",), ("b",)]
    assert [s.words for s in parse(text[: text.index("this")], max_sentences=5).sentences] == [
        ("a",),
        ("b",),
        ("c",),
    ]
    with pytest.raises(ValueError, match="max_sentences"):
        parse(text, max_sentences=0)


# --- tag schemes -------------------------------------------------------------------------------------


def test_iob1_is_converted_to_iob2() -> None:
    text = "A I-PER\nB I-PER\nC B-PER\nD I-PER\nE O\nF I-LOC\nG I-ORG\nH I-ORG"
    conll = parse(text, tag_scheme="iob1")
    assert tags_of(conll) == [("B-PER", "I-PER", "B-PER", "I-PER", "O", "B-LOC", "B-ORG", "I-ORG")]
    assert (conll.scheme, conll.repaired) == ("iob1", 0)


def test_auto_detects_iob1() -> None:
    # Three entities start with I-, one with B- (after O: invalid IOB1, but still B-).
    text = "a I-PER\nb I-PER\nc B-PER\n\nd I-LOC\ne O\nf B-ORG\n\ng I-MISC\n"
    conll = parse(text)
    assert conll.scheme == "iob1"
    assert conll.repaired == 0
    assert tags_of(conll) == [("B-PER", "I-PER", "B-PER"), ("B-LOC", "O", "B-ORG"), ("B-MISC",)]


def test_auto_detects_iob2_and_repairs_stray_i() -> None:
    text = "a B-PER\nb I-PER\nc O\nd I-LOC\n\ne B-ORG\n"
    conll = parse(text)
    assert conll.scheme == "iob2"
    assert conll.repaired == 1
    assert tags_of(conll) == [("B-PER", "I-PER", "O", "B-LOC"), ("B-ORG",)]


def test_auto_ties_and_no_entities_are_iob2() -> None:
    assert parse("a I-PER\nb O\nc B-LOC").scheme == "iob2"
    assert parse("a O\nb O").scheme == "iob2"


def test_stray_i_repaired_and_counted_in_iob2() -> None:
    # At the sentence start, after O, and after another type.
    text = "a I-PER\nb O\nc I-LOC\nd I-LOC\n\ne B-PER\nf I-ORG\n"
    conll = parse(text, tag_scheme="iob2")
    assert tags_of(conll) == [("B-PER", "O", "B-LOC", "I-LOC"), ("B-PER", "B-ORG")]
    assert (conll.scheme, conll.repaired) == ("iob2", 3)


def test_strict_refuses_stray_i_at_its_line() -> None:
    text = "a B-PER\nb I-PER\n\nc O\nd B-PER\ne I-LOC\n"
    with raises_at(
        6,
        "tag 'I-LOC' starts an entity in IOB2 input (use data.tag_scheme: iob1 if the file is IOB1, "
        "or data.strict: false to repair it)",
    ):
        parse(text, strict=True)
    valid = "a B-PER\nb I-PER\nc B-PER\nd O\n"
    assert parse(valid, strict=True).repaired == 0
    # strict concerns IOB2 input: IOB1 entities start with I- by design.
    assert tags_of(parse("a I-PER\nb I-PER", tag_scheme="iob1", strict=True)) == [("B-PER", "I-PER")]


def test_invalid_tag_scheme() -> None:
    with pytest.raises(ValueError, match="tag_scheme must be one of auto, iob1, iob2, got 'bio'"):
        parse("a O", tag_scheme="bio")


# --- errors name the file and the line ---------------------------------------------------------------


@pytest.mark.parametrize("tag", ["E-PER", "S-LOC", "PER", "B-", "I-", "o", "B_PER", "BPER", "U-MISC"])
def test_tag_outside_iob_scheme(tag: str) -> None:
    with raises_at(3, f"tag '{tag}' is not in the IOB1/IOB2 scheme (expected O, B-TYPE or I-TYPE)"):
        parse(f"a O\n\nb X {tag}\nc O\n")


def test_one_column_line() -> None:
    with raises_at(4, "expected at least 2 columns (word ... tag), got 1: 'word'"):
        parse("a O\nb O\n\n  word \nc O\n")


def test_bad_utf8_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"a O\r\nb O\r\n\r\nc\xff O\n")
    with raises_at(4, "not valid UTF-8 (byte 0xff at column 2)", path=str(path)) as info:
        read_conll(path)
    assert (info.value.path, info.value.line) == (str(path), 4)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a O\nLe\u00f3n B-LOC\n".encode("latin-1"))
    with raises_at(2, "not valid UTF-8 (byte 0xf3 at column 3)", path=str(latin1)):
        read_conll(latin1)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf", b"-DOCSTART- -X- O\n\n"])
def test_no_sentences(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with raises_at(None, "no sentences found", path=str(path)) as info:
        read_conll(path)
    assert info.value.line is None


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.txt"
    with raises_at(None, "file not found", path=str(path)):
        read_conll(path)
    with raises_at(None, "is a directory, not a file", path=str(tmp_path)):
        read_conll(tmp_path)


def test_label_outside_label_set() -> None:
    labels = ["O", "B-PER", "I-PER"]
    with raises_at(5, "label 'B-LOC' is not in the label set (O, B-PER, I-PER)"):
        parse("a B-PER\nb I-PER\n\nc O\nd B-LOC\n", labels=labels)
    # Labels are checked after conversion to IOB2: the repaired stray I-PER is B-PER.
    conll = parse("a O\nb I-PER\n\nc B-PER\n", labels=["O", "B-PER"])
    assert (tags_of(conll), conll.repaired) == ([("O", "B-PER"), ("B-PER",)], 1)
    with pytest.raises(TypeError, match="labels"):
        parse("a O", labels="O")


def test_conll_error_is_a_picklable_value_error() -> None:
    error = ConllError("data/x.txt", 17, "boom")
    assert isinstance(error, ValueError)
    assert str(error) == "data/x.txt:17: boom"
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path, copy.line, copy.reason) == ("data/x.txt:17: boom", "data/x.txt", 17, "boom")
    assert str(ConllError("data/x.txt", None, "no sentences found")) == "data/x.txt: no sentences found"


# --- label sets --------------------------------------------------------------------------------------


def test_label_list_order() -> None:
    sentences = [
        Sentence(("a", "b"), ("B-PER", "I-PER"), 1),
        Sentence(("c", "d", "e"), ("B-MISC", "B-LOC", "I-LOC"), 3),
        Sentence(("f",), ("B-ORG",), 7),
    ]
    expected = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert label_list(sentences) == expected
    assert label_list(reversed(sentences)) == expected
    assert label_list([Sentence(("x",), ("O",), 1)]) == ["O"]
    assert label_list([Sentence(("x",), (), 1)]) == ["O"]


def test_entity_types() -> None:
    assert entity_types(["O", "I-PER", "B-LOC", "B-PER", "B-ART-WORK"]) == ["ART-WORK", "LOC", "PER"]
    assert entity_types(["O"]) == []
    with pytest.raises(ValueError, match="'E-PER'"):
        entity_types(["O", "E-PER"])


# --- real data ---------------------------------------------------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# From ../shared/data/README.md: sentences, tokens, entities (PER, LOC, ORG, MISC), stray I- repaired.
SHARED_FILES = {
    "conll2003/train.txt": (14041, 203621, (6600, 7140, 6321, 3438), 0),
    "conll2003/validation.txt": (3250, 51362, (1842, 1837, 1341, 922), 0),
    "conll2003/test.txt": (3453, 46435, (1617, 1668, 1661, 702), 0),
    "conll2002/es/train.txt": (8323, 264715, (4321, 4914, 7390, 2173), 1),
    "conll2002/es/validation.txt": (1915, 52923, (1222, 985, 1700, 445), 1),
    "conll2002/nl/train.txt": (15806, 202644, (4716, 3208, 2082, 3338), 0),
    "conll2002/nl/validation.txt": (2895, 37687, (703, 479, 686, 748), 0),
}


@pytest.mark.shared
@pytest.mark.parametrize("name", list(SHARED_FILES))
def test_shared_corpora_counts(name: str) -> None:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"../shared/data not present: {path} does not exist")
    sentences, tokens, entities, repaired = SHARED_FILES[name]
    conll = read_conll(path)
    assert len(conll.sentences) == sentences
    assert sum(len(s.words) for s in conll.sentences) == tokens
    assert all(len(s.words) == len(s.tags) for s in conll.sentences)
    assert (conll.scheme, conll.repaired) == ("iob2", repaired)
    starts = Counter(tag[2:] for s in conll.sentences for tag in s.tags if tag.startswith("B-"))
    assert tuple(starts[t] for t in ("PER", "LOC", "ORG", "MISC")) == entities
    assert label_list(conll.sentences) == [
        "O",
        "B-LOC",
        "I-LOC",
        "B-MISC",
        "I-MISC",
        "B-ORG",
        "I-ORG",
        "B-PER",
        "I-PER",
    ]
    if name.startswith("conll2002/es/"):
        with pytest.raises(ConllError, match=r"^.+:\d+: tag 'I-[A-Z]+' starts an entity in IOB2 input"):
            read_conll(path, ConllOptions(strict=True))
