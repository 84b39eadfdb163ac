"""Label alignment, windows and stitching, token-budget batching."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from raytag.trainer.batching import plan_batches, shard_steps
from raytag.trainer.features import IGNORE, encode, owners, plan_windows, stitch

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "xlm-roberta-base-tokenizer"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(
        str(importlib.resources.files("raytag.trainer") / "assets" / "demo-tokenizer")
    )


@pytest.fixture(scope="module")
def xlmr_tok():
    if not SHARED_TOKENIZER.exists():
        pytest.skip(f"{SHARED_TOKENIZER} not present: XLM-R's tokenizer comes from ../shared")
    return AutoTokenizer.from_pretrained(str(SHARED_TOKENIZER))


LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
L2I = {lab: i for i, lab in enumerate(LABELS)}


def test_first_subtoken_gets_label_rest_ignored(xlmr_tok):
    words = ["Wolfgang", "Amadeus", "Mozart", "lived", "in", "Salzburgerland", "."]
    tags = ["B-PER", "I-PER", "I-PER", "O", "O", "B-LOC", "O"]
    enc = encode([words], [tags], xlmr_tok, L2I)
    (win,) = enc.windows
    # Labels appear exactly at the first sub-token of each word, in order, with the word's tag.
    labelled = np.flatnonzero(win.labels != IGNORE)
    assert [LABELS[win.labels[p]] for p in labelled] == tags
    assert labelled.tolist() == win.positions.tolist()
    # Each labelled position is where the word's pieces start: re-tokenise each word alone.
    pos = 1  # after <s>
    for w, p in zip(words, labelled, strict=True):
        assert p == pos
        pos += len(xlmr_tok(w, add_special_tokens=False)["input_ids"])
    assert win.input_ids[0] == xlmr_tok.cls_token_id and win.input_ids[-1] == xlmr_tok.sep_token_id
    # A word split into several pieces has IGNORE on all but the first.
    n_sal = len(xlmr_tok("Salzburgerland", add_special_tokens=False)["input_ids"])
    assert n_sal > 1
    assert (win.labels[labelled[5] + 1 : labelled[5] + n_sal] == IGNORE).all()


def test_first_subtoken_demo_tokenizer(tok):
    words, tags = ["José", "visited", "Zürich"], ["B-PER", "O", "B-LOC"]
    (win,) = encode([words], [tags], tok, L2I).windows
    got = [LABELS[x] for x in win.labels if x != IGNORE]
    assert got == tags


def test_600_word_sentence_gets_600_predictions(tok):
    words = [f"w{i % 37}" for i in range(600)]
    tags = ["B-PER" if i % 50 == 0 else "O" for i in range(600)]
    enc = encode([words], [tags], tok, L2I, max_length=64, stride=16)
    assert len(enc.windows) > 10 and enc.stats["split_sentences"] == 1
    # Every word is owned by exactly one window and labelled exactly once.
    owned = np.concatenate([w.words for w in enc.windows])
    assert sorted(owned.tolist()) == list(range(600))
    assert sum(int((w.labels != IGNORE).sum()) for w in enc.windows) == 600
    for w in enc.windows:
        assert len(w) <= 64
    # Stitch: predict each word's own index mod 5 and get it back in order.
    preds = [w.words % len(LABELS) for w in enc.windows]
    (back,) = stitch(enc, preds)
    assert len(back) == 600
    assert back.tolist() == [i % len(LABELS) for i in range(600)]


def test_windows_overlap_for_context_and_owner_is_central():
    pieces = [1] * 100
    ranges = plan_windows(pieces, content=30, stride=10)
    assert ranges[0] == (0, 30) and ranges[-1][1] == 100
    for (_s0, e0), (s1, _) in zip(ranges, ranges[1:], strict=False):
        assert s1 < e0 and e0 - s1 <= 10  # overlap of up to `stride` tokens
    own = owners(pieces, ranges)
    # Word 25 sits near the end of window 0 but inside window 1 with more context on its left.
    assert own[0] == 0 and own[99] == len(ranges) - 1
    assert own[25] == 1


def test_overlong_single_word_is_cut_not_dropped(tok):
    words = ["a" * 400, "b"]
    enc = encode([words], [["B-PER", "O"]], tok, L2I, max_length=16, stride=4)
    assert enc.stats["cut_words"] >= 1
    (back,) = stitch(enc, [np.zeros(len(w.words), dtype=int) for w in enc.windows])
    assert len(back) == 2


def test_stitch_detects_missing_prediction(tok):
    enc = encode([["a", "b", "c"]], [["O", "O", "O"]], tok, L2I)
    with pytest.raises(ValueError, match="expected 3 predictions, got 0"):
        stitch(enc, [np.zeros(0, dtype=int)])
    enc.windows[0].words = enc.windows[0].words[:2]  # a window that lost a word: caught, not ignored
    with pytest.raises(ValueError, match="1 word\\(s\\) got no prediction"):
        stitch(enc, [np.zeros(2, dtype=int)])


def test_batches_respect_budget_cover_everything_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=2000).tolist()
    batches = plan_batches(lengths, batch_tokens=1024, max_sentences=64, seed=1, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(2000))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 1024
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded / sum(lengths) < 1.1  # length grouping: little compute goes to padding
    assert plan_batches(lengths, 1024, 64, seed=1, epoch=0) == batches
    assert plan_batches(lengths, 1024, 64, seed=1, epoch=1) != batches


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_disjoint_cover_and_equal_steps(world):
    lengths = list(range(5, 105))
    batches = plan_batches(lengths, 256, 64, seed=0, epoch=0)
    labelled = [1] * len(lengths)
    plans = [shard_steps(batches, labelled, world, r, accum=2) for r in range(world)]
    assert len({len(p.steps) for p in plans}) == 1
    seen = [i for p in plans for step in p.steps for micro in step for i in micro]
    assert sorted(seen) == list(range(len(lengths)))
    assert plans[0].labelled == plans[-1].labelled
    assert sum(plans[0].labelled) == len(lengths)
