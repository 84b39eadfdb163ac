"""Evaluation: run the model over windows, stitch predictions back to words, score like conlleval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batching import plan_batches
from .features import IGNORE, Encoded, stitch
from .scoring import score


def collate(windows, idx: Sequence[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Pad a batch of windows to its longest member."""
    longest = max(len(windows[i]) for i in idx)
    ids = np.full((len(idx), longest), pad_id, dtype=np.int64)
    labels = np.full((len(idx), longest), IGNORE, dtype=np.int64)
    mask = np.zeros((len(idx), longest), dtype=np.int64)
    for r, i in enumerate(idx):
        w = windows[i]
        n = len(w)
        ids[r, :n] = w.input_ids
        labels[r, :n] = w.labels
        mask[r, :n] = 1
    return {
        "input_ids": torch.from_numpy(ids).to(device),
        "attention_mask": torch.from_numpy(mask).to(device),
        "labels": torch.from_numpy(labels).to(device),
    }


@dataclass
class EvalResult:
    metrics: dict  # f1, precision, recall, accuracy, per_type, loss, ...
    pred_tags: list[list[str]]


def eval_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Evaluation's batches: length-grouped, in a fixed order, at most `batch_tokens` with padding."""
    return plan_batches(lengths, batch_tokens, 1024, seed=0, epoch=0, shuffle=False)


@torch.no_grad()
def predict_windows(
    model,
    encoded: Encoded,
    pad_id: int,
    device,
    batch_tokens: int,
    rank: int = 0,
    world: int = 1,
    *,
    probs: dict[int, np.ndarray] | None = None,
) -> tuple[dict[int, np.ndarray], float, int]:
    """Predictions for this rank's share of the windows: window index -> label ids of its owned words.

    Every rank runs the same number of forwards (a rank whose share is shorter runs a one-window
    dummy whose output is dropped): under ZeRO-3 each forward gathers parameters from all ranks.
    Also returns the summed cross-entropy and the count of labelled tokens (for the loss).
    `probs`, when given, is filled in the same way with the probability (softmax) of each predicted
    label, as float32; training's evaluation passes none and computes no softmax.
    """
    windows = encoded.windows
    batches = eval_batches([len(w) for w in windows], batch_tokens)
    mine: list[list[int] | None] = list(batches[rank::world])
    mine += [None] * (-(-len(batches) // world) - len(mine))
    preds: dict[int, np.ndarray] = {}
    loss_sum, count = 0.0, 0
    for idx in mine:
        if idx is None:
            model(**{k: v for k, v in collate(windows, [0], pad_id, device).items() if k != "labels"})
            continue
        batch = collate(windows, idx, pad_id, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        valid = labels != IGNORE
        if valid.any():
            loss_sum += float(
                torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
            )
            count += int(valid.sum())
        best_t = logits.argmax(-1)
        best = best_t.cpu().numpy()
        for r, i in enumerate(idx):
            preds[i] = best[r, windows[i].positions]
        if probs is not None:
            top = logits.softmax(-1).gather(-1, best_t.unsqueeze(-1)).squeeze(-1).cpu().numpy()
            for r, i in enumerate(idx):
                probs[i] = top[r, windows[i].positions]
    return preds, loss_sum, count


def finish(
    encoded: Encoded,
    preds: dict[int, np.ndarray],
    gold_tags,
    id2label: list[str],
    loss_sum: float,
    count: int,
) -> EvalResult:
    """Stitch all windows' predictions (gathered from every rank) and score them."""
    ordered = [preds[i] for i in range(len(encoded.windows))]
    per_sentence = stitch(encoded, ordered)
    pred_tags = [[id2label[int(t)] for t in arr] for arr in per_sentence]
    metrics: dict[str, Any] = dict(score(gold_tags, pred_tags))
    metrics["loss"] = loss_sum / max(1, count)
    metrics["sentences"] = encoded.num_sentences
    return EvalResult(metrics=metrics, pred_tags=pred_tags)
