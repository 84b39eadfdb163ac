"""Raw text to CoNLL-style words with character spans (trainer/words.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from raytag.trainer.words import split_words, word_spans

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def assert_spans_cover(line: str) -> list[str]:
    """Every span slices its own word, spans are in order and disjoint, hold no whitespace, and
    together hold every non-whitespace character of the line."""
    spans = word_spans(line)
    words = [line[a:b] for a, b in spans]
    assert all(0 <= a < b <= len(line) for a, b in spans), spans
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False)), spans
    assert not any(ch.isspace() for w in words for ch in w), words
    assert "".join(words) == "".join(ch for ch in line if not ch.isspace()), (line, words)
    # Only whitespace lies between (and around) the spans.
    gaps = [line[b:a] for (_, b), (a, _) in zip([(0, 0), *spans], [*spans, (len(line), 0)], strict=True)]
    assert all(g.isspace() or g == "" for g in gaps), gaps
    return words


# One line per example reads better than one line per word.
# fmt: off
SPLITS = {
    # punctuation is a word of its own, as in CoNLL
    "Angela Merkel visited Paris on Monday with officials from Siemens.": [
        "Angela", "Merkel", "visited", "Paris", "on", "Monday", "with", "officials", "from", "Siemens", ".",
    ],
    '"Hello," she said; (then) left!': [
        '"', "Hello", ",", '"', "she", "said", ";", "(", "then", ")", "left", "!",
    ],
    # curly quotes and apostrophes, guillemets
    "“Quoted” ‘single’ «Paris»": ["“", "Quoted", "”", "‘", "single", "’", "«", "Paris", "»"],
    # clitics split as CoNLL writes them (Germany 's, do n't), names with apostrophes kept
    "Germany's chancellor didn't go; O'Brien's can't. I'm fine, parents' day.": [
        "Germany", "'s", "chancellor", "did", "n't", "go", ";", "O'Brien", "'s", "ca", "n't", ".", "I", "'m",
        "fine", ",", "parents", "'", "day", ".",
    ],
    "Germany’s team don’t": ["Germany", "’s", "team", "do", "n’t"],
    "Germany 's team do n't": ["Germany", "'s", "team", "do", "n't"],  # already tokenised: unchanged
    "O'Neill of Nuku'alofa rock'n'roll gov't": ["O'Neill", "of", "Nuku'alofa", "rock'n'roll", "gov't"],
    # abbreviations and initials keep their periods; a sentence's period does not stick to a word
    "The U.S. team met U.N. staff at 9 a.m. in Washington. Then they left.": [
        "The", "U.S.", "team", "met", "U.N.", "staff", "at", "9", "a.m.", "in", "Washington", ".", "Then",
        "they", "left", ".",
    ],
    "Siemens Inc. vs. Acme Corp. and Mr. J. K. Smith": [
        "Siemens", "Inc.", "vs.", "Acme", "Corp.", "and", "Mr.", "J.", "K.", "Smith",
    ],
    # numbers, dates, scores, fractions, and hyphenated words stay whole
    "Shares rose 3.5 percent to 1,000 on 1996-08-28, won 6-4 at 10:30 with 1/2 S&P one-day Inzamam-ul-Haq": [
        "Shares", "rose", "3.5", "percent", "to", "1,000", "on", "1996-08-28", ",", "won", "6-4", "at",
        "10:30", "with", "1/2", "S&P", "one-day", "Inzamam-ul-Haq",
    ],
    "It cost US$5 (or C$ 7), 5% more... -- in 1996.": [
        "It", "cost", "US$", "5", "(", "or", "C$", "7", ")", ",", "5", "%", "more", "...", "--", "in",
        "1996", ".",
    ],
    "1. Tiger Woods 69": ["1.", "Tiger", "Woods", "69"],  # a ranked list's number, as CoNLL writes it
    # non-Latin scripts: words with their combining marks, the script's own punctuation apart
    "Он приехал в Москву. Затем ушёл!": ["Он", "приехал", "в", "Москву", ".", "Затем", "ушёл", "!"],
    "Η Αθήνα, η Ελλάδα; Ναι.": ["Η", "Αθήνα", ",", "η", "Ελλάδα", ";", "Ναι", "."],
    "ذهب إلى القاهرة، ثم عاد؟": ["ذهب", "إلى", "القاهرة", "،", "ثم", "عاد", "؟"],
    "वह दिल्ली गया। फिर": ["वह", "दिल्ली", "गया", "।", "फिर"],
    "他在北京。": ["他", "在", "北", "京", "。"],  # Han characters one by one
    "می‌خواهم": ["می\u200cخواهم"],  # a zero-width non-joiner inside a Persian word
}
# fmt: on


@pytest.mark.parametrize("line", list(SPLITS))
def test_expected_words(line: str) -> None:
    assert assert_spans_cover(line) == SPLITS[line]
    assert split_words(line) == SPLITS[line]


def test_spans_are_character_offsets_into_the_line() -> None:
    line = "  Angela Merkel visited Paris on Monday with officials from Siemens.\t"
    spans = word_spans(line)
    assert spans[0] == (2, 8)
    assert spans[-2:] == [(60, 67), (67, 68)]  # Siemens, then the period
    # characters, not bytes: a word after multi-byte characters starts at its character index
    line = "Москва и Siemens."
    assert word_spans(line)[2] == (9, 16) and line[9:16] == "Siemens"


def test_blank_and_whitespace_only_lines_have_no_words() -> None:
    assert word_spans("") == [] and word_spans(" \t\u3000\u2028\x1c ") == []


def test_random_text_is_covered_exactly() -> None:
    # Characters from many classes, whitespace (including what only str.isspace counts) among them.
    pool = (
        "aZé ßøЖжΩω北京東京ひらカタ한국अकि्ाعربيةْ"
        "0123456789٣५.,;:!?'’‘\"“”«»()[]{}-‐–—/\\&%$€@#*_+=<>|~^`…。、，「」"
        " \t\u00a0\u2009\u3000\u2028\x1c\x1f\u200b\u200c\u200d\u0301\u0308\ufe0f😀👍🏽"
    )
    rng = random.Random(0)
    for _ in range(3000):
        assert_spans_cover("".join(rng.choice(pool) for _ in range(rng.randint(0, 40))))


@pytest.mark.shared
def test_conll2003_words_stay_whole() -> None:
    """Each CoNLL-2003 validation token, followed by a capitalised word, comes back as one word
    (the rest: +44 phone codes, .500 averages, U.S.-led and the like)."""
    path = SHARED_DATA / "conll2003" / "validation.txt"
    if not path.exists():
        pytest.skip(f"../shared/data not present: {path} does not exist")
    tokens = [
        line.split()[0]
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("-DOCSTART-")
    ]
    split = [t for t in tokens if split_words(t + " X")[:-1] != [t]]
    assert len(tokens) > 50_000
    assert len(split) / len(tokens) < 0.005, sorted(set(split))[:50]
