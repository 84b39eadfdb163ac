"""Prepared training data: CoNLL inputs become validated, tokenised, windowed Parquet shards, once.

prepare   each corpus's inputs (files, folders, globs, s3:// prefixes; sorted by name) -> a fingerprint
          of their content, the tokenizer, the window and tag settings -> `<prepared>/<fingerprint>/`.
          When its MANIFEST.json is there and every piece checks out (size; sha256 where the bytes are
          local), it is reused and the log says so. Otherwise:
            pass 1, per file (in parallel): read, validate (ConllError naming file and line), count
                    sentences, collect tags
            pass 2, per file (in parallel): read again, tokenise, window, and write the file's pieces of
                    the corpus's fixed-size shards: shard k holds sentences [k*S, (k+1)*S) of the corpus
                    in file order, so the same sentences in one file or in many give the same shards
            index.parquet (shard, length, labelled of every window), then MANIFEST.json last.
The plan over these shards, and a rank's reads of them: trainer/shard_plan.py.

Only storage calls (cluster/storage.py and the modules beside it) touch files and buckets here.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raytag.cluster.digest import sha256_bytes, sha256_file

from .config import ConfigError
from .tables import Columns, expand, table_format

log = logging.getLogger("raytag")

FORMAT = 1  # bump when the shard layout or the windowing changes: old preparations are then not reused
SHARD_TARGET = 64  # shards per corpus wanted (for balance across workers), between:
SHARD_MIN_SENTENCES = 32
SHARD_MAX_SENTENCES = 2048
INLINE_BYTES = 8 << 20  # inputs smaller than this are prepared in-process, larger ones in parallel
MANIFEST = "MANIFEST.json"
INDEX = "index.parquet"


class ShardError(RuntimeError):
    """A prepared shard is missing or does not match its checksum; one line naming it."""


# ---------------------------------------------------------------------------------------------
# what to prepare


@dataclass(frozen=True)
class Corpus:
    name: str
    paths: tuple[str, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class PrepareSpec:
    """Everything preparation depends on, as plain values (built from the config by `spec_from_config`)."""

    corpora: tuple[Corpus, ...]
    tokenizer: str  # model.name_or_path
    max_length: int | None
    stride: int
    tag_scheme: str
    strict: bool
    max_sentences: int | None  # per corpus: its first N sentences
    labels: tuple[str, ...] | None  # data.labels, if configured
    prepared: str  # storage URI of the prepared-data root
    endpoint_url: str | None = None
    region: str | None = None
    columns: tuple[str, str] = ("tokens", "ner_tags")  # data.columns of dataset inputs: words, tags


def corpora_of(train: Any) -> tuple[Corpus, ...]:
    """`data.train` (a path, a list, or {name: CorpusConfig}) as corpora, sorted by name."""
    from .data import resolve_data_path

    def paths(p: Any) -> tuple[str, ...]:
        items = [p] if isinstance(p, str) else list(p)
        return tuple(resolve_data_path(x) for x in items)

    if train is None:
        raise ConfigError("data.train: no training file given")
    if isinstance(train, (str, list)):
        return (Corpus("train", paths(train), 1.0),)
    out = []
    for name, c in sorted(train.items()):
        path, weight = (c["path"], c.get("weight", 1.0)) if isinstance(c, dict) else (c.path, c.weight)
        out.append(Corpus(name, paths(path), float(weight)))
    return tuple(out)


def prepared_root(cfg: Any) -> str:
    """Where preparations live: data.prepared, else <run.storage>/prepared-data (shared by the runs there)."""
    return cfg.data.prepared or (cfg.run.storage.rstrip("/") + "/prepared-data")


def spec_from_config(cfg: Any) -> PrepareSpec:
    dc, mc, rc = cfg.data, cfg.model, cfg.run
    root = prepared_root(cfg)
    return PrepareSpec(
        corpora=corpora_of(dc.train),
        tokenizer=mc.name_or_path,
        max_length=mc.max_length,
        stride=mc.stride,
        tag_scheme=dc.tag_scheme,
        strict=dc.strict,
        max_sentences=dc.max_train_samples,
        labels=tuple(dc.labels) if dc.labels else None,
        prepared=root,
        endpoint_url=rc.s3_endpoint_url,
        region=rc.s3_region,
        columns=(dc.columns.tokens, dc.columns.tags),
    )


@dataclass
class Prepared:
    """A preparation found or made: where it is, its manifest, and the window index."""

    uri: str  # display form of <prepared>/<fingerprint>
    fingerprint: str
    manifest: dict[str, Any]
    shard_of: np.ndarray  # per window: its shard
    lengths: np.ndarray  # per window: tokens
    labelled: np.ndarray  # per window: labelled tokens (owned words)
    reused: bool = False
    starts: np.ndarray = field(init=False)  # first window of each shard

    def __post_init__(self) -> None:
        counts = np.bincount(self.shard_of, minlength=len(self.manifest["shards"]))
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def shard_windows(self, shard: int) -> int:
        return int(self.starts[shard + 1] - self.starts[shard])


# ---------------------------------------------------------------------------------------------
# prepare


def _storage(spec_or_uri: PrepareSpec | str, endpoint_url: str | None = None, region: str | None = None):
    from raytag.cluster.storage import open_storage

    if isinstance(spec_or_uri, PrepareSpec):
        return open_storage(
            spec_or_uri.prepared, endpoint_url=spec_or_uri.endpoint_url, region=spec_or_uri.region
        )
    return open_storage(spec_or_uri, endpoint_url=endpoint_url, region=region)


def fingerprint(spec: PrepareSpec, inputs: dict[str, list[Any]], tokenizer_sha: str) -> str:
    """sha256 (first 24 hex digits) of the inputs' content (in order), tokenizer, window and tag settings."""
    payload = {
        "format": FORMAT,
        "corpora": {name: [[f.size, f.tag] for f in files] for name, files in sorted(inputs.items())},
        "tokenizer": tokenizer_sha,
        "max_length": spec.max_length,
        "stride": spec.stride,
        "tag_scheme": spec.tag_scheme,
        "strict": spec.strict,
        "max_sentences": spec.max_sentences,
        "labels": list(spec.labels) if spec.labels else None,
        "shard_sentences": [SHARD_TARGET, SHARD_MIN_SENTENCES, SHARD_MAX_SENTENCES],
    }
    if any(table_format(f.uri) for files in inputs.values() for f in files):
        payload["columns"] = list(spec.columns)  # which columns of a dataset are read
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())[:24]


def shard_sentences(n: int) -> int:
    """Sentences per shard for a corpus of n sentences: about SHARD_TARGET shards, within bounds."""
    return int(min(SHARD_MAX_SENTENCES, max(SHARD_MIN_SENTENCES, math.ceil(n / SHARD_TARGET))))


def prepare(
    spec: PrepareSpec,
    tokenizer_sha: str,
    *,
    executor: Executor | None = None,
    parallel: Executor | None = None,
    rebuild: bool = False,
    say: Callable[[str], object] = log.info,
) -> Prepared:
    """Find the preparation of `spec`'s inputs, or make it. `executor` runs the per-file tasks
    (None: INLINE for small inputs, else `parallel`, default PROCESSES; the Ray launcher passes
    Ray tasks). Raises ConllError for bad input lines, StorageError for unreachable inputs or storage."""
    inputs = {
        c.name: [
            f for p in c.paths for f in expand(p, "train", endpoint_url=spec.endpoint_url, region=spec.region)
        ]
        for c in spec.corpora
    }
    fp = fingerprint(spec, inputs, tokenizer_sha)
    store = _storage(spec)
    if not rebuild:
        found = find(store, fp, say)
        if found is not None:
            say(
                f"prepared data found: {found.uri} ({found.num_shards} shards, {len(found.lengths)} windows, "
                f"{found.manifest['sentences']} sentences): preparation skipped"
            )
            return found
    started = time.monotonic()
    say(f"preparing training data into {store.display(fp + '/')} (fingerprint {fp})")
    store.delete_prefix(fp)  # a half-written or broken earlier attempt
    total_bytes = sum(f.size for files in inputs.values() for f in files)
    if executor is None:
        executor = INLINE if total_bytes < INLINE_BYTES else (parallel or PROCESSES)
    opts = {
        "tag_scheme": spec.tag_scheme,
        "strict": spec.strict,
        "labels": list(spec.labels) if spec.labels else None,
        "endpoint_url": spec.endpoint_url,
        "region": spec.region,
        "columns": list(spec.columns),
    }
    # pass 1: validate and count, every file
    scan_calls = [(f.uri, spec.max_sentences, opts) for c in spec.corpora for f in inputs[c.name]]
    scans = iter(run_tasks(_scan_file, scan_calls, executor))
    tags: set[str] = set()
    encode_calls = []
    corpora_meta: dict[str, Any] = {}
    shard_base = 0
    for c in spec.corpora:
        offset, files = 0, []
        per_file = [next(scans) for _ in inputs[c.name]]
        total = sum(s["sentences"] for s in per_file)
        if spec.max_sentences is not None:
            total = min(total, spec.max_sentences)
        size = shard_sentences(total)
        for f, s in zip(inputs[c.name], per_file, strict=True):
            take = min(s["sentences"], total - offset)
            if take <= 0:
                break
            tags.update(s["tags"])
            encode_calls.append(
                (
                    f.uri,
                    offset,
                    take,
                    size,
                    shard_base,
                    c.name,
                    spec.prepared,
                    fp,
                    spec.tokenizer,
                    spec.max_length,
                    spec.stride,
                    opts,
                )
            )
            files.append({"uri": f.uri, "sentences": take, "scheme": s["scheme"], "repaired": s["repaired"]})
            offset += take
        shards = math.ceil(total / size)
        corpora_meta[c.name] = {
            "files": files,
            "sentences": total,
            "shard_sentences": size,
            "shards": list(range(shard_base, shard_base + shards)),
        }
        shard_base += shards
    labels = list(spec.labels) if spec.labels else _label_list(tags)
    # pass 2: tokenise and window, every file; each writes its pieces of the shards
    pieces: dict[int, list[dict[str, Any]]] = {}
    stats = {"windows": 0, "split_sentences": 0, "cut_words": 0, "empty_words": 0}
    for result in run_tasks(_encode_file, encode_calls, executor):
        for piece in result:
            pieces.setdefault(piece["shard"], []).append(piece)
            for k in stats:
                stats[k] += piece["stats"].get(k, 0)
    shards_meta, shard_col, len_col, lab_col = [], [], [], []
    for c in spec.corpora:
        for k in corpora_meta[c.name]["shards"]:
            parts = sorted(pieces[k], key=lambda p: p["first"])
            shards_meta.append(
                {
                    "corpus": c.name,
                    "windows": sum(p["rows"] for p in parts),
                    "sentences": sum(p["sentences"] for p in parts),
                    "pieces": [{x: p[x] for x in ("key", "sha256", "size", "rows")} for p in parts],
                }
            )
            for p in parts:
                shard_col += [k] * p["rows"]
                len_col += p["lengths"]
                lab_col += p["labelled"]
    index_bytes = _parquet_bytes(
        {
            "shard": np.asarray(shard_col, np.int32),
            "length": np.asarray(len_col, np.int32),
            "labelled": np.asarray(lab_col, np.int32),
        }
    )
    store.put_bytes(f"{fp}/{INDEX}", index_bytes)
    manifest = {
        "format": FORMAT,
        "fingerprint": fp,
        "labels": labels,
        "sentences": sum(m["sentences"] for m in corpora_meta.values()),
        "windows": len(len_col),
        "corpora": corpora_meta,
        "shards": shards_meta,
        "index": {"key": INDEX, "sha256": sha256_bytes(index_bytes), "size": len(index_bytes)},
        "stats": stats,
        "settings": {
            "tokenizer": spec.tokenizer,
            "tokenizer_sha256": tokenizer_sha,
            "max_length": spec.max_length,
            "stride": spec.stride,
            "tag_scheme": spec.tag_scheme,
            "strict": spec.strict,
            "max_sentences": spec.max_sentences,
        },
        "prepare_seconds": round(time.monotonic() - started, 3),
        "executor": executor.name,
    }
    store.put_bytes(f"{fp}/{MANIFEST}", json.dumps(manifest, indent=1).encode())  # last: marks it complete
    say(
        f"prepared {manifest['sentences']} sentences -> {len(shards_meta)} shards, {len(len_col)} windows in "
        f"{manifest['prepare_seconds']:.1f} s ({executor.name}): {store.display(fp + '/')}"
    )
    return Prepared(
        store.display(fp),
        fp,
        manifest,
        np.asarray(shard_col, np.int64),
        np.asarray(len_col, np.int64),
        np.asarray(lab_col, np.int64),
    )


def find(store: Any, fp: str, say: Callable[[str], object] = log.info) -> Prepared | None:
    """The complete preparation `fp` in `store`, or None (missing, or a piece fails its check: logged)."""
    raw = store.get_bytes(f"{fp}/{MANIFEST}")
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
        files = [manifest["index"]] + [p for s in manifest["shards"] for p in s["pieces"]]
    except (ValueError, KeyError, TypeError):
        say(f"prepared data {store.display(fp)}: corrupt manifest; preparing again")
        return None
    sizes = store.list_sizes(fp)
    for f in files:
        key = f"{fp}/{f['key']}"
        if sizes.get(key) != f["size"]:
            say(f"prepared data: {store.display(key)} is missing or truncated; preparing again")
            return None
        local = store.local_path(key)
        if local is not None:  # cheap where the bytes are local
            try:
                sha = sha256_file(local)
            except OSError:
                sha = ""  # unreadable: as good as corrupt
            if sha != f["sha256"]:
                say(f"prepared data: {store.display(key)} fails its sha256 check; preparing again")
                return None
    index = read_parquet(verified(store, f"{fp}/{INDEX}", manifest["index"]["sha256"]))
    return Prepared(
        store.display(fp),
        fp,
        manifest,
        index["shard"].to_numpy().astype(np.int64),
        index["length"].to_numpy().astype(np.int64),
        index["labelled"].to_numpy().astype(np.int64),
        reused=True,
    )


def open_prepared(uri: str, fp: str, endpoint_url: str | None = None, region: str | None = None) -> Prepared:
    """The preparation `fp` under `uri` as rank 0 found or made it (other ranks); ShardError if gone."""
    found = find(_storage(uri, endpoint_url, region), fp, log.warning)
    if found is None:
        raise ShardError(f"prepared data {uri}/{fp} is gone or broken; run `trainer/main.py prepare` again")
    return found


# ---------------------------------------------------------------------------------------------
# the per-file tasks (top-level functions: they run in other processes or as Ray tasks)


def _read_file(uri: str, limit: int | None, opts: dict[str, Any]) -> Any:
    """Read and validate one input file (a ConllFile): CoNLL text or a dataset's file (trainer/tables.py);
    ConllError names the file and line (TableError: the row and column)."""
    from .conll import ConllOptions
    from .data import read_input_file

    options = ConllOptions(
        tag_scheme=opts["tag_scheme"], strict=opts["strict"], max_sentences=limit, labels=opts["labels"]
    )
    return read_input_file(uri, options, Columns(*opts["columns"]), opts["endpoint_url"], opts["region"])


def _scan_file(uri: str, limit: int | None, opts: dict[str, Any]) -> dict[str, Any]:
    cf = _read_file(uri, limit, opts)
    tags = {t for s in cf.sentences for t in s.tags}
    if cf.repaired:
        log.warning(
            "%s: repaired %d stray I- tag(s) that started an entity to B- (conlleval's reading)",
            uri,
            cf.repaired,
        )
    if cf.empty_rows:
        log.warning("%s: %d row(s) with no tokens are no sentences: not used", uri, cf.empty_rows)
    return {
        "sentences": len(cf.sentences),
        "tags": sorted(tags),
        "scheme": cf.scheme,
        "repaired": cf.repaired,
    }


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(name: str) -> Any:
    if name not in _TOKENIZERS:
        from .model import load_tokenizer

        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


def _encode_file(
    uri: str,
    first: int,
    take: int,
    size: int,
    shard_base: int,
    corpus: str,
    root: str,
    fp: str,
    tokenizer: str,
    max_length: int | None,
    stride: int,
    opts: dict[str, Any],
) -> list[dict[str, Any]]:
    """Tokenise sentences [0, take) of file `uri` (sentences first.. of its corpus) and write its
    pieces of the corpus's shards (shard = corpus sentence // size). Returns each piece's record."""
    from .features import encode

    sentences = _read_file(uri, take, opts).sentences[:take]
    tok = _tokenizer(tokenizer)
    store = _storage(root, opts["endpoint_url"], opts["region"])
    out = []
    i = 0
    while i < len(sentences):
        g = first + i
        k = g // size
        j = min(len(sentences), (k + 1) * size - first)
        part = sentences[i:j]
        enc = encode([s.words for s in part], None, tok, None, max_length, stride)
        cols: dict[str, list[Any]] = {
            "sentence": [],
            "input_ids": [],
            "positions": [],
            "words": [],
            "tags": [],
        }
        for w in enc.windows:
            cols["sentence"].append(g + w.sentence)
            cols["input_ids"].append(w.input_ids)
            cols["positions"].append(w.positions)
            cols["words"].append(w.words)
            cols["tags"].append([part[w.sentence].tags[x] for x in w.words.tolist()])
        body = _parquet_bytes(cols)
        key = f"shards/{corpus}-{shard_base + k:06d}-{g:010d}.parquet"
        store.put_bytes(f"{fp}/{key}", body)
        out.append(
            {
                "shard": shard_base + k,
                "first": g,
                "key": key,
                "sha256": sha256_bytes(body),
                "size": len(body),
                "rows": len(enc.windows),
                "sentences": len(part),
                "lengths": [len(w) for w in enc.windows],
                "labelled": [len(w.positions) for w in enc.windows],
                "stats": enc.stats,
            }
        )
        i = j
    return out


@dataclass(frozen=True)
class Executor:
    """How preparation runs its per-file tasks: `map(fn, calls)` gives fn(*call) for every call,
    results in order; `name` goes into the manifest and the log. The Ray launcher builds one of Ray
    tasks (raytag.launcher.ray_launcher.RAY_TASKS): this module knows nothing of Ray."""

    name: str
    map: Callable[[Callable[..., Any], Sequence[tuple]], list[Any]]


def _in_processes(fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = min(len(calls), os.cpu_count() or 1)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(fn, *zip(*calls, strict=True)))


INLINE = Executor("inline", lambda fn, calls: [fn(*c) for c in calls])
PROCESSES = Executor("processes", _in_processes)


def run_tasks(fn: Callable[..., Any], calls: Sequence[tuple], executor: Executor) -> list[Any]:
    """fn(*call) for every call, results in order (one call or none: in this process)."""
    if len(calls) <= 1:
        return INLINE.map(fn, calls)
    return executor.map(fn, calls)


# ---------------------------------------------------------------------------------------------
# small helpers


def _label_list(tags: set[str]) -> list[str]:
    from .conll import Sentence, label_list

    return label_list([Sentence(tuple(sorted(tags)), tuple(sorted(tags)), 1)])


def verified(store: Any, key: str, sha256: str, retry_budget_s: float | None = None) -> bytes:
    """The bytes of `key`, only once they match `sha256`: a corrupt shard is never parsed. A
    transient storage failure (a bucket briefly unreachable) is retried with backoff, as uploads
    are (for `retry_budget_s` seconds when given)."""
    from raytag.cluster.retry import RetryPolicy, with_retries

    policy = RetryPolicy.for_seconds(retry_budget_s) if retry_budget_s is not None else None
    data = with_retries(
        lambda: store.get_bytes(key), what=f"reading {store.display(key)}", policy=policy, log=log.info
    )
    if data is None:
        raise ShardError(
            f"prepared shard {store.display(key)} is missing; run `trainer/main.py prepare` again"
        )
    if sha256_bytes(data) != sha256:
        raise ShardError(
            f"prepared shard {store.display(key)} fails its sha256 check (corrupt or truncated); "
            "run `trainer/main.py prepare` again"
        )
    return data


def _parquet_bytes(columns: dict[str, Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name, values in columns.items():
        if isinstance(values, np.ndarray):
            arrays[name] = pa.array(values)
        elif name == "tags":
            arrays[name] = pa.array(values, type=pa.list_(pa.string()))
        elif name == "sentence":
            arrays[name] = pa.array(values, type=pa.int64())
        else:
            arrays[name] = pa.array(
                [np.asarray(v, dtype=np.int32) for v in values], type=pa.list_(pa.int32())
            )
    buf = io.BytesIO()
    pq.write_table(pa.table(arrays), buf, compression="zstd")
    return buf.getvalue()


def read_parquet(data: bytes) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data))
