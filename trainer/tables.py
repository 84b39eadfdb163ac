"""Datasets as inputs: Hugging Face `save_to_disk` folders, Parquet, JSON Lines, CSV and `hf:` hub datasets.

Wherever a CoNLL file is accepted, a data path may also name:

    data/conll2003            a `save_to_disk` DatasetDict folder: the split named like the key
                              (data.train -> train, data.validation -> validation, data.test -> test,
                              data.eval_sets.NAME -> NAME)
    data/conll2003:dev        ... or the split named after the colon
    data/conll2003/train      a `save_to_disk` Dataset folder (its .arrow files)
    data/*.parquet            Parquet (.parquet), JSON Lines (.jsonl, .json) or CSV (.csv) files, globs,
                              folders, s3:// objects and prefixes, as for CoNLL files
    hf:NAME[:CONFIG][:SPLIT]  a hub dataset (`datasets.load_dataset`); `hf:NAME:X` reads X as the split
                              when it is train, validation, test or a slice (`train[:10%]`), else as
                              the config

Each row is a sentence: a list of words in the `data.columns.tokens` column (default `tokens`) and a
list of tags in `data.columns.tags` (default `ner_tags`), as on the hub. Tags are strings, or ids of
a ClassLabel whose names come from the features (a `save_to_disk` folder's Arrow files, Parquet
written by `datasets` and hub datasets carry them in their schema metadata). CSV cells hold a list
as JSON (`["EU", "rejects"]`), as Python or numpy print it, or as words separated by spaces.

The rows are converted in Arrow record batches: lengths, nulls, tag ids and tag names are checked
on whole columns, tag ids become names by one array lookup, and each row's words and tags are
slices of the batch's flattened columns. Tags then go through the CoNLL reader's scheme detection
and repair (trainer/conll.py), so the same sentences give the same label set, in raytag's order
(O, then B-/I- per sorted type), and the same model whatever the ClassLabel's order. Rows are
counted from 0, as `dataset[N]` counts them; errors name the file, the row and the column. A row
with no words is no sentence: such rows are counted and logged, not trained on.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from raytag.cluster.inputs import InputFile, list_inputs, read_input

from .conll import (
    ConllError,
    ConllFile,
    ConllOptions,
    Sentence,
    _check_labels,
    _detect_scheme,
    _is_iob_tag,
    _to_iob2,
)

HUB = "hf:"
FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
HUB_SPLITS = ("train", "validation", "test")
BATCH_ROWS = 16384
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class Columns:
    """Which columns hold a row's words and tags (data.columns)."""

    tokens: str = "tokens"
    tags: str = "ner_tags"


class TableError(ConllError):
    """A row of a dataset cannot be read: ``PATH: row N, column 'C': reason`` (row, column optional)."""

    def __init__(self, path: str, row: int | None, column: str | None, reason: str) -> None:
        super().__init__(path, row, reason)
        self.row, self.column = row, column
        where = ", ".join(
            x for x in (f"row {row}" if row is not None else "", f"column '{column}'" if column else "") if x
        )
        self.args = (f"{path}: {where}: {reason}" if where else f"{path}: {reason}",)

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> Any:
        return (type(self), (self.path, self.row, self.column, self.reason))


def table_format(uri: str) -> str | None:
    """`parquet`, `arrow`, `json`, `csv` or `hub` for a table input, None for a CoNLL file."""
    if uri.startswith(HUB):
        return "hub"
    return FORMATS.get(PurePosixPath(uri).suffix.lower())


# ---------------------------------------------------------------------------------------------
# data paths -> input files


def split_suffix(path: str) -> tuple[str, str | None]:
    """`data/ds:dev` -> (`data/ds`, `dev`); a path without a split suffix -> (path, None)."""
    base, sep, split = path.rpartition(":")
    if not sep or not base or "/" in split or not _SPLIT_NAME.fullmatch(split) or base.endswith(":/"):
        return path, None
    if base in ("s3", "hf") or (not base.startswith("s3://") and Path(path).exists()):
        return path, None
    return base, split


def expand(
    path: str, split: str, *, endpoint_url: str | None = None, region: str | None = None
) -> list[InputFile]:
    """The input files a data path names, `split` being the split its key reads by default: CoNLL
    and table files as `list_inputs` finds them; a `save_to_disk` folder's split as its .arrow
    files; a hub dataset as one `hf:NAME:CONFIG:SPLIT` input. Raises TableError or StorageError."""
    if path.startswith(HUB):
        return [hub_input(path, split)]
    base, asked = split_suffix(path)
    files = list_inputs(base, endpoint_url=endpoint_url, region=region)
    root = base.rstrip("/")
    top = {f.uri[len(root) + 1 :]: f for f in files if f.uri.startswith(root + "/")}
    if "dataset_dict.json" in top:
        raw = read_input(top["dataset_dict.json"].uri, endpoint_url=endpoint_url, region=region)
        splits = list(json.loads(raw).get("splits", []))
        want = asked or split
        if want not in splits:
            how = "" if asked else f" (the split named like the key; pick one with {base}:SPLIT)"
            raise TableError(base, None, None, f"no split '{want}'{how}; the dataset has {', '.join(splits)}")
        inner = list_inputs(f"{root}/{want}", endpoint_url=endpoint_url, region=region)
        arrow = [
            f for f in inner if "/" not in f.uri[len(root) + len(want) + 2 :] and f.uri.endswith(".arrow")
        ]
    elif "state.json" in top:
        if asked:
            raise TableError(base, None, None, f"a save_to_disk Dataset has no splits: name {base} alone")
        arrow = [f for f in files if f.uri.endswith(".arrow")]
    else:
        if asked:
            raise TableError(
                base, None, None, f"':{asked}' names a split, but this is no save_to_disk DatasetDict folder"
            )
        return files
    if not arrow:
        raise TableError(base, None, None, "a save_to_disk folder without .arrow data files")
    return arrow


def parse_hub(uri: str, split: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][:SPLIT]` -> (name, config, split); `split` when the URI names none."""
    parts = re.split(r":(?![^\[]*\])", uri[len(HUB) :])  # not the colons of a slice, train[:10%]
    if not parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise TableError(
            uri, None, None, "expected hf:NAME, hf:NAME:SPLIT, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT"
        )
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        x = parts[1]
        if x in HUB_SPLITS or "[" in x:
            return parts[0], None, x
        return parts[0], x, split
    return parts[0], None, split


def hub_uri(name: str, config: str | None, split: str) -> str:
    return f"{HUB}{name}:{config}:{split}" if config else f"{HUB}{name}:{split}"


def load_hub(uri: str, split: str = "train") -> Any:
    """`datasets.load_dataset` of a `hf:` input; a hub that cannot be reached is one TableError line."""
    import datasets

    name, config, which = parse_hub(uri, split)
    try:
        ds = datasets.load_dataset(name, config, split=which)
    except Exception as exc:  # offline, unknown name or config, no such split: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TableError(
            uri,
            None,
            None,
            f"cannot load it from the Hugging Face hub ({type(exc).__name__}: {first}). Without the hub, "
            "save the dataset where it can be read (dataset.save_to_disk(PATH) or .to_parquet(FILE)) "
            "and name that path instead",
        ) from None
    return ds.flatten_indices() if getattr(ds, "_indices", None) is not None else ds


def hub_input(uri: str, split: str) -> InputFile:
    """A hub dataset as one input: its size in bytes and its `datasets` fingerprint (its content)."""
    name, config, which = parse_hub(uri, split)
    canon = hub_uri(name, config, which)
    ds = load_hub(canon)
    return InputFile(canon, int(ds.data.nbytes), str(ds._fingerprint))


# ---------------------------------------------------------------------------------------------
# input files -> sentences


def read_table(
    uri: str,
    columns: Columns,
    options: ConllOptions,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    first_row: int = 0,
    name: str | None = None,
) -> ConllFile:
    """Read one table input as sentences in IOB2, as `options` say (the CoNLL reader's rules for
    schemes, repairs and label sets). Errors (TableError) name `name` (default `uri`), the row
    (counted from `first_row`) and the column."""
    name = name or uri
    batches, features = _batches(uri, columns, name, endpoint_url, region)
    return to_sentences(batches, features, columns, options, name, first_row)


def to_sentences(
    batches: Iterable[Any],
    features: dict[str, Any] | None,
    columns: Columns,
    options: ConllOptions,
    name: str,
    first_row: int = 0,
) -> ConllFile:
    """Record batches -> a ConllFile (rows as sentences); see the module docstring."""
    limit = options.max_sentences
    names = _class_names(features, columns.tags, name) if options.require_tags else None
    raw: list[tuple[list[str], list[str], int]] = []
    empty = 0
    row0 = first_row
    for batch in _limited(batches, limit, lambda: len(raw)):
        words, tags, lengths = _columns(batch, columns, names, name, row0, options.require_tags)
        ends = np.cumsum(lengths)
        for r, (a, b) in enumerate(zip((ends - lengths).tolist(), ends.tolist(), strict=True)):
            if a == b:
                empty += 1
            else:
                raw.append((words[a:b], tags[a:b] if tags is not None else [], row0 + r))
        row0 += batch.num_rows
    if not raw:
        raise TableError(name, None, None, "no sentences found (no row with tokens)")

    def error(first: int, i: int, reason: str) -> ConllError:
        return TableError(name, first, columns.tags, f"tag {i}: {reason}")

    if not options.require_tags:
        scheme = "iob1" if options.tag_scheme == "iob1" else "iob2"
        sentences = [Sentence(tuple(w), (), row) for w, _, row in raw]
        return ConllFile(name, sentences, scheme, repaired=0, docstarts=0, empty_rows=empty)
    scheme = _detect_scheme(raw) if options.tag_scheme == "auto" else options.tag_scheme
    repaired = _to_iob2(raw, scheme, options.strict, name, error)
    if options.labels is not None:
        _check_labels(raw, options.labels, name, error)
    sentences = [Sentence(tuple(w), tuple(t), row) for w, t, row in raw]
    return ConllFile(name, sentences, scheme, repaired=repaired, docstarts=0, empty_rows=empty)


def _limited(batches: Iterable[Any], limit: int | None, have: Any) -> Iterator[Any]:
    """The batches, cut so that no row after the `limit`-th sentence is read (`have()`: sentences so far;
    rows without words are no sentences, so a cut batch continues where it was cut)."""
    for batch in batches:
        while batch.num_rows:
            need = batch.num_rows if limit is None else limit - have()
            if need <= 0:
                return
            yield batch.slice(0, need)
            batch = batch.slice(need)


def _batches(
    uri: str, columns: Columns, name: str, endpoint_url: str | None, region: str | None
) -> tuple[Iterator[Any], dict[str, Any] | None]:
    """The input's record batches (the two columns only, where the format allows) and its features."""
    import pyarrow as pa

    fmt = table_format(uri)
    wanted = [columns.tokens, columns.tags]
    if fmt == "hub":
        ds = load_hub(uri)
        _require(list(ds.column_names), wanted, name)
        table = ds.data.table.select(wanted)
        return iter(table.to_batches(max_chunksize=BATCH_ROWS)), ds.features.to_dict()
    data = read_input(uri, endpoint_url=endpoint_url, region=region)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)
            schema = pf.schema_arrow
            _require(schema.names, wanted, name)
            parts = pf.iter_batches(batch_size=BATCH_ROWS, columns=wanted, use_threads=False)
            return parts, _hf_features(schema)
        if fmt == "arrow":
            try:
                reader = pa.ipc.open_stream(pa.BufferReader(data))  # what save_to_disk writes
                batches: Iterable[Any] = reader
            except pa.ArrowInvalid:
                file_reader = pa.ipc.open_file(pa.BufferReader(data))
                reader = file_reader
                batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
            _require(reader.schema.names, wanted, name)
            return (b.select(wanted) for b in batches), _hf_features(reader.schema)
        if fmt == "json":
            import pyarrow.json as pj

            table = pj.read_json(pa.BufferReader(data))
        else:
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(
                pa.BufferReader(data),
                convert_options=pcsv.ConvertOptions(
                    column_types={c: pa.string() for c in wanted}, strings_can_be_null=False
                ),
            )
    except (pa.ArrowInvalid, OSError) as exc:
        kind = {"json": "JSON Lines", "csv": "CSV", "parquet": "Parquet", "arrow": "Arrow"}[fmt or ""]
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TableError(name, None, None, f"cannot read it as {kind}: {first}") from None
    _require(table.column_names, wanted, name)
    return iter(table.select(wanted).to_batches(max_chunksize=BATCH_ROWS)), None


def _require(have: list[str], wanted: list[str], name: str) -> None:
    for col in wanted:
        if col not in have:
            key = "data.columns.tokens" if col == wanted[0] else "data.columns.tags"
            raise TableError(
                name, None, col, f"no such column (the columns are {', '.join(have)}); name yours with {key}"
            )


def _hf_features(schema: Any) -> dict[str, Any] | None:
    """The `datasets` features kept in an Arrow or Parquet schema's metadata, if any."""
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    return (info.get("info") or {}).get("features")


def _class_names(features: dict[str, Any] | None, column: str, name: str) -> list[str] | None:
    """The ClassLabel names of the tags column (a sequence of ClassLabel), or None."""
    feature: Any = (features or {}).get(column)
    while isinstance(feature, (dict, list)):
        if isinstance(feature, list):
            feature = feature[0] if feature else None
            continue
        if "names" in feature:
            names = list(feature["names"])
            bad = [n for n in names if not _is_iob_tag(n)]
            if bad:
                raise TableError(
                    name,
                    None,
                    column,
                    f"ClassLabel name {bad[0]!r} is not in the IOB1/IOB2 scheme (expected O, B-TYPE or I-TYPE)",
                )
            return names
        feature = feature.get("feature")
    return None


def _columns(
    batch: Any, columns: Columns, names: list[str] | None, name: str, row0: int, require_tags: bool
) -> tuple[list[str], list[str] | None, np.ndarray]:
    """One batch's words and tags, flattened, and each row's length (checked equal)."""
    import pyarrow as pa

    tok = _as_lists(batch.column(columns.tokens), columns.tokens, name, row0, words=True)
    lengths, values = _list_parts(tok)
    if values.null_count:
        raise _at_value(name, columns.tokens, lengths, row0, _first_null(values), "a null word")
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
    words = values.to_pylist()
    if not require_tags:
        return words, None, lengths
    tag = _as_lists(batch.column(columns.tags), columns.tags, name, row0, words=False)
    tag_lengths, flat = _list_parts(tag)
    bad = np.flatnonzero(tag_lengths != lengths)
    if bad.size:
        r = int(bad[0])
        raise TableError(
            name,
            row0 + r,
            columns.tags,
            f"{tag_lengths[r]} tags for {lengths[r]} tokens in column '{columns.tokens}'",
        )
    if flat.null_count:
        raise _at_value(name, columns.tags, lengths, row0, _first_null(flat), "a null tag")
    if pa.types.is_integer(flat.type):
        if names is None:
            raise TableError(
                name,
                None,
                columns.tags,
                "tags are integer ids but the input carries no ClassLabel names for them: write the tags "
                "as strings, or save the dataset with its features (save_to_disk, or to_parquet from datasets)",
            )
        kind = "i" if pa.types.is_signed_integer(flat.type) else "u"
        ids = np.frombuffer(flat.buffers()[1], dtype=f"{kind}{flat.type.bit_width // 8}")  # no pandas import
        ids = ids[flat.offset : flat.offset + len(flat)]
        out = np.flatnonzero((ids < 0) | (ids >= len(names)))
        if out.size:
            i = int(out[0])
            raise _at_value(
                name,
                columns.tags,
                lengths,
                row0,
                i,
                f"tag id {ids[i]} is outside the ClassLabel's {len(names)} names",
            )
        tags = np.asarray(names, dtype=object)[ids].tolist()
    else:
        if not pa.types.is_string(flat.type) and not pa.types.is_large_string(flat.type):
            raise TableError(
                name, None, columns.tags, f"expected lists of tag strings or ClassLabel ids, got {tag.type}"
            )
        tags = flat.to_pylist()
        for value in set(tags):
            if not _is_iob_tag(value):
                i = tags.index(value)
                raise _at_value(
                    name,
                    columns.tags,
                    lengths,
                    row0,
                    i,
                    f"tag {value!r} is not in the IOB1/IOB2 scheme (expected O, B-TYPE or I-TYPE)",
                )
    return words, tags, lengths


def _list_parts(arr: Any) -> tuple[np.ndarray, Any]:
    """A list array's row lengths and its values, read from its offsets buffer (no compute kernel:
    pyarrow.compute would load its library into every preparing process)."""
    import pyarrow as pa

    width = np.int64 if pa.types.is_large_list(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset : arr.offset + len(arr) + 1]
    first, last = int(offsets[0]), int(offsets[-1])
    return np.diff(offsets).astype(np.int64), arr.values.slice(first, last - first)


def _as_lists(col: Any, column: str, name: str, row0: int, *, words: bool) -> Any:
    """A column as an Arrow list array: list columns as they are, CSV's text cells parsed."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        if col.null_count:
            raise TableError(name, row0 + _first_null(col), column, "null instead of a list")
        return col
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        cells = col.to_pylist()
        parsed = [_parse_cell(c, name, row0 + r, column, words) for r, c in enumerate(cells)]
        lists = pa.array(parsed, type=pa.list_(pa.string()))
        if not words and all(_INT.fullmatch(x) for cell in parsed for x in cell):  # ClassLabel ids
            return lists.cast(pa.list_(pa.int64()))
        return lists
    kind = "words" if words else "tags"
    raise TableError(name, None, column, f"expected a list of {kind} in each row, got {col.type}")


_INT = re.compile(r"-?\d+")
_QUOTED = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")


def _parse_cell(cell: str | None, name: str, row: int, column: str, words: bool) -> list[str]:
    """A CSV cell holding a list: JSON, Python's or numpy's print of it, or space-separated items."""
    if cell is None:
        raise TableError(name, row, column, "an empty cell instead of a list")
    text = cell.strip()
    if not text.startswith("["):
        return text.split()
    try:
        value = json.loads(text)
        return [str(v) for v in value]
    except ValueError:
        pass
    inner = text[1:-1] if text.endswith("]") else None
    if inner is None:
        raise TableError(name, row, column, f"cannot read {_short(text)} as a list")
    items = _QUOTED.findall(inner)
    rest = _QUOTED.sub(" ", inner).replace(",", " ").split()
    if items and not rest:  # ['EU', 'rejects'] or numpy's ['EU' 'rejects']
        return [str(ast.literal_eval(q)) for q in items]
    if not items and all(_INT.fullmatch(x) for x in rest):  # [3, 0] or numpy's [3 0]
        return rest
    if "..." in rest:
        raise TableError(
            name, row, column, "numpy's shortened print of a long list ('...'): the items are lost"
        )
    raise TableError(name, row, column, f"cannot read {_short(text)} as a list")


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _first_null(arr: Any) -> int:
    import pyarrow.compute as pc

    return int(np.flatnonzero(~pc.is_valid(arr).to_numpy(zero_copy_only=False))[0])


def _at_value(name: str, column: str, lengths: np.ndarray, row0: int, i: int, reason: str) -> TableError:
    """The error for flattened value `i` of a batch: its row, and its place in the row."""
    ends = np.cumsum(lengths)
    r = int(np.searchsorted(ends, i, side="right"))
    within = i - int(ends[r] - lengths[r])
    return TableError(name, row0 + r, column, f"item {within}: {reason}")
