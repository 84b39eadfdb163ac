"""Plots of a run, as PNG bytes: learning curves, per-type scores, an entity-type confusion matrix.

Pure functions: metrics records, results and tag sequences in, PNG bytes out. `finish_run` writes
them into `model/` (the card links them) and `trainer/main.py report` embeds them in its page.
matplotlib is imported where a plot is drawn, and drawn on a `Figure` of its own (the Agg
renderer, no pyplot), so a process's matplotlib backend and global state are left alone.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .scoring import chunks

log = logging.getLogger("raytag")

LEARNING_CURVES = "learning_curves.png"
PER_TYPE = "per_type.png"
CONFUSION = "confusion.png"
PLOTS = (LEARNING_CURVES, PER_TYPE, CONFUSION)
CAPTIONS = {
    LEARNING_CURVES: "Learning curves: training loss, evaluation loss and entity F1 by step, the best step marked",
    PER_TYPE: "Per-type precision, recall and F1 (validation, test), with each type's support",
    CONFUSION: "Entity-type confusion matrix of exact spans (validation, test), with missed and spurious entities",
}
DPI = 100
# Pixel sizes (width, height): fixed, whatever the run, so pages and cards lay out the same.
SIZES = {LEARNING_CURVES: (1500, 450), PER_TYPE: (1400, 500), CONFUSION: (1400, 560)}
SPURIOUS = "spurious"  # confusion row: a predicted entity with no gold entity of the same span
MISSED = "missed"  # confusion column: a gold entity with no predicted entity of the same span
# Sets the per-type and confusion plots show, in this order (named eval sets are on the curves).
FINAL_SETS = ("validation", "test")
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


# --------------------------------------------------------------------------- entity matching


def entity_pairs(gold: Sequence[str], pred: Sequence[str]) -> list[tuple[str | None, str | None, int, int]]:
    """One sentence's gold and predicted entities matched by exact span: `(gold type, predicted
    type, start, end)` (end exclusive), sorted by span. A type is None where that side has no
    entity of the span (missed: no prediction; spurious: no gold). Entities as conlleval finds
    them (`scoring.chunks`)."""
    g = {(s, e): t for t, s, e in chunks(gold)}
    p = {(s, e): t for t, s, e in chunks(pred)}
    return [(g.get(span), p.get(span), *span) for span in sorted(g.keys() | p.keys())]


def entity_errors(gold: Sequence[str], pred: Sequence[str]) -> Counter[str]:
    """A sentence's entity errors by kind: `missed`, `spurious`, `wrong type` (a span both sides
    have, with different types). Their sum ranks sentences in the report."""
    out: Counter[str] = Counter()
    for g, p, _, _ in entity_pairs(gold, pred):
        if p is None:
            out["missed"] += 1
        elif g is None:
            out["spurious"] += 1
        elif g != p:
            out["wrong type"] += 1
    return out


@dataclass
class Confusion:
    """Counts of exact-span entity matches: `counts[(gold row, predicted column)]`, rows a gold
    type or SPURIOUS, columns a predicted type or MISSED."""

    types: list[str]
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def rows(self) -> list[str]:
        return [*self.types, SPURIOUS]

    @property
    def columns(self) -> list[str]:
        return [*self.types, MISSED]

    def matrix(self) -> list[list[int]]:
        return [[self.counts[(r, c)] for c in self.columns] for r in self.rows]


def confusion(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], types: Iterable[str] = ()
) -> Confusion:
    """The entity-type confusion of tag sequences (one per sentence): each gold entity and each
    predicted entity counted once, in the cell of its exact-span partner's type (MISSED/SPURIOUS
    where the other side has no entity of that span). `types` adds types that may not occur.

    Raises:
        ValueError: gold and pred differ in their number of sentences or a sentence's length.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    counts: Counter[tuple[str, str]] = Counter()
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted tags")
        for gt, pt, _, _ in entity_pairs(g, p):
            counts[(SPURIOUS if gt is None else gt, MISSED if pt is None else pt)] += 1
    seen = {t for (r, c) in counts for t in (r, c)} - {SPURIOUS, MISSED}
    return Confusion(sorted(seen | set(types)), counts)


# --------------------------------------------------------------------------- inputs


def parse_metrics(text: str) -> list[dict[str, Any]]:
    """metrics.jsonl's records (a torn last line, as a live run may leave while writing, is skipped)."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def best_step(records: Iterable[Mapping[str, Any]]) -> int | None:
    """The step of the first highest validation F1 (the loop's rule for the best checkpoint)."""
    best: tuple[float, int] | None = None
    for r in records:
        if r.get("type") == "eval" and r.get("split") == "validation" and r.get("f1") is not None:
            if best is None or r["f1"] > best[0]:
                best = (r["f1"], r["step"])
    return None if best is None else best[1]


# --------------------------------------------------------------------------- drawing


def _figure(name: str):
    from matplotlib.figure import Figure

    w, h = SIZES[name]
    return Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays SIZES'
    return buf.getvalue()


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def learning_curves_png(records: Sequence[Mapping[str, Any]], best: int | None = None) -> bytes:
    """Training loss by step; evaluation loss and entity F1 by step for every evaluation set; the
    best step (given, or the first highest validation F1) marked on all three."""
    best = best_step(records) if best is None else best
    fig = _figure(LEARNING_CURVES)
    ax_train, ax_loss, ax_f1 = fig.subplots(1, 3)
    train = [r for r in records if r.get("type") == "train" and r.get("loss") is not None]
    evals: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get("type") == "eval":
            evals.setdefault(str(r.get("split")), []).append(r)
    names = sorted(evals, key=lambda n: (n != "validation", n))
    colour = {n: _COLOURS[i % len(_COLOURS)] for i, n in enumerate(names)}

    if train:
        ax_train.plot([r["step"] for r in train], [r["loss"] for r in train], color="0.25", lw=1.5)
    else:
        _empty(ax_train, "no training records yet")
    ax_train.set(title="Training loss", xlabel="optimizer step", ylabel="loss (nats per labelled token)")
    for n in names:
        rs = sorted(evals[n], key=lambda r: r["step"])
        steps = [r["step"] for r in rs]
        if any(r.get("loss") is not None for r in rs):
            ax_loss.plot(steps, [r.get("loss") for r in rs], "o-", ms=4, color=colour[n], label=n)
        ax_f1.plot(steps, [100 * (r.get("f1") or 0.0) for r in rs], "o-", ms=4, color=colour[n], label=n)
    ax_loss.set(title="Evaluation loss", xlabel="optimizer step", ylabel="loss (nats per labelled token)")
    ax_f1.set(title="Entity F1 (conlleval)", xlabel="optimizer step", ylabel="entity F1 (%)")
    if not names:
        _empty(ax_loss, "no evaluation yet")
        _empty(ax_f1, "no evaluation yet")
    else:
        ax_f1.set_ylim(0, 100)
    if best is not None:
        val = {r["step"]: r for r in evals.get("validation", [])}
        f1 = val.get(best, {}).get("f1")
        label = f"best: step {best}" + (f", validation F1 {100 * f1:.2f}" if f1 is not None else "")
        for ax in (ax_train, ax_loss, ax_f1):
            ax.axvline(best, color="0.5", ls="--", lw=1, label=label if ax is ax_f1 else None)
        if f1 is not None:
            ax_f1.plot([best], [100 * f1], "*", ms=16, color=colour["validation"], mec="k", zorder=5)
    for ax in (ax_train, ax_loss, ax_f1):
        ax.grid(alpha=0.3)
    if names:
        ax_loss.legend(title="evaluation set", fontsize=9)
        ax_f1.legend(title="evaluation set", fontsize=9, loc="lower right")
    return _png(fig)


def per_type_png(results: Mapping[str, Mapping[str, Any]], sets: Sequence[str] = FINAL_SETS) -> bytes:
    """Per-entity-type precision, recall and F1 bars, one panel per set of `sets` found in
    `results` (each with a `per_type` as results.json has it); the support in each type's label."""
    import numpy as np

    shown = [s for s in sets if (results.get(s) or {}).get("per_type")]
    fig = _figure(PER_TYPE)
    axes = fig.subplots(1, max(1, len(shown)), squeeze=False)[0]
    if not shown:
        _empty(axes[0], "no per-type scores")
        return _png(fig)
    metrics = (("precision", "#4c72b0"), ("recall", "#dd8452"), ("f1", "#55a868"))
    for ax, name in zip(axes, shown, strict=True):
        res = results[name]
        per = res["per_type"]
        types = sorted(per)
        x = np.arange(len(types))
        width = 0.8 / len(metrics)
        for i, (m, c) in enumerate(metrics):
            vals = [100 * (per[t].get(m) or 0.0) for t in types]
            bars = ax.bar(x + (i - 1) * width, vals, width, label="F1" if m == "f1" else m, color=c)
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(x, [f"{t}\n(support {per[t].get('support', '?')})" for t in types])
        f1 = res.get("f1")
        at = (
            f" at step {res['step']}" if res.get("step") is not None else ""
        )  # a live run's latest evaluation
        ax.set_title(
            f"{name}: per-type scores{at}" + (f" (overall F1 {100 * f1:.2f})" if f1 is not None else "")
        )
        ax.set(xlabel="entity type (gold entities)", ylabel="score (%)", ylim=(0, 108))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=9, loc="upper right", ncols=3)
    return _png(fig)


def confusion_png(matrices: Mapping[str, Confusion]) -> bytes:
    """One annotated heatmap per set: rows gold type (+ spurious), columns predicted type (+ missed)."""
    import numpy as np

    fig = _figure(CONFUSION)
    axes = fig.subplots(1, max(1, len(matrices)), squeeze=False)[0]
    if not matrices:
        _empty(axes[0], "no predictions")
        return _png(fig)
    for ax, (name, conf) in zip(axes, matrices.items(), strict=True):
        m = np.array(conf.matrix(), dtype=float)
        n_types = len(conf.types)
        shown = m.copy()
        shown[n_types, n_types] = np.nan  # spurious x missed: no entity can be there
        im = ax.imshow(np.log1p(shown), cmap="Blues", aspect="auto")
        top = np.nanmax(np.log1p(shown)) if np.isfinite(shown).any() else 1.0
        for r in range(m.shape[0]):
            for c in range(m.shape[1]):
                if r == n_types and c == n_types:
                    continue
                dark = np.log1p(m[r, c]) > 0.6 * top
                weight = "bold" if r == c else "normal"
                ax.text(c, r, f"{int(m[r, c])}", ha="center", va="center", fontsize=10,
                        color="white" if dark else "black", fontweight=weight)  # fmt: skip
        ax.set_xticks(range(len(conf.columns)), conf.columns)
        ax.set_yticks(range(len(conf.rows)), conf.rows)
        ax.axhline(n_types - 0.5, color="0.3", lw=1)
        ax.axvline(n_types - 0.5, color="0.3", lw=1)
        total_gold, matched = int(m[:n_types].sum()), int(np.trace(m[:n_types, :n_types]))
        ax.set_title(f"{name}: entity types, exact spans ({matched} of {total_gold} gold entities correct)")
        ax.set(xlabel="predicted type (missed: no predicted entity of the span)",
               ylabel="gold type (spurious: no gold entity of the span)")  # fmt: skip
        cb = fig.colorbar(im, ax=ax, shrink=0.8)
        ticks = [t for t in (0, 1, 3, 10, 30, 100, 300, 1000, 3000, 10000) if t <= np.nanmax(shown)]
        cb.set_ticks(np.log1p(ticks), labels=[str(t) for t in ticks])
        cb.set_label("entities (log scale)")
    return _png(fig)


# --------------------------------------------------------------------------- all of a run's plots


def run_plots(
    records: Sequence[Mapping[str, Any]],
    results: Mapping[str, Mapping[str, Any]],
    tags: Mapping[str, tuple[Sequence[Sequence[str]], Sequence[Sequence[str]]]],
    best: int | None = None,
) -> dict[str, bytes]:
    """File name -> PNG: the learning curves (always), per-type bars (when a set in `results` has
    per-type scores) and the confusion matrix (when `tags` holds (gold, predicted) tags of
    validation or test). Raises whatever drawing raises (ImportError without matplotlib)."""
    out = {LEARNING_CURVES: learning_curves_png(records, best)}
    if any((results.get(s) or {}).get("per_type") for s in FINAL_SETS):
        out[PER_TYPE] = per_type_png(results)
    matrices = {s: confusion(*tags[s]) for s in FINAL_SETS if s in tags}
    if matrices:
        types = sorted({t for c in matrices.values() for t in c.types})
        out[CONFUSION] = confusion_png({s: Confusion(types, c.counts) for s, c in matrices.items()})
    return out


def model_plots(
    records: Sequence[Mapping[str, Any]],
    results: Mapping[str, Mapping[str, Any]],
    tags: Mapping[str, tuple[Sequence[Sequence[str]], Sequence[Sequence[str]]]],
    best: int | None,
) -> tuple[dict[str, bytes], str | None]:
    """`run_plots` for the exported model, never failing the run: on any error, no plots, one
    warning, and the reason (for the model card)."""
    try:
        return run_plots(records, results, tags, best), None
    except Exception as e:  # a missing matplotlib, a font problem: the model matters more than its plots
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        log.warning("plots for model/ not drawn (the model card says so): %s", reason)
        return {}, reason
