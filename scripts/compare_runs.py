"""Do two finished local runs hold the same results? For refactors that must not change behaviour.

    python scripts/compare_runs.py RUN_A RUN_B [--same PATH_A=PATH_B ...]

Compares what the run decided, not how long it took: results.json, metrics.jsonl, every
checkpoint's file names and progress.json, predictions/, the exported weights (bytes) and the model
card, each without its timing figures (seconds, tokens per second, MFU, peak FLOP/s, wall-clock
stamps). `--same PATH_A=PATH_B` names folders that stand for each other (two checkouts, whose demo
data paths differ; two run.storage folders): each is written as `<pathN>` before comparing. Prints one line per difference and exits 1 if there is any, else prints
`same` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

# Figures that measure time, not what was learnt.
TIMING = {
    "time",
    "tokens_per_second",
    "mfu",
    "train_runtime_seconds",
    "train_tokens_per_second",
    "train_mfu",
    "peak_flops_per_device",
    "peak_flops_source",
    "train_seconds",
    "prepare_seconds",
    "git_commit",
    "created",
}
CARD_TIMING = re.compile(r"training time|tokens per second|MFU|FLOP/s|peak per device", re.I)


Paths = list[tuple[str, str]]  # (folder, its placeholder)


def _paths(text: str, paths: Paths) -> str:
    for folder, mark in paths:
        text = text.replace(folder, mark)
    return text


def _clean(value: Any, root: Paths) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v, root) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_clean(v, root) for v in value]
    if isinstance(value, str):
        return _paths(value, root)
    return value


def _json(path: Path, root: Paths) -> Any:
    return _clean(json.loads(path.read_text(encoding="utf-8")), root)


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {str(a)[:120]} != {str(b)[:120]}")


def compare(a: Path, b: Path, root_a: Paths, root_b: Paths) -> list[str]:
    out: list[str] = []
    _diff(_json(a / "results.json", root_a), _json(b / "results.json", root_b), "results.json", out)
    ma = [_clean(json.loads(x), root_a) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [_clean(json.loads(x), root_b) for x in (b / "metrics.jsonl").read_text().splitlines()]
    _diff(ma, mb, "metrics.jsonl", out)
    files_a = sorted(str(p.relative_to(a)) for p in (a / "checkpoints").rglob("*") if p.is_file())
    files_b = sorted(str(p.relative_to(b)) for p in (b / "checkpoints").rglob("*") if p.is_file())
    _diff(files_a, files_b, "checkpoint files", out)
    for rel in files_a:
        if rel.endswith("progress.json") and rel in files_b:
            _diff(_json(a / rel, root_a), _json(b / rel, root_b), rel, out)
    for rel in ("model/model.safetensors", *(f"predictions/{p.name}" for p in (a / "predictions").glob("*"))):
        if (a / rel).read_bytes() != ((b / rel).read_bytes() if (b / rel).is_file() else None):
            out.append(f"{rel}: the bytes differ")

    def card(run: Path, root: Paths) -> list[str]:
        text = (run / "model" / "README.md").read_text(encoding="utf-8")
        return [_paths(ln, root) for ln in text.splitlines() if not CARD_TIMING.search(ln)]

    _diff(card(a, root_a), card(b, root_b), "model/README.md", out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--same", action="append", default=[], metavar="PATH_A=PATH_B", help="folders that match")
    args = p.parse_args()
    pairs = [x.split("=", 1) for x in args.same]
    # longest first, so a folder inside another is replaced before its parent
    pairs.sort(key=lambda ab: -len(ab[0]))
    diffs = compare(
        args.a,
        args.b,
        [(x, f"<path{i}>") for i, (x, _) in enumerate(pairs)],
        [(y, f"<path{i}>") for i, (_, y) in enumerate(pairs)],
    )
    print("\n".join(diffs) if diffs else "same")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
