"""Tag a corpus: every input part to one output part, each written whole, then a manifest.

    job = TagJob(model="runs/x/model", output="s3://bucket/tagged/", input_format="text")
    summary = tag_corpus(["s3://bucket/docs/"], job)    # in this process, or with a runner
                                                        # (launcher/tag.py: a Ray Data actor pool)
Inside: `plan_parts` (one PartTask per input file, output names), `resume` (the parts a killed run
already wrote are skipped), `PartTagger` (the model loaded once; one per Ray actor) called on each
part still to tag, `finish` (MANIFEST.json and the summary).

The output is a folder or an `s3://` prefix. Each part is written to a temporary file and only then
made visible: renamed into place in a folder, uploaded in one request (a multipart upload, completed
at its end, above 64 MB) to a bucket; then its marker `.parts/<job>/<part>.json` records what it holds
(the input it came from and that input's sha256 or ETag, its lines, entities, size and sha256). A
part counts as written once its marker is in and names the same input content: a rerun of a killed
job tags only the parts without one, so no line is ever lost, half-written or written twice.
`MANIFEST.json`, written last, lists the parts in input order with their line counts.

Nothing here imports Ray: the launcher runs `PartTagger` on an actor pool, and this module runs the
same class in-process; the two write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raytag.cluster.digest import sha256_file
from raytag.cluster.inputs import InputFile, list_inputs, read_input
from raytag.cluster.keys import TMP_MARK, is_remote, split_s3_uri
from raytag.cluster.storage import StorageError, open_storage

from .faults import inject_fault
from .predict import PredictError
from .progress import TagProgress
from .tag import BATCH_TOKENS, Tagger
from .tag_io import (
    EXTENSIONS,
    OutputWriter,
    TagInputError,
    Unit,
    check_formats,
    default_output,
    format_of,
    read_units,
)

log = logging.getLogger("raytag")

MANIFEST = "MANIFEST.json"
MARKERS = ".parts"  # one marker per written part: .parts/<job key>/<output part>.json
CHUNK_UNITS = 4096  # units tagged together: length-grouped batches form within a chunk
PROGRESS_EVERY_S = 30.0  # a Ray actor's progress line on a long part


@dataclass(frozen=True)
class TagJob:
    """What to tag with and where to: everything a worker needs, as plain values."""

    model: str  # a model folder or an s3:// prefix holding one
    output: str  # a folder or an s3:// prefix
    input_format: str | None = None  # None: each part's own, from its name (tag_io.format_of)
    output_format: str | None = None  # None: entities, or conll for CoNLL input
    text_field: str = "text"
    batch_tokens: int = BATCH_TOKENS
    skip_bad_parts: bool = False

    def formats(self, uri: str) -> tuple[str, str]:
        """The input and output format of the part read from `uri`."""
        fmt_in = format_of(uri, self.input_format)
        fmt_out = self.output_format or default_output(fmt_in)
        check_formats(fmt_in, fmt_out)
        return fmt_in, fmt_out


@dataclass(frozen=True)
class PartTask:
    """One input part and the output part it becomes."""

    index: int  # its place among the job's parts (input order)
    input: str  # a local path or s3://bucket/key
    size: int
    tag: str  # the input's content: sha256 of a file, ETag of an object
    output: str  # the output part's key below the output root


@dataclass
class PartResult:
    """What tagging one part gave: its counts, or why it could not be read (`error`)."""

    index: int
    input: str
    output: str = ""
    lines: int = 0
    entities: int = 0
    bytes: int = 0
    sha256: str = ""
    input_tag: str = ""
    job: str = ""
    error: str = ""  # the bad part's message (PART:LINE: reason); nothing was written
    seconds: float = 0.0
    resumed: bool = False  # written by an earlier run of the job

    def marker(self) -> str:
        """The part's marker: what it holds and where it came from."""
        doc = {k: v for k, v in asdict(self).items() if k not in ("error", "seconds", "resumed", "index")}
        return json.dumps(doc, indent=1)


# ------------------------------------------------------------------------------------------ plan


def plan_parts(inputs: Sequence[str], job: TagJob) -> list[PartTask]:
    """The job's parts, in input order: every file each input path names (a file, folder, glob,
    s3:// prefix or glob; cluster/inputs.py), each once, with its output part's name: its path
    below the inputs' common folder, the extension the output format's. Raises PredictError when
    two inputs would write the same output part or an input lies inside the output, StorageError
    when a path matches nothing."""
    files: dict[str, InputFile] = {}
    for pattern in inputs:
        for f in list_inputs(pattern):
            files.setdefault(f.uri, f)
    if not files:
        raise PredictError("no input given")
    out_root = _location(job.output)
    inside = [u for u in files if _location(u).startswith(out_root + "/")]
    if inside:
        raise PredictError(f"input {inside[0]} lies inside the output {job.output}: tag into another folder")
    names = {u: _location(u).split("://", 1)[-1].lstrip("/") for u in files}
    base = posixpath.commonpath([posixpath.dirname(n) for n in names.values()])
    tasks: list[PartTask] = []
    seen: dict[str, str] = {}
    for i, (uri, f) in enumerate(files.items()):
        rel = names[uri][len(base) :].lstrip("/") if base else names[uri]
        out = posixpath.splitext(rel)[0] + EXTENSIONS[job.formats(uri)[1]]
        if out in seen:
            raise PredictError(f"inputs {seen[out]} and {uri} would both be written to {out}: rename one")
        seen[out] = uri
        tasks.append(PartTask(i, uri, f.size, f.tag, out))
    return tasks


def _location(uri: str) -> str:
    """A path or s3:// URI in one comparable form (absolute path; s3://bucket/key), no final slash."""
    if is_remote(uri):
        bucket, key = split_s3_uri(uri)
        return f"s3://{bucket}/{key}".rstrip("/")
    return str(Path(uri).expanduser().resolve())


def marker_key(key: str, part: str) -> str:
    """Where the marker of output part `part` of job `key` lives: the job's key in its path, so a
    listing tells whether another job wrote into the same output."""
    return f"{MARKERS}/{key}/{part}.json"


def job_key(job: TagJob) -> str:
    """What makes two runs the same job: the model (its config.json, raytag.json and file sizes),
    the formats and the text field. A part written under another key is not the job's. Raises
    PredictError when the model folder (or prefix) holds no config.json."""
    store = open_storage(job.model)
    files = {name: size for name, size in store.list_sizes("").items() if "/" not in name}
    if "config.json" not in files:
        raise PredictError(f"{job.model}: not a model folder (no config.json)")
    h = hashlib.sha256()
    h.update(json.dumps([job.input_format, job.output_format, job.text_field]).encode())
    for name, size in files.items():
        h.update(f"{name}:{size}\n".encode())
        if name in ("config.json", "raytag.json"):
            h.update(store.get_bytes(name) or b"")
    return h.hexdigest()[:16]


def local_model(model: str) -> str:
    """A local folder holding `model`: itself, or for an s3:// prefix a copy fetched once per node
    into the temporary folder (keyed by the prefix and its objects' sizes). Raises StorageError."""
    if not is_remote(model):
        return model
    store = open_storage(model)
    sizes = store.list_sizes("")
    if not sizes:
        raise StorageError(f"{model}: no model there (no objects below the prefix)")
    digest = hashlib.sha256(json.dumps([model, sorted(sizes.items())]).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "raytag-models" / digest
    if not (folder / ".complete").exists():
        for key in sizes:
            if "/" not in key:  # the model folder's own files (plots etc. in subfolders are not needed)
                store.get_file(key, folder / key)
        (folder / ".complete").write_text(model)
    return str(folder)


def resume(tasks: Sequence[PartTask], job: TagJob, key: str) -> tuple[list[PartTask], list[PartResult]]:
    """Split the parts into those still to tag and those an earlier run of the job wrote (a marker
    naming the same input content, its part present at the recorded size). A part whose input
    changed is tagged again. In a folder, the temporary files of parts a killed run was writing are
    removed. Raises PredictError when the output holds parts of another job (another model, formats
    or text field)."""
    store = open_storage(job.output)
    root = None if is_remote(job.output) else Path(store.uri)
    for stale in root.rglob(f"{TMP_MARK}*") if root is not None and root.is_dir() else []:
        stale.unlink(missing_ok=True)  # a killed run's unfinished part: never visible, now gone
    present = store.list_sizes("")
    others = {k.split("/")[1] for k in present if k.startswith(f"{MARKERS}/")} - {key}
    if others:
        raise PredictError(
            f"{store.uri} holds parts another job wrote (another model, format or text field): tag "
            "into a new output, or delete the old one first"
        )
    todo, done = [], []
    for t in tasks:
        marker = marker_key(key, t.output)
        raw = store.get_bytes(marker) if marker in present else None
        if raw is None:
            todo.append(t)
            continue
        doc = json.loads(raw)
        if doc.get("input_tag") != t.tag or present.get(t.output) != doc.get("bytes"):
            log.warning(
                "%s: its input changed since it was tagged (or it is gone): tagging it again", t.output
            )
            todo.append(t)
            continue
        fields = {k: doc[k] for k in ("output", "lines", "entities", "bytes", "sha256", "input_tag", "job")}
        done.append(PartResult(t.index, t.input, resumed=True, **fields))
    return todo, done


# ------------------------------------------------------------------------------------ one part


class PartTagger:
    """Tags whole parts: the model loaded once (one per Ray actor), then `__call__(task)` per part.

    `on_progress(lines, bytes)` hears of each chunk tagged (the bytes: the chunk's share of the
    part's input). Without it, a part that runs long logs a progress line every 30 s (on a Ray
    actor the driver's log shows them)."""

    def __init__(self, job: TagJob, on_progress: Callable[[int, float], None] | None = None) -> None:
        t0 = time.perf_counter()
        self.job = job
        self.key = job_key(job)
        self.tagger = Tagger(local_model(job.model), job.batch_tokens)
        self.storage = open_storage(job.output)
        self.on_progress = on_progress
        log.info(
            "model %s loaded in %.1f s (%s)", job.model, time.perf_counter() - t0, self.tagger.describe()
        )

    def _progress(self, task: PartTask) -> Callable[[int, int], None]:
        """Chunk by chunk: to `on_progress`, or a log line every 30 s of a long part."""
        last_log, last_done = time.monotonic(), 0

        def chunk_done(done: int, total: int) -> None:
            nonlocal last_log, last_done
            if self.on_progress is not None:
                self.on_progress(done - last_done, task.size * (done - last_done) / max(1, total))
                last_done = done
            elif time.monotonic() - last_log > PROGRESS_EVERY_S:
                last_log = time.monotonic()
                log.info("%s: %d of %d lines tagged", task.input, done, total)

        return chunk_done

    def __call__(self, task: PartTask) -> PartResult:
        """Tag one part and write it whole, then its marker; a part that cannot be read or parsed
        gives a result with `error` set and writes nothing."""
        t0 = time.perf_counter()
        fmt_in, fmt_out = self.job.formats(task.input)
        try:
            units = read_units(read_input(task.input), task.input, fmt_in, self.job.text_field)
        except StorageError as e:
            return PartResult(task.index, task.input, error=f"{task.input}: cannot be read ({e})")
        except TagInputError as e:
            return PartResult(task.index, task.input, error=str(e))
        target = self.storage.local_path(task.output)
        folder = target.parent if target is not None else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{TMP_MARK}{uuid.uuid4().hex}-{posixpath.basename(task.output)}"
        try:
            with open(tmp, "wb") as out:
                writer = OutputWriter(out, fmt_out, fmt_in)
                tag_units(self.tagger, units, writer, self._progress(task))
                writer.close(task.input)
                out.flush()
                os.fsync(out.fileno())
            inject_fault(0, task.index, "part")  # tests: a job killed with a part half-done
            result = PartResult(
                task.index,
                task.input,
                task.output,
                writer.records,
                writer.entities,
                tmp.stat().st_size,
                sha256_file(tmp),
                task.tag,
                self.key,
            )
            if target is not None:
                os.replace(tmp, target)  # the part appears whole, or not at all
            else:
                self.storage.put_file(task.output, tmp)  # one PUT, or a multipart upload completed at its end
        except TagInputError as e:
            return PartResult(task.index, task.input, error=str(e))
        finally:
            tmp.unlink(missing_ok=True)
        self.storage.put_bytes(marker_key(self.key, task.output), result.marker().encode())
        result.seconds = time.perf_counter() - t0
        return result


def tag_units(
    tagger: Tagger,
    units: Sequence[Unit],
    writer: OutputWriter,
    on_chunk: Callable[[int, int], None] | None = None,
) -> list[list[str]]:
    """Tag `units` chunk by chunk into `writer`; `on_chunk(done, total)` after each chunk. For CoNLL
    output, returns the tags of each sentence written (text lines are split into words as CoNLL
    writes them; a line without words writes no sentence: CoNLL has no empty sentence)."""
    from .words import split_words

    all_tags: list[list[str]] = []
    for c0 in range(0, len(units), CHUNK_UNITS):
        chunk = list(units[c0 : c0 + CHUNK_UNITS])
        if writer.fmt == "conll":
            if writer.input_format == "text":
                chunk = [Unit(u.number, words=split_words(u.text or "")) for u in chunk]
                chunk = [u for u in chunk if u.words]
            results: list[Any] = tagger.tag_words([u.words for u in chunk])[0]
            all_tags += results
        else:
            results = tagger.entities([u.text or "" for u in chunk])
        writer.write(chunk, results)
        if on_chunk is not None:
            on_chunk(min(c0 + CHUNK_UNITS, len(units)), len(units))
    return all_tags


# ---------------------------------------------------------------------------------- the whole job


Runner = Callable[[Sequence[PartTask]], Iterable[PartResult]]


def in_process(job: TagJob, progress: TagProgress) -> Runner:
    """The runner without Ray: one PartTagger in this process, parts one after another."""

    def run(tasks: Sequence[PartTask]) -> Iterable[PartResult]:
        if not tasks:
            return
        tagger = PartTagger(job, on_progress=progress.advance)
        for t in tasks:
            yield tagger(t)

    return run


def tag_corpus(
    inputs: Sequence[str], job: TagJob, runner: Callable[[TagProgress], Runner] | None = None
) -> dict:
    """Tag every part of `inputs` into `job.output` (see the module's docstring) with `runner`
    (default: in this process), write the manifest, and return the summary. Raises TagInputError
    for a bad part (unless `job.skip_bad_parts`), PredictError, StorageError."""
    t0 = time.perf_counter()
    tasks = plan_parts(inputs, job)
    open_storage(job.output).preflight()
    key = job_key(job)
    todo, done = resume(tasks, job, key)
    if done:
        log.info("%d of %d parts already written by an earlier run: skipped", len(done), len(tasks))
    progress = TagProgress(len(tasks), sum(t.size for t in todo), len(done))
    results = {r.index: r for r in done}
    sizes = {t.index: t.size for t in tasks}
    skipped: list[PartResult] = []
    try:
        for r in (runner or (lambda p: in_process(job, p)))(progress)(todo):
            progress.part_done(sizes[r.index], r.lines, f"{r.input}: {r.error or f'{r.lines:,} lines'}")
            if r.error:
                if not job.skip_bad_parts:
                    raise PredictError(r.error)
                log.warning("skipped (--skip-bad-parts): %s", r.error)
                skipped.append(r)
            else:
                results[r.index] = r
    finally:
        progress.close()
    return finish(tasks, results, skipped, job, key, time.perf_counter() - t0)


def finish(
    tasks: Sequence[PartTask],
    results: dict[int, PartResult],
    skipped: Sequence[PartResult],
    job: TagJob,
    key: str,
    seconds: float,
) -> dict:
    """Write MANIFEST.json (parts in input order, their counts; skipped parts with their reason)
    and return the summary: parts, lines, entities, lines per second."""
    store = open_storage(job.output)
    parts = [results[t.index] for t in tasks if t.index in results]
    manifest = {
        "format": 1,
        "model": job.model,
        "job": key,
        "text_field": job.text_field,
        "lines": sum(p.lines for p in parts),
        "entities": sum(p.entities for p in parts),
        "parts": [
            {
                "input": p.input,
                "output": p.output,
                "lines": p.lines,
                "entities": p.entities,
                "bytes": p.bytes,
                "sha256": p.sha256,
            }
            for p in parts
        ],
        "skipped": [{"input": s.input, "error": s.error} for s in sorted(skipped, key=lambda s: s.index)],
    }
    store.put_bytes(MANIFEST, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    fresh = [p for p in parts if not p.resumed]
    lines_now = sum(p.lines for p in fresh)
    return {
        "output": store.uri,
        "parts": len(parts),
        "resumed": len(parts) - len(fresh),
        "skipped": len(skipped),
        "lines": manifest["lines"],
        "entities": manifest["entities"],
        "seconds": seconds,
        "lines_per_second": lines_now / seconds if seconds > 0 else 0.0,
    }


def summary_line(s: dict) -> str:
    """The summary as one line for the user."""
    extra = []
    if s["resumed"]:
        extra.append(f"{s['resumed']} from an earlier run")
    if s["skipped"]:
        extra.append(f"{s['skipped']} bad part(s) skipped")
    more = f" ({', '.join(extra)})" if extra else ""
    return (
        f"tagged {s['parts']} part(s){more}: {s['lines']:,} lines, {s['entities']:,} entities in "
        f"{s['seconds']:.1f} s ({s['lines_per_second']:,.0f} lines/s) -> {s['output']}"
    )
