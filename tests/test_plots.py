"""Entity matching, the confusion counts and the plots of trainer/plots.py (no training)."""

from __future__ import annotations

import io

import pytest

from raytag.trainer.plots import (
    CONFUSION,
    LEARNING_CURVES,
    MISSED,
    PER_TYPE,
    SIZES,
    SPURIOUS,
    confusion,
    entity_errors,
    run_plots,
)


def test_confusion_counts_match_a_hand_count():
    gold = [
        ["B-PER", "I-PER", "O", "B-LOC", "O"],  # PER 0-2, LOC 3-4
        ["B-ORG", "I-ORG", "I-ORG", "O"],  # ORG 0-3
        ["O", "O", "B-PER"],  # PER 2-3
    ]
    pred = [
        ["B-PER", "I-PER", "O", "B-ORG", "O"],  # PER 0-2 correct; LOC 3-4 predicted ORG
        [
            "B-ORG",
            "I-ORG",
            "O",
            "B-LOC",
        ],  # ORG 0-2: wrong span -> ORG 0-3 missed, ORG 0-2 spurious; LOC spurious
        ["O", "O", "B-PER"],  # correct
    ]
    c = confusion(gold, pred, types=["MISC"])
    assert c.types == ["LOC", "MISC", "ORG", "PER"]
    assert c.rows == ["LOC", "MISC", "ORG", "PER", SPURIOUS]
    assert c.columns == ["LOC", "MISC", "ORG", "PER", MISSED]
    #            LOC MISC ORG PER missed
    expected = [
        [0, 0, 1, 0, 0],  # gold LOC: predicted ORG on its span
        [0, 0, 0, 0, 0],  # gold MISC: none
        [0, 0, 0, 0, 1],  # gold ORG: missed (the prediction's span is shorter)
        [0, 0, 0, 2, 0],  # gold PER: both right
        [1, 0, 1, 0, 0],  # spurious: the LOC, the short ORG
    ]
    assert c.matrix() == expected
    assert entity_errors(gold[1], pred[1]) == {"missed": 1, "spurious": 2}
    assert entity_errors(gold[0], pred[0]) == {"wrong type": 1}
    assert sum(entity_errors(gold[2], pred[2]).values()) == 0
    with pytest.raises(ValueError, match="sentence 0"):
        confusion([["O"]], [["O", "O"]])


def _records():
    recs = []
    for step in range(1, 41):
        recs.append({"type": "train", "step": step, "loss": 2.0 / step**0.5})
    for step in (10, 20, 30, 40):
        for split, bonus in (("validation", 0.0), ("es", -0.1)):
            f1 = min(0.9, step / 40) + bonus
            recs.append({"type": "eval", "split": split, "step": step, "loss": 1 / step, "f1": f1})
    return recs


def test_run_plots_draw_every_plot_at_its_size():
    from PIL import Image

    per_type = {"PER": {"precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 10, "predicted": 9}}
    results = {"validation": {"f1": 0.75, "per_type": per_type}, "test": {"f1": 0.7, "per_type": per_type}}
    tags = {"validation": ([["B-PER", "O"]], [["B-PER", "B-LOC"]])}
    pngs = run_plots(_records(), results, tags)
    assert set(pngs) == {LEARNING_CURVES, PER_TYPE, CONFUSION}
    for name, data in pngs.items():
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.size == SIZES[name], name
    # A run still training: the curves alone.
    assert set(run_plots(_records()[:10], {}, {})) == {LEARNING_CURVES}


def test_without_matplotlib_the_export_gets_no_plots_one_warning_and_a_card_that_says_so(monkeypatch, caplog):
    import sys

    from raytag.trainer.card import render_card
    from raytag.trainer.plots import model_plots

    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` raises ImportError
    caplog.set_level("WARNING", logger="raytag")
    pngs, reason = model_plots(_records(), {}, {}, None)
    assert pngs == {} and reason and "matplotlib" in reason
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    card = render_card(
        run_name="r", base_model="m", labels=["O", "B-PER", "I-PER"], data={}, hyperparameters={},
        history=[], results={}, versions={}, best_step=None, plots=None,
    )  # fmt: skip
    assert "## Training curves and errors" in card and "plots" in card and "absent" in card
    assert "](learning_curves.png)" not in card
