"""`predict --format text`: CoNLL-style words, entities with character offsets and scores.

No trained model is available offline, so these tests export a tiny real XLM-R whose weights are
set by hand: it has no transformer layers and no position embeddings, so each token's logits
depend on its id alone, and the embedding of the first sub-token of a chosen word points at the
tag that word must get. The model is saved and loaded like any export and runs through the real
tokenizer, windowing (a small window, so sentences are cut and stitched), softmax, decoding and
offset code. Each token's confidence differs (an extra embedding component varies with the id),
so the score's averaging is checked against probabilities computed here with plain transformers.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForTokenClassification

from raytag.trainer.evaluate import predict_windows
from raytag.trainer.features import encode, stitch
from raytag.trainer.predict import load_exported, predict
from raytag.trainer.words import split_words
from tests.helpers import cli

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "xlm-roberta-base-tokenizer"
DEMO_TOKENIZER = str(importlib.resources.files("raytag.trainer") / "assets" / "demo-tokenizer")
LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]

ACCEPTANCE = "Angela Merkel visited Paris on Monday with officials from Siemens."
# Words whose first sub-token the crafted model tags; every other token is O.
WORD_TAGS = {"Angela": "B-PER", "Merkel": "I-PER", "Paris": "B-LOC", "Siemens": "B-ORG"}


def export_crafted_model(folder: Path, tokenizer, word_tags: dict[str, str], max_length: int = 10) -> Path:
    """A model folder (weights, tokenizer, raytag.json) whose prediction at the first sub-token of
    each word in `word_tags` is that word's tag, and O at every other token."""
    hidden = 16
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=0,
        num_attention_heads=1,
        intermediate_size=hidden,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(LABELS)),
        label2id={lab: i for i, lab in enumerate(LABELS)},
    )
    model = XLMRobertaForTokenClassification(config).eval()
    target = torch.zeros(len(tokenizer), dtype=torch.long)  # O
    for word, tag in word_tags.items():
        first = tokenizer([word], is_split_into_words=True, add_special_tokens=False)["input_ids"][0]
        if tokenizer.convert_ids_to_tokens(first) == "▁":  # shared by punctuation and most Han characters
            raise ValueError(f"{word!r} starts with the bare '▁' piece: pick a word with its own first piece")
        target[first] = LABELS.index(tag)
    emb = model.roberta.embeddings
    with torch.no_grad():
        ids = torch.arange(len(tokenizer))
        emb.word_embeddings.weight.zero_()
        emb.word_embeddings.weight[ids, target] = 1.0
        # The confidence knob: a second component that varies with the id (after the layer norm, a
        # larger one leaves less of the vector to the tag's dimension).
        emb.word_embeddings.weight[:, hidden - 1] = (ids % 7).float() * 0.4
        emb.position_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
        model.classifier.weight.zero_()
        model.classifier.weight[:, : len(LABELS)] = 3.0 * torch.eye(len(LABELS))
        model.classifier.bias.zero_()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "raytag.json").write_text(json.dumps({"labels": LABELS, "max_length": max_length, "stride": 2}))
    return folder


def expected_word_probs(model_dir: Path, words: list[str]) -> list[float]:
    """Each word's probability of its predicted tag at its first sub-token, from one plain forward."""
    model, tokenizer, _ = load_exported(str(model_dir))
    enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits[0].softmax(-1).amax(-1)
    word_ids = enc.word_ids()
    first = [word_ids.index(i) for i in range(len(words))]
    return [float(probs[p]) for p in first]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    return export_crafted_model(tmp_path_factory.mktemp("crafted") / "model", tokenizer, WORD_TAGS)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def entity_records(model: Path, lines: list[str], tmp_path: Path) -> list[dict]:
    """`predict --format text --output-format entities` on `lines`: one record per line, each entity's
    offsets slicing its text out of the line and its score a probability."""
    src, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    predict(str(model), str(src), str(out), fmt="text", output_format="entities")
    records = read_jsonl(out)
    assert [r["text"] for r in records] == lines
    for rec in records:
        for e in rec["entities"]:
            assert rec["text"][e["start"] : e["end"]] == e["text"]
            assert 0 < e["score"] <= 1
    return records


def test_crafted_model_tags_what_it_was_made_to(demo_model):
    words = split_words(ACCEPTANCE)
    model, tokenizer, meta = load_exported(str(demo_model))
    enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits[0].argmax(-1).tolist()
    first = [enc.word_ids().index(i) for i in range(len(words))]
    tags = [LABELS[pred[p]] for p in first]
    assert tags == ["B-PER", "I-PER", "O", "B-LOC", "O", "O", "O", "O", "O", "B-ORG", "O"]
    # And the window is small: this sentence is cut into several windows that predict stitches.
    assert len(encode([words], None, tokenizer, None, meta["max_length"], meta["stride"]).windows) > 2


def test_acceptance_sentence_through_the_cli(demo_model, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text(ACCEPTANCE + "\n\n  Siemens.\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = cli(
        "predict",
        "--model",
        str(demo_model),
        "--input",
        str(src),
        "--format",
        "text",
        "--output-format",
        "entities",
        "--output",
        str(out),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    first, blank, last = read_jsonl(out)
    assert first["line"] == 1 and first["text"] == ACCEPTANCE
    got = [(e["text"], e["type"], e["start"], e["end"]) for e in first["entities"]]
    assert got == [("Angela Merkel", "PER", 0, 13), ("Paris", "LOC", 22, 27), ("Siemens", "ORG", 58, 65)]
    assert ACCEPTANCE[58:65] == "Siemens" and ACCEPTANCE[65] == "."
    # Scores: the mean of the entity's words' probabilities (Angela and Merkel differ).
    p = expected_word_probs(demo_model, split_words(ACCEPTANCE))
    assert p[0] != pytest.approx(p[1], abs=1e-3)
    scores = [e["score"] for e in first["entities"]]
    assert scores == pytest.approx([(p[0] + p[1]) / 2, p[3], p[9]], abs=1e-4)
    assert all(0 < s <= 1 for s in scores)
    # A blank line keeps its place; offsets count from the line's own start, spaces included.
    assert blank == {"line": 2, "text": "", "entities": []}
    assert last["line"] == 3 and last["text"] == "  Siemens."
    assert [(e["text"], e["start"], e["end"]) for e in last["entities"]] == [("Siemens", 2, 9)]


def test_conll_output_of_text_has_the_period_apart(demo_model, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text(ACCEPTANCE + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert predict(str(demo_model), str(src), str(out), fmt="text") == {}
    rows = [line.split() for line in out.read_text(encoding="utf-8").splitlines() if line]
    assert rows[-2:] == [["Siemens", "B-ORG"], [".", "O"]]
    assert rows[:2] == [["Angela", "B-PER"], ["Merkel", "I-PER"]]


def test_entities_on_punctuation_heavy_lines(demo_model, tmp_path):
    lines = [
        '"Siemens," said Angela Merkel\'s office (in Paris).',
        "Siemens' Paris-based unit -- Angela Merkel: 'Paris!'",
        "Siemens\tvisited  Paris...Siemens",
    ]
    records = entity_records(demo_model, lines, tmp_path)
    got = [[(e["text"], e["type"]) for e in r["entities"]] for r in records]
    # Paris-based is one word (CoNLL keeps hyphenated words) whose first sub-token is Paris's.
    assert got == [
        [("Siemens", "ORG"), ("Angela Merkel", "PER"), ("Paris", "LOC")],
        [("Siemens", "ORG"), ("Paris-based", "LOC"), ("Angela Merkel", "PER"), ("Paris", "LOC")],
        [("Siemens", "ORG"), ("Paris", "LOC"), ("Siemens", "ORG")],
    ]
    assert [(e["start"], e["end"]) for e in records[0]["entities"]] == [(1, 8), (16, 29), (43, 48)]
    assert [(e["start"], e["end"]) for e in records[2]["entities"]] == [(0, 7), (17, 22), (25, 32)]
    # An entity keeps the original spacing between its words.
    assert (
        entity_records(demo_model, ["Angela   Merkel"], tmp_path)[0]["entities"][0]["text"]
        == "Angela   Merkel"
    )


@pytest.mark.shared
def test_entities_on_non_latin_lines(tmp_path):
    if not SHARED_TOKENIZER.exists():
        pytest.skip(f"{SHARED_TOKENIZER} not present: XLM-R's tokenizer comes from ../shared")
    tokenizer = AutoTokenizer.from_pretrained(str(SHARED_TOKENIZER))
    places = {"Москве": "B-LOC", "Αθήνα": "B-LOC", "القاهرة": "B-LOC", "दिल्ली": "B-LOC", "Siemens": "B-ORG"}
    places |= {"他": "B-PER", "在": "I-PER"}  # two Han characters with pieces of their own: one entity
    model = export_crafted_model(tmp_path / "model", tokenizer, places, max_length=8)
    lines = [
        "«Siemens» в Москве, — сказал он.",
        "Η Siemens στην Αθήνα; Ναι.",
        "ذهبت Siemens إلى القاهرة، ثم عادت.",
        "Siemens दिल्ली में है।",
        "昨天他在北京。Siemens！",
    ]
    records = entity_records(model, lines, tmp_path)
    got = [sorted((e["text"], e["type"]) for e in r["entities"]) for r in records]
    assert got == [
        [("Siemens", "ORG"), ("Москве", "LOC")],
        [("Siemens", "ORG"), ("Αθήνα", "LOC")],
        [("Siemens", "ORG"), ("القاهرة", "LOC")],
        [("Siemens", "ORG"), ("दिल्ली", "LOC")],
        [("Siemens", "ORG"), ("他在", "PER")],
    ]
    assert [(e["start"], e["end"]) for e in records[4]["entities"]] == [(2, 4), (7, 14)]
    assert [(e["start"], e["end"]) for e in records[0]["entities"]] == [(1, 8), (12, 18)]


def test_predict_windows_probabilities_follow_the_predictions(demo_model):
    """With `probs`, predictions are unchanged and each word gets the softmax of its predicted label
    at its first sub-token, stitched across windows like the labels."""
    model, tokenizer, meta = load_exported(str(demo_model))
    sentences = [split_words(ACCEPTANCE), split_words("Siemens , Paris and Angela Merkel .") * 4, ["x"]]
    enc = encode(sentences, None, tokenizer, None, meta["max_length"], meta["stride"])
    assert len(enc.windows) > len(sentences) + 3
    pad = tokenizer.pad_token_id
    plain, loss, count = predict_windows(model, enc, pad, torch.device("cpu"), 64)
    probs: dict[int, np.ndarray] = {}
    with_probs, loss2, count2 = predict_windows(model, enc, pad, torch.device("cpu"), 64, probs=probs)
    assert sorted(plain) == sorted(with_probs) == sorted(probs) == list(range(len(enc.windows)))
    assert all(np.array_equal(plain[i], with_probs[i]) for i in plain) and (loss, count) == (loss2, count2)
    stitched = stitch(enc, [probs[i] for i in range(len(enc.windows))])
    assert all(a.dtype == np.float64 for a in stitched)
    for words, got in zip(sentences, stitched, strict=True):
        assert got == pytest.approx(expected_word_probs(demo_model, words), abs=1e-5)
    labels = stitch(enc, [plain[i] for i in range(len(enc.windows))])
    assert all(a.dtype == np.int64 for a in labels)
