"""What `predict` reads and writes: one input part's units (lines, records, rows or sentences) and
one output part's records, in each format.

Inputs: `text` (one unit a line, blank lines included), `jsonl` (one JSON object a line, the text
in a field; the other fields go through to the output), `parquet` (one unit a row, the text in a
column; the other columns go through) and `conll` (one unit a sentence of words, gold tags kept).
Outputs: `entities` (JSON Lines, one object per unit: `line`, the text or the record's fields, and
`entities` with character offsets), `parquet` (the same, one row per unit) and `conll` (word,
[gold,] predicted tag columns). A unit keeps its number and its place: output record N is input
unit N. A part that cannot be read raises TagInputError naming the part and, where it has one, the
line.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .predict import PredictError

INPUT_FORMATS = ("text", "jsonl", "parquet", "conll")
OUTPUT_FORMATS = ("entities", "parquet", "conll")
EXTENSIONS = {"entities": ".jsonl", "parquet": ".parquet", "conll": ".conll"}
# Fields the output adds to each record: an input record that has one of its own is refused
# rather than overwritten.
ADDED_FIELDS = ("line", "entities")


class TagInputError(PredictError):
    """An input part that cannot be read or parsed; the message names the part and, where there is
    one, the line (`PART:LINE: reason`)."""

    def __init__(self, part: str, line: int | None, reason: str) -> None:
        self.part, self.line, self.reason = part, line, reason
        super().__init__(f"{part}:{line}: {reason}" if line is not None else f"{part}: {reason}")


@dataclass
class Unit:
    """One thing to tag: a text line, a JSON record, a Parquet row, or a CoNLL sentence."""

    number: int  # 1-based: the line (text, jsonl), the row (parquet) or the sentence (conll)
    text: str | None = None  # the text to tag; None: nothing to tag (a blank JSON line, a null)
    fields: dict[str, Any] | None = None  # jsonl/parquet: the record as read, text included
    words: Sequence[str] = ()  # conll: the sentence's words
    gold: Sequence[str] | None = None  # conll: its gold tags, when the input has them


def format_of(uri: str, given: str | None) -> str:
    """The input format: `given`, or from the name: .jsonl/.json/.ndjson are jsonl, .parquet is
    parquet, anything else CoNLL (predict's default before formats were told apart)."""
    if given:
        return given
    name = uri.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "conll"


def default_output(input_format: str) -> str:
    """CoNLL columns for CoNLL input (it has words, not the text they came from); entities else."""
    return "conll" if input_format == "conll" else "entities"


def check_formats(input_format: str, output_format: str) -> None:
    """Raise PredictError for a format pair that makes no sense."""
    if input_format not in INPUT_FORMATS:
        raise PredictError(
            f"unknown input format {input_format!r}: expected one of {', '.join(INPUT_FORMATS)}"
        )
    if output_format not in OUTPUT_FORMATS:
        raise PredictError(
            f"unknown output format {output_format!r}: expected one of {', '.join(OUTPUT_FORMATS)}"
        )
    if input_format == "conll" and output_format != "conll":
        raise PredictError(
            f"--output-format {output_format} needs --format text, jsonl or parquet: character offsets "
            "point into raw text, and CoNLL input has words, not the text they came from"
        )
    if output_format == "conll" and input_format in ("jsonl", "parquet"):
        raise PredictError(
            f"--output-format conll drops the fields of {input_format} records: use entities or parquet"
        )


def read_units(data: bytes, part: str, fmt: str, text_field: str = "text") -> list[Unit]:
    """Every unit of one input part (its bytes), in order. Raises TagInputError."""
    if fmt == "text":
        return [Unit(n, text=line) for n, line in enumerate(_lines(data, part), start=1)]
    if fmt == "jsonl":
        return _jsonl_units(data, part, text_field)
    if fmt == "parquet":
        return _parquet_units(data, part, text_field)
    if fmt == "conll":
        return _conll_units(data, part)
    raise PredictError(f"unknown input format {fmt!r}: expected one of {', '.join(INPUT_FORMATS)}")


def _decode(data: bytes, part: str) -> str:
    """UTF-8 text without a byte order mark, line ends as \\n; a bad byte names its line."""
    from .conll import ConllError, _decode_utf8

    try:
        text = _decode_utf8(data, part)
    except ConllError as e:
        raise TagInputError(part, e.line, e.reason) from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _lines(data: bytes, part: str) -> list[str]:
    """A text part's lines: a line ends at \\n, \\r\\n or \\r (as a text-mode file reads them); other
    separators (U+2028, form feed) are whitespace in a line; the final line end ends no line."""
    lines = _decode(data, part).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _jsonl_units(data: bytes, part: str, text_field: str) -> list[Unit]:
    units = []
    for n, line in enumerate(_lines(data, part), start=1):
        if not line.strip():  # a blank line keeps its place, with nothing to tag
            units.append(Unit(n))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TagInputError(part, n, f"not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise TagInputError(part, n, f"expected a JSON object, got {type(record).__name__}")
        units.append(_record_unit(record, n, part, text_field))
    return units


def _record_unit(record: dict[str, Any], n: int, part: str, text_field: str) -> Unit:
    if text_field not in record:
        raise TagInputError(part, n, f"no field {text_field!r} (--text-field); fields: {', '.join(record)}")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise TagInputError(part, n, f"field {text_field!r} is {type(text).__name__}, not text")
    taken = [f for f in ADDED_FIELDS if f in record]
    if taken:
        raise TagInputError(
            part, n, f"field {taken[0]!r} is one the output adds (line, entities): rename it in the input"
        )
    return Unit(n, text=text, fields=record)


def _parquet_units(data: bytes, part: str, text_field: str) -> list[Unit]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise TagInputError(part, None, f"not a Parquet file ({str(e).strip().splitlines()[0]})") from None
    if text_field not in table.column_names:
        raise TagInputError(
            part, None, f"no column {text_field!r} (--text-field); columns: {', '.join(table.column_names)}"
        )
    kind = table.schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise TagInputError(part, None, f"column {text_field!r} holds {kind}, not text")
    taken = [f for f in ADDED_FIELDS if f in table.column_names]
    if taken:
        raise TagInputError(
            part, None, f"column {taken[0]!r} is one the output adds (line, entities): rename it in the input"
        )
    rows = table.to_pylist()
    return [Unit(n, text=row[text_field], fields=row) for n, row in enumerate(rows, start=1)]


def _conll_units(data: bytes, part: str) -> list[Unit]:
    from .conll import ConllError, ConllOptions, parse_conll_lines

    lines = _decode(data, part).split("\n")
    # Labelled input is told from its token lines: more than one column means gold tags (the last).
    labelled = any(
        len(ln.split()) > 1 for ln in lines[:200] if ln.strip() and not ln.startswith("-DOCSTART-")
    )
    try:
        cf = parse_conll_lines(lines, part, ConllOptions(require_tags=labelled))
    except ConllError as e:
        raise TagInputError(part, e.line, e.reason) from None
    return [
        Unit(n, words=s.words, gold=s.tags if labelled else None) for n, s in enumerate(cf.sentences, start=1)
    ]


class OutputWriter:
    """One output part's records, written in order to a binary file object (a temporary file the
    caller makes visible once `close` has run). `write` takes a chunk of units and their results:
    entities per unit, or for CoNLL output the predicted tags per unit."""

    def __init__(self, out: io.BufferedIOBase | Any, fmt: str, input_format: str) -> None:
        self.out, self.fmt, self.input_format = out, fmt, input_format
        self.records = 0
        self.entities = 0
        self._rows: list[dict[str, Any]] = []  # parquet: the part's rows, written as one table

    def write(self, units: Sequence[Unit], results: Sequence[Any]) -> None:
        for unit, result in zip(units, results, strict=True):
            self.records += 1
            if self.fmt == "conll":
                self.out.write(_conll_block(unit, result).encode("utf-8"))
                continue
            self.entities += len(result)
            record = self._record(unit, result)
            if self.fmt == "parquet":
                self._rows.append(record)
            else:
                line = json.dumps(record, ensure_ascii=False, default=_json_value)
                self.out.write((line + "\n").encode("utf-8"))

    def _record(self, unit: Unit, entities: list[dict]) -> dict[str, Any]:
        if self.input_format == "text":
            return {"line": unit.number, "text": unit.text, "entities": entities}
        return {"line": unit.number, **(unit.fields or {}), "entities": entities}

    def close(self, part: str) -> None:
        """Finish the part (Parquet: write its table). Raises TagInputError when the records' fields
        cannot make one table (a field that is a number on one line and text on another)."""
        if self.fmt != "parquet":
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(self._rows, schema=_parquet_schema(self._rows))
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise TagInputError(
                part, None, f"its records do not make one Parquet table ({str(e).splitlines()[0]})"
            ) from None
        pq.write_table(table, self.out)


def _json_value(value: Any) -> Any:
    """A Parquet value JSON has no type for: dates and times in ISO 8601, bytes in base64, anything
    else (a decimal) as its text."""
    import base64

    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _parquet_schema(rows: Iterable[dict[str, Any]]):
    """The output table's schema: the fields as Arrow infers them, `line` and `entities` typed."""
    import pyarrow as pa

    entity = pa.struct(
        [
            ("text", pa.string()),
            ("type", pa.string()),
            ("start", pa.int64()),
            ("end", pa.int64()),
            ("score", pa.float64()),
        ]
    )
    rows = list(rows)
    inferred = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in ADDED_FIELDS} for r in rows])
    names = ["line", *inferred.column_names, "entities"]
    types = {"line": pa.int64(), "entities": pa.list_(entity)}
    return pa.schema([(n, types.get(n) or inferred.schema.field(n).type) for n in names])


def _conll_block(unit: Unit, tags: Sequence[str]) -> str:
    """A sentence as CoNLL columns (`word [gold] predicted`), then its blank line."""
    rows = []
    for i, word in enumerate(unit.words):
        cols = [word, unit.gold[i], tags[i]] if unit.gold is not None else [word, tags[i]]
        rows.append(" ".join(cols) + "\n")
    return "".join(rows) + "\n"
