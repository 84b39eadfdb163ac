"""The exported model's README.md: the sections of a Hugging Face model card, all filled from the run."""

from __future__ import annotations

from typing import Any

import yaml


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def render_card(
    *,
    run_name: str,
    base_model: str,
    labels: list[str],
    data: dict[str, dict[str, Any]],
    hyperparameters: dict[str, Any],
    history: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    versions: dict[str, str],
    best_step: int | None,
    language_hint: str | None = None,
    speed: dict[str, Any] | None = None,
    plots: dict[str, str] | None = None,
) -> str:
    """Markdown model card. `history` holds one evaluation record per epoch or eval step; `plots`
    maps each PNG written beside the card to its caption, or is None when no plots were drawn."""
    types = sorted({lab[2:] for lab in labels if lab != "O"})
    val = results.get("validation") or {}
    index_results = []
    for split, res in results.items():
        index_results.append(
            {
                "task": {"type": "token-classification", "name": "Named-entity recognition"},
                "dataset": {"name": data.get(split, {}).get("path", split), "type": "conll", "split": split},
                "metrics": [
                    {"type": k, "value": round(float(res[k]), 4), "name": k.capitalize()}
                    for k in ("f1", "precision", "recall", "accuracy")
                    if res.get(k) is not None
                ],
            }
        )
    front = {
        "library_name": "transformers",
        "pipeline_tag": "token-classification",
        "base_model": base_model,
        "tags": ["token-classification", "ner", "raytag", "deepspeed"],
        "model-index": [{"name": run_name, "results": index_results}],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {run_name}", ""]
    summary = (
        ", ".join(f"{split} entity F1 {_pct(r.get('f1'))}" for split, r in results.items()) or "no evaluation"
    )
    lines += [
        f"This model is a fine-tuned version of `{base_model}` for named-entity recognition, trained with "
        f"raytag. It achieves the following results: {summary}.",
        "",
        "## Model description",
        "",
        f"A token-classification head over `{base_model}`, predicting {len(labels)} IOB2 labels "
        f"({', '.join(labels)}) for the entity types {', '.join(types) or 'none'}. Each word is labelled on "
        "its first sub-token; sentences longer than the model's window are split into overlapping windows and "
        "stitched back, so every word receives a prediction.",
        "",
        "## Intended uses & limitations",
        "",
        "Intended for tagging entities of the types above in text similar to the training data "
        f"({data.get('train', {}).get('path', 'see below')}). Use it with "
        '`transformers.pipeline("token-classification", model=PATH, aggregation_strategy="simple")`, or '
        "`raytag predict` for CoNLL files. Limitations: it only knows the entity types it was trained on; "
        "accuracy drops on domains, languages and spelling conventions that the training data does not cover; "
        "entity-level scores below are on the evaluation splits listed and may not transfer. Review its output "
        "before using it for decisions about people.",
        "",
        "## Training and evaluation data",
        "",
        "| split | file | sentences | sha256 |",
        "|---|---|---|---|",
    ]
    for split, d in data.items():
        lines.append(
            f"| {split} | `{d.get('path')}` | {d.get('sentences')} | `{(d.get('sha256') or 'n/a')[:16]}` |"
        )
    lines += [
        "",
        "## Training procedure",
        "",
        "### Training hyperparameters",
        "",
        "| hyperparameter | value |",
        "|---|---|",
    ]
    for k, v in hyperparameters.items():
        lines.append(f"| {k} | {v} |")
    if speed:
        lines += ["", "### Speed", "", "| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in speed.items()]
    lines += ["", "### Training results", ""]
    header = "| epoch | step | training loss | validation loss | precision | recall | F1 | accuracy |"
    lines += [header, "|---|---|---|---|---|---|---|---|"]
    for h in history:
        mark = " (best)" if best_step is not None and h.get("step") == best_step else ""
        lines.append(
            f"| {h.get('epoch', 0):.2f} | {h.get('step')}{mark} | {h.get('train_loss', float('nan')):.4f} | "
            f"{h.get('loss', float('nan')):.4f} | {_pct(h.get('precision'))} | {_pct(h.get('recall'))} | "
            f"{_pct(h.get('f1'))} | {_pct(h.get('accuracy'))} |"
        )
    if not history:
        lines.append("| - | - | - | - | - | - | - | - |")
    lines += ["", "### Results per evaluation set", ""]
    lines += [
        "| evaluation set | sentences | precision | recall | F1 | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for split, res in results.items():
        lines.append(
            f"| {split} | {res.get('sentences', '-')} | {_pct(res.get('precision'))} | {_pct(res.get('recall'))} | "
            f"{_pct(res.get('f1'))} | {_pct(res.get('accuracy'))} |"
        )
    if not results:
        lines.append("| - | - | - | - | - | - |")
    lines += ["", "### Per-type results", ""]
    for split, res in results.items():
        per = res.get("per_type") or {}
        lines += [f"{split}:", "", "| type | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for t, m in sorted(per.items()):
            lines.append(
                f"| {t} | {_pct(m.get('precision'))} | {_pct(m.get('recall'))} | {_pct(m.get('f1'))} | {m.get('support')} |"
            )
        lines.append("")
    if not results:
        lines += ["No evaluation split was configured.", ""]
    lines += ["### Framework versions", ""]
    for k, v in versions.items():
        lines.append(f"- {k} {v}")
    lines.append("")
    if val:
        lines += [f"Best validation F1 {_pct(val.get('f1'))} at step {best_step}.", ""]
    lines += ["## Training curves and errors", ""]
    if plots:
        for file, caption in plots.items():
            lines += [f"![{caption}]({file})", ""]
    else:
        lines += [
            "The plots (learning curves, per-type scores, entity confusion) are absent: they could not be "
            "drawn when the model was exported.",
            "",
        ]
    return "\n".join(lines)
