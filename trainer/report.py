"""`python trainer/main.py report RUN [--output FILE]`: a run's summary and one self-contained HTML page.

RUN is a local run folder or `s3://bucket/prefix/run-name`, read through the storage layer
(`raytag.cluster.storage`, endpoint and credentials from the environment). The page holds the
plots of `plots.py` (embedded PNGs), the results per set and per type, the config, provenance
and the validation sentences with the most entity errors. A run still training (no
results.json yet) gets its curves and latest evaluations from metrics.jsonl, and the page says
what is not available yet.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import plots

WORST = 20  # validation sentences shown, most entity errors first
PREDICTED_SETS = ("validation", "test")


class ReportError(Exception):
    """RUN is not a run (no such folder or prefix, or no run files in it)."""


@dataclass
class RunFiles:
    """What the report reads of a run; None or empty where the run has not written it (yet)."""

    name: str
    where: str  # the run's location, for people (a path, or s3://... with its endpoint)
    records: list[dict[str, Any]]
    results: dict[str, Any] | None
    config: str | None
    predictions: dict[str, tuple[list[list[str]], list[list[str]], list[list[str]]]] = field(
        default_factory=dict
    )  # set -> (words, gold, predicted) per sentence

    @property
    def finished(self) -> bool:
        return self.results is not None


def parse_predictions(text: str) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """predictions/<set>.txt (`word gold predicted` lines, a blank line between sentences) ->
    words, gold tags and predicted tags per sentence."""
    words: list[list[str]] = []
    gold: list[list[str]] = []
    pred: list[list[str]] = []
    current: list[list[str]] = [[], [], []]
    for line in [*text.splitlines(), ""]:
        cols = line.split()
        if not cols:
            if current[0]:
                words.append(current[0])
                gold.append(current[1])
                pred.append(current[2])
                current = [[], [], []]
            continue
        if len(cols) < 3:
            raise ReportError(f"predictions line {line!r}: expected `word gold predicted`")
        current[0].append(cols[0])
        current[1].append(cols[-2])
        current[2].append(cols[-1])
    return words, gold, pred


def read_run(uri: str) -> RunFiles:
    """Read a run's files from a local folder or an S3 prefix. Raises ReportError when there is no
    run there, StorageError when the storage cannot be read."""
    from raytag.cluster.keys import is_remote, split_s3_uri
    from raytag.cluster.storage import open_storage

    if is_remote(uri):
        bucket, prefix = split_s3_uri(uri)
        name = prefix.rsplit("/", 1)[-1] if prefix else bucket
    else:
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise ReportError(f"no such run: {uri} is not a folder")
        name = path.resolve().name
    store = open_storage(uri)

    def text(key: str) -> str | None:
        data = store.get_bytes(key)
        return None if data is None else data.decode("utf-8", errors="replace")

    metrics, results_text = text("metrics.jsonl"), text("results.json")
    if metrics is None and results_text is None:
        raise ReportError(f"{store.display('')} is not a run: it has no metrics.jsonl or results.json")
    try:
        results = json.loads(results_text) if results_text is not None else None
    except json.JSONDecodeError as e:
        raise ReportError(f"{store.display('results.json')}: not JSON ({e})") from None
    run = RunFiles(name, store.display(""), plots.parse_metrics(metrics or ""), results, text("config.yaml"))
    for split in PREDICTED_SETS:
        found = text(f"predictions/{split}.txt")
        if found is not None:
            run.predictions[split] = parse_predictions(found)
    return run


def latest_evals(records: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The newest evaluation record of every set, validation first."""
    out: dict[str, Mapping[str, Any]] = {}
    for r in records:
        if r.get("type") == "eval":
            out[str(r.get("split"))] = r
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "validation", kv[0])))


def _f(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def summary(run: RunFiles) -> list[tuple[str, str]]:
    """(label, value) lines: name, status, steps, best dev F1, test F1, training time."""
    res = run.results or {}
    steps = res.get("global_steps") or max((r.get("step", 0) for r in run.records), default=0)
    best = res.get("best_step") if run.finished else plots.best_step(run.records)
    val_f1s = [r["f1"] for r in run.records if r.get("split") == "validation" and r.get("f1") is not None]
    best_f1 = (res.get("validation") or {}).get("f1") if run.finished else max(val_f1s, default=None)
    test = (res.get("test") or {}).get("f1")
    return [
        ("run", f"{run.name} ({run.where})"),
        ("status", "finished" if run.finished else "still training (no results.json yet)"),
        ("steps", f"{steps}" + (f" (best step {best})" if best is not None else "")),
        ("best dev F1", _f(best_f1) + ("" if run.finished else " (so far)")),
        ("test F1", _f(test) if run.finished else "not yet (scored when the run finishes)"),
        (
            "train time",
            f"{res['train_runtime_seconds']:.1f} s"
            if res.get("train_runtime_seconds") is not None
            else "not yet (in results.json when the run finishes)",
        ),
    ]


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1500px;
 padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:.5em 0;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow:auto;max-height:40em}
.note{background:#fff7e0;border-left:4px solid #f0b000;padding:.5em 1em}
.muted{color:#666} .sent{margin:.8em 0 1.2em} .line{margin:.15em 0;line-height:2.1}
.line b{display:inline-block;width:5.5em;color:#555;font-weight:normal}
.ent{border-radius:3px;padding:1px 3px;border:2px solid transparent}
.ent sup{font-size:70%;font-weight:bold;margin-left:2px}
.ent.err{border-color:#c00;border-style:dashed}
"""
_PALETTE = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    """A table of escaped cells (None header: none), right-aligned from column `numeric_from`."""
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i >= numeric_from else ''}>{_e(v)}</td>" for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _img(name: str, data: bytes, alt: str) -> str:
    w, h = plots.SIZES[name]
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img src="{src}" alt="{_e(alt)}" width="{w}" height="{h}">'


def _scores_tables(sets: Mapping[str, Mapping[str, Any]], extra: str | None = None) -> str:
    """Scores per set, then per set and type; `extra` names a column more (a record's step)."""
    rows = [
        [
            name,
            *([r.get(extra, "-")] if extra else []),
            r.get("sentences", "-"),
            _pct(r.get("precision")),
            _pct(r.get("recall")),
            _pct(r.get("f1")),
            _pct(r.get("accuracy")),
            _f(r.get("loss")),
        ]
        for name, r in sets.items()
    ]
    header = [
        "set",
        *([extra] if extra else []),
        "sentences",
        "precision %",
        "recall %",
        "F1 %",
        "accuracy %",
    ]
    out = _table([*header, "loss"], rows)
    per = [
        [
            name,
            t,
            _pct(m.get("precision")),
            _pct(m.get("recall")),
            _pct(m.get("f1")),
            m.get("support"),
            m.get("predicted"),
        ]  # fmt: skip
        for name, r in sets.items()
        for t, m in sorted((r.get("per_type") or {}).items())
    ]
    if per:
        out += "<h3>Per entity type</h3>" + _table(
            ["set", "type", "precision %", "recall %", "F1 %", "support (gold)", "predicted"], per, 2
        )
    return out


def _colour(types: Sequence[str]) -> dict[str, str]:
    return {t: _PALETTE[i % len(_PALETTE)] for i, t in enumerate(types)}


def _marked(
    words: Sequence[str], ents: Sequence[tuple[str, int, int]], bad: set, colour: Mapping[str, str]
) -> str:
    """Words with entity spans coloured by type, the type as a label; dashed red where `bad`."""
    starts = {s: (t, e) for t, s, e in ents}
    out, i = [], 0
    while i < len(words):
        if i in starts:
            t, e = starts[i]
            cls = "ent err" if (t, i, e) in bad else "ent"
            text = " ".join(_e(w) for w in words[i:e])
            out.append(
                f'<span class="{cls}" style="background:{colour.get(t, "#ddd")}">{text}<sup>{_e(t or "?")}</sup></span>'
            )
            i = e
        else:
            out.append(_e(words[i]))
            i += 1
    return " ".join(out)


def worst_sentences(
    words: Sequence[Sequence[str]],
    gold: Sequence[Sequence[str]],
    pred: Sequence[Sequence[str]],
    n: int = WORST,
) -> list[tuple[int, dict[str, int]]]:
    """(sentence index, errors by kind) of the `n` sentences with the most entity errors (missed +
    spurious + wrong type), most first, then in file order; sentences without errors left out."""
    errs = [(i, plots.entity_errors(g, p)) for i, (g, p) in enumerate(zip(gold, pred, strict=True))]
    errs = [(i, e) for i, e in errs if sum(e.values())]
    errs.sort(key=lambda ie: (-sum(ie[1].values()), ie[0]))
    return [(i, dict(e)) for i, e in errs[:n]]


def _worst_html(words, gold, pred) -> str:
    worst = worst_sentences(words, gold, pred)
    if not worst:
        return "<p>No validation sentence has an entity error.</p>"
    types = sorted({t for tags in (*gold, *pred) for t, _, _ in plots.chunks(tags)})
    colour = _colour(types)
    legend = " ".join(f'<span class="ent" style="background:{colour[t]}">{_e(t)}</span>' for t in types)
    parts = [
        f"<p>The {len(worst)} validation sentences with the most entity errors (missed + spurious + wrong "
        f"type), from <code>predictions/validation.txt</code>. Types: {legend}; a dashed red box is an "
        "entity the other side does not have with the same span and type.</p>"
    ]
    for rank, (i, errs) in enumerate(worst, 1):
        g, p = plots.chunks(gold[i]), plots.chunks(pred[i])
        what = ", ".join(f"{v} {k}" for k, v in sorted(errs.items()))
        parts.append(
            f'<div class="sent"><div class="muted">#{rank}: sentence {i + 1}, {sum(errs.values())} '
            f"entity errors ({_e(what)})</div>"
            f'<div class="line"><b>gold</b> {_marked(words[i], g, set(g) - set(p), colour)}</div>'
            f'<div class="line"><b>predicted</b> {_marked(words[i], p, set(p) - set(g), colour)}</div></div>'
        )
    return "".join(parts)


def _provenance_html(res: Mapping[str, Any]) -> str:
    prov = res.get("provenance") or {}
    rows = [
        ["raytag", prov.get("raytag_version")],
        ["git commit", prov.get("git_commit")],
        *[[k, v] for k, v in (prov.get("packages") or {}).items() if k != "raytag"],
    ]
    out = _table(["", "version"], rows, 99)
    data = [
        [
            split,
            ", ".join(d["path"]) if isinstance(d.get("path"), list) else d.get("path"),
            d.get("sha256"),
            d.get("sentences"),
            ", ".join(d["scheme"]) if isinstance(d.get("scheme"), list) else d.get("scheme"),
        ]  # fmt: skip
        for split, d in (prov.get("data") or {}).items()
    ]
    out += "<h3>Data files</h3>" + _table(["split", "path", "sha256", "sentences", "scheme"], data, 3)
    out += (
        "<p class=\"muted\">train: the sha256 is the prepared data's fingerprint (the inputs' content, "
        "tokenizer, window and tag settings).</p>"
    )
    speed = [
        [k, res.get(k)]
        for k in (
            "train_runtime_seconds",
            "train_tokens_per_second",
            "train_mfu",
            "devices",
            "train_tokens",
            "global_steps",
            "epochs",
            "best_step",
            "model_checkpoint",
            "resumed_from",
        )  # fmt: skip
        if k in res
    ]
    return out + "<h3>Training</h3>" + _table(["measure", "value"], speed, 99)


def render_html(run: RunFiles, pngs: Mapping[str, bytes], plot_error: str | None = None) -> str:
    """The report page: every text escaped, the plots as data: PNGs, no outside resource."""
    res = run.results or {}
    body = [f"<h1>raytag run {_e(run.name)}</h1>"]
    body.append(f'<p class="muted">{_e(run.where)}; report made {_e(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>')
    body.append('<h2 id="summary">Summary</h2>' + _table(None, summary(run), 99))
    if not run.finished:
        body.append(
            '<p class="note" id="not-yet">This run is still training (no results.json yet), or stopped '
            "before it finished. Shown: the curves and latest evaluations from metrics.jsonl. Not available "
            "yet: the final scores with the best checkpoint, the test set, provenance, the predictions (the "
            "confusion matrix and the worst sentences) and the exported model.</p>"
        )
    body.append('<h2 id="plots">Plots</h2>')
    if plot_error:
        body.append(f'<p class="note">The plots could not be drawn: {_e(plot_error)}</p>')
    for name in plots.PLOTS:
        if name in pngs:
            caption = plots.CAPTIONS[name]
            body.append(f"<h3>{_e(caption)}</h3>" + _img(name, pngs[name], caption))
    if run.finished:
        sets = {k: v for k, v in res.items() if isinstance(v, dict) and "f1" in v and "per_type" in v}
        body.append('<h2 id="results">Results (best checkpoint)</h2>')
        body.append(_scores_tables(sets) if sets else "<p>No evaluation set.</p>")
    else:
        latest = latest_evals(run.records)
        body.append('<h2 id="results">Latest evaluations (from metrics.jsonl)</h2>')
        body.append(_scores_tables(latest, "step") if latest else "<p>No evaluation yet.</p>")
    body.append('<h2 id="worst">Worst-predicted validation sentences</h2>')
    if "validation" in run.predictions:
        body.append(_worst_html(*run.predictions["validation"]))
    else:
        body.append("<p>Not available yet: predictions/validation.txt is written when the run finishes.</p>")
    body.append('<h2 id="config">Config</h2>')
    body.append(f"<pre>{_e(run.config)}</pre>" if run.config else "<p>No config.yaml.</p>")
    body.append('<h2 id="provenance">Provenance</h2>')
    body.append(_provenance_html(res) if run.finished else "<p>Not available yet (in results.json).</p>")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>raytag report: {_e(run.name)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def report_plots(run: RunFiles) -> dict[str, bytes]:
    """The plots of `plots.run_plots` from what the run has: final results and predictions when
    finished, else the latest evaluations' per-type scores."""
    if run.finished:
        results = run.results or {}
        best = results.get("best_step")
    else:
        results, best = dict(latest_evals(run.records)), None
    tags = {s: (gold, pred) for s, (_, gold, pred) in run.predictions.items()}
    return plots.run_plots(run.records, results, tags, best)


def default_output(uri: str, name: str) -> Path:
    """`<RUN>/report.html` for a local run, `./<run-name>-report.html` for one in a bucket."""
    from raytag.cluster.keys import is_remote

    return Path(f"{name}-report.html") if is_remote(uri) else Path(uri).expanduser() / "report.html"


def report(uri: str, output: str | None = None) -> tuple[Path, list[tuple[str, str]]]:
    """Read the run at `uri`, write its page (to `output` or the default) and return where and
    the summary. Raises ReportError (no run there), StorageError, OSError (cannot write)."""
    run = read_run(uri)
    error = None
    try:
        pngs = report_plots(run)
    except ImportError as e:  # matplotlib missing: the page without plots, saying why
        pngs, error = {}, f"{type(e).__name__}: {e}"
    out = Path(output) if output else default_output(uri, run.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_html(run, pngs, error), encoding="utf-8")
    tmp.replace(out)
    return out, summary(run)
