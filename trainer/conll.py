"""Reader for CoNLL-style column files (one token a line, NER tag in the last column).

File format
-----------
* Each non-blank line is one token. Columns are separated by any run of spaces or tabs; the word is
  the first column and the tag is the last one, whatever lies between (POS, chunk tags, ...) is ignored.
  Other characters, including non-breaking and other Unicode spaces, belong to the column they are in.
* A blank line (empty, or nothing but spaces and tabs) ends a sentence; so does a ``-DOCSTART-`` line
  (first column ``-DOCSTART-``, any other columns), which separates documents. ``-DOCSTART-`` lines are
  counted (:attr:`ConllFile.docstarts`) and never become tokens.
* Files are decoded as strict UTF-8 (an initial byte order mark is dropped); ``\\n``, ``\\r\\n`` and lone
  ``\\r`` all end a line, so line numbers match what an editor shows.
* Tags must be ``O``, ``B-TYPE`` or ``I-TYPE`` with a non-empty ``TYPE`` (which may itself contain
  hyphens). Anything else (``E-``/``S-`` tags, bare ``PER``, ``B-``) is an error.

Tag schemes
-----------
Sentences always come out in IOB2: every entity starts with ``B-``. The input is read as IOB1 or IOB2:

* ``tag_scheme="iob1"``: an ``I-X`` that starts an entity (at the sentence start, after ``O`` or after a
  tag of another type) becomes ``B-X``; ``B-X`` (in IOB1, an entity that directly follows another entity
  of the same type) stays ``B-X``.
* ``tag_scheme="iob2"``: an ``I-X`` that starts an entity is a *stray* ``I-``. By default it is repaired
  to ``B-X`` -- which is how conlleval reads it -- and counted in :attr:`ConllFile.repaired`; with
  ``strict=True`` it is an error.
* ``tag_scheme="auto"`` (the default) decides per file, from the tags read: it counts the entity starts
  written with ``I-`` (``I-X`` at the sentence start, after ``O`` or after another type) and those written
  with ``B-`` (``B-X`` at the sentence start, after ``O`` or after another type). The file is IOB1 when the
  ``I-`` starts outnumber the ``B-`` starts, IOB2 otherwise (so a file without entities is IOB2).

Both schemes give the same entities for the same tags; the scheme only decides whether an ``I-`` start is
expected (IOB1) or a repair that is counted and that ``strict`` refuses (IOB2).

Errors
------
Every problem raises :class:`ConllError` (a :class:`ValueError`) whose message starts with ``PATH:LINE: ``,
or ``PATH: `` for problems with the whole file (missing file, no sentences).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ConllError",
    "ConllFile",
    "ConllOptions",
    "Sentence",
    "entity_types",
    "label_list",
    "parse_conll_bytes",
    "parse_conll_lines",
    "read_conll",
]

DOCSTART = "-DOCSTART-"
TAG_SCHEMES = ("auto", "iob1", "iob2")

_MAX_SHOWN_LABELS = 30


class ConllError(ValueError):
    """A CoNLL file cannot be read. ``str(error)`` is ``"PATH:LINE: reason"`` or ``"PATH: reason"``.

    Attributes:
        path: the file name as given to the reader.
        line: the 1-based line number, or ``None`` when the problem concerns the whole file.
        reason: the message without the location prefix.
    """

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[type[ConllError], tuple[str, int | None, str]]:
        # Keeps the error picklable (it crosses process boundaries, e.g. from Ray workers).
        return (type(self), (self.path, self.line, self.reason))


@dataclass(frozen=True, slots=True)
class Sentence:
    """One sentence: its words, its IOB2 tags (``()`` when read without tags) and where it starts.

    Token ``i`` of a sentence read from a file is on line ``line + i``.
    """

    words: tuple[str, ...]
    tags: tuple[str, ...]
    line: int


@dataclass
class ConllFile:
    """The sentences read from one file, and how the file was read."""

    path: str
    sentences: list[Sentence]
    scheme: str  # "iob1" or "iob2": what the input was read as
    repaired: int  # stray I- tags repaired to B- (IOB2 input only)
    docstarts: int  # -DOCSTART- lines seen
    empty_rows: int = 0  # rows with no tokens (table inputs: trainer/tables.py), not sentences


def _check_options(tag_scheme: str, max_sentences: int | None, labels: Sequence[str] | None) -> None:
    if tag_scheme not in TAG_SCHEMES:
        raise ValueError(f"tag_scheme must be one of {', '.join(TAG_SCHEMES)}, got {tag_scheme!r}")
    if max_sentences is not None and (isinstance(max_sentences, bool) or max_sentences < 1):
        raise ValueError(f"max_sentences must be a positive integer or None, got {max_sentences!r}")
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of labels, not a single string")


@dataclass(frozen=True)
class ConllOptions:
    """How the readers (:func:`read_conll`, :func:`parse_conll_bytes`, :func:`parse_conll_lines`) read a file.

    Attributes:
        tag_scheme: ``"auto"``, ``"iob1"`` or ``"iob2"``: how to read the tags (module docstring).
        strict: refuse stray ``I-`` entity starts in IOB2 input instead of repairing them.
        require_tags: ``False`` reads the words only (unlabelled input for prediction): every line needs
            just a word, the tags of the result are ``()``, and tag-related checks and options
            (``labels``) do not apply. The result's ``scheme`` is then ``"iob1"`` if that was asked
            for and ``"iob2"`` otherwise.
        max_sentences: stop after the first ``max_sentences`` sentences (lines after the last one read
            are not looked at, nor do they count for ``auto`` detection).
        labels: if given, every tag (after conversion to IOB2) must be one of these, e.g. the labels of
            the training set when reading an evaluation file.

    Raises (on construction):
        ValueError: an invalid ``tag_scheme`` or ``max_sentences``.
        TypeError: ``labels`` is a single string.
    """

    tag_scheme: str = "auto"
    strict: bool = False
    require_tags: bool = True
    max_sentences: int | None = None
    labels: Sequence[str] | None = None

    def __post_init__(self) -> None:
        _check_options(self.tag_scheme, self.max_sentences, self.labels)


_DEFAULTS = ConllOptions()


def read_conll(path: str | os.PathLike[str], options: ConllOptions = _DEFAULTS) -> ConllFile:
    """Read a CoNLL column file as ``options`` say (see :class:`ConllOptions`).

    Raises:
        ConllError: the file is missing or unreadable (``"PATH: file not found"``), is not valid UTF-8
            (``"PATH:LINE: not valid UTF-8 (byte 0xff at column 5)"``, the column counted in bytes from 1),
            or its content is invalid (see :func:`parse_conll_lines`).
    """
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except FileNotFoundError:
        raise ConllError(name, None, "file not found") from None
    except IsADirectoryError:
        raise ConllError(name, None, "is a directory, not a file") from None
    except OSError as exc:
        raise ConllError(name, None, f"cannot read file ({exc.strerror or exc})") from exc
    return parse_conll_bytes(data, name, options)


def parse_conll_bytes(data: bytes, name: str, options: ConllOptions = _DEFAULTS) -> ConllFile:
    """Parse the raw bytes of a CoNLL file named ``name`` (a path or an ``s3://`` object), as
    :func:`read_conll` does after reading them; the same errors, naming ``name`` and the line."""
    text = _decode_utf8(data, name)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return parse_conll_lines(text.split("\n"), name, options)


def parse_conll_lines(
    lines: Iterable[str], path: str | os.PathLike[str], options: ConllOptions = _DEFAULTS
) -> ConllFile:
    """Parse CoNLL lines (already decoded text, line 1 first) that came from ``path``, as ``options``
    say (see :class:`ConllOptions`).

    A trailing ``"\\n"`` or ``"\\r\\n"`` on each line is ignored, so the lines of a text-mode file object
    can be passed as they are. ``path`` only names the input in error messages and in the result.

    Raises:
        ConllError: with ``"PATH:LINE: "`` naming the offending line: a line with one column when tags
            are required, a tag outside the IOB1/IOB2 scheme, a stray ``I-`` in strict IOB2 mode, a
            label outside ``labels``; ``"PATH: no sentences found"`` when there is no token at all.
    """
    name = os.fspath(path)
    tag_scheme, strict, require_tags = options.tag_scheme, options.strict, options.require_tags
    max_sentences, labels = options.max_sentences, options.labels
    limit = max_sentences if max_sentences is not None else -1

    # Raw sentences: (words, tags, line of the first token). Tags are validated here, converted later.
    raw: list[tuple[list[str], list[str], int]] = []
    words: list[str] = []
    tags: list[str] = []
    first_line = 0
    docstarts = 0
    # Validated tags, each kept once: also shares the tag strings among tokens.
    known: dict[str, str] = {}

    for lineno, text in enumerate(lines, 1):
        fields = text.rstrip("\r\n").replace("\t", " ").split(" ")
        if "" in fields:
            fields = [field for field in fields if field]
        if not fields or fields[0] == DOCSTART:
            if fields:
                docstarts += 1
            if words:
                raw.append((words, tags, first_line))
                words, tags = [], []
                if len(raw) == limit:
                    break
            continue
        if not words:
            first_line = lineno
        words.append(fields[0])
        if not require_tags:
            continue
        if len(fields) < 2:
            shown = text.rstrip("\r\n").strip(" \t")
            raise ConllError(name, lineno, f"expected at least 2 columns (word ... tag), got 1: {shown!r}")
        tag = fields[-1]
        seen = known.get(tag)
        if seen is None:
            if not _is_iob_tag(tag):
                raise ConllError(
                    name,
                    lineno,
                    f"tag {tag!r} is not in the IOB1/IOB2 scheme (expected O, B-TYPE or I-TYPE)",
                )
            known[tag] = seen = tag
        tags.append(seen)
    else:
        if words:
            raw.append((words, tags, first_line))

    if not raw:
        raise ConllError(name, None, "no sentences found")

    if not require_tags:
        scheme = "iob1" if tag_scheme == "iob1" else "iob2"
        sentences = [Sentence(tuple(w), (), line) for w, _, line in raw]
        return ConllFile(name, sentences, scheme, repaired=0, docstarts=docstarts)

    scheme = _detect_scheme(raw) if tag_scheme == "auto" else tag_scheme
    repaired = _to_iob2(raw, scheme, strict, name)
    if labels is not None:
        _check_labels(raw, labels, name)
    sentences = [Sentence(tuple(w), tuple(t), line) for w, t, line in raw]
    return ConllFile(name, sentences, scheme, repaired=repaired, docstarts=docstarts)


def label_list(sentences: Iterable[Sentence]) -> list[str]:
    """Return the label set of ``sentences`` in a stable order.

    ``"O"`` comes first (always, even if unused), then ``B-T`` and ``I-T`` for every entity type ``T`` in
    sorted order. Both are listed for every type seen, since a model must be able to predict ``I-T`` even
    where the data only has single-token ``T`` entities.

    Raises:
        ValueError: a tag is not ``O``, ``B-TYPE`` or ``I-TYPE``.
    """
    seen: set[str] = set()
    for sentence in sentences:
        seen.update(sentence.tags)
    return ["O"] + [f"{prefix}-{type_}" for type_ in entity_types(seen) for prefix in ("B", "I")]


def entity_types(labels: Iterable[str]) -> list[str]:
    """Return the sorted, distinct entity types of IOB labels (``["B-PER", "I-LOC", "O"]`` -> LOC, PER).

    Raises:
        ValueError: a label is not ``O``, ``B-TYPE`` or ``I-TYPE``.
    """
    types: set[str] = set()
    for label in labels:
        if not _is_iob_tag(label):
            raise ValueError(f"label {label!r} is not in the IOB scheme (expected O, B-TYPE or I-TYPE)")
        if label != "O":
            types.add(label[2:])
    return sorted(types)


def _is_iob_tag(tag: str) -> bool:
    return tag == "O" or (len(tag) > 2 and tag[1] == "-" and tag[0] in ("B", "I"))


def _decode_utf8(data: bytes, name: str) -> str:
    """Decode ``data`` as UTF-8 without its byte order mark; a bad byte raises ConllError at its line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        line_start = max(before.rfind(b"\n"), before.rfind(b"\r")) + 1
        column = exc.start - line_start + 1
        raise ConllError(
            name, line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})"
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def _detect_scheme(raw: list[tuple[list[str], list[str], int]]) -> str:
    """Return "iob1" when more entities start with I- than with B-, else "iob2"."""
    i_starts = b_starts = 0
    for _, tags, _ in raw:
        previous = ""  # type of the previous tag; "" after O and at the sentence start
        for tag in tags:
            if tag == "O":
                previous = ""
                continue
            type_ = tag[2:]
            if type_ != previous:
                if tag[0] == "I":
                    i_starts += 1
                else:
                    b_starts += 1
            previous = type_
    return "iob1" if i_starts > b_starts else "iob2"


# Builds the error for token `i` of the sentence that starts at `first`: a line of a CoNLL file,
# a row of a table (trainer/tables.py).
TokenError = Callable[[int, int, str], ConllError]


def _to_iob2(
    raw: list[tuple[list[str], list[str], int]],
    scheme: str,
    strict: bool,
    name: str,
    error: TokenError | None = None,
) -> int:
    """Rewrite, in place, every I-X that starts an entity as B-X; return how many IOB2 repairs were made.

    Raises:
        ConllError: ``strict`` IOB2 input has an I-X that starts an entity (built by ``error``).
    """
    error = error or _line_error(name)
    repaired = 0
    begin: dict[str, str] = {}
    for _, tags, first_line in raw:
        previous = ""
        for i, tag in enumerate(tags):
            if tag == "O":
                previous = ""
                continue
            type_ = tag[2:]
            if tag[0] == "I" and type_ != previous:
                if scheme == "iob2":
                    if strict:
                        raise error(
                            first_line,
                            i,
                            f"tag {tag!r} starts an entity in IOB2 input (use data.tag_scheme: iob1 if "
                            "the file is IOB1, or data.strict: false to repair it)",
                        )
                    repaired += 1
                b_tag = begin.get(type_)
                if b_tag is None:
                    b_tag = begin[type_] = "B-" + type_
                tags[i] = b_tag
            previous = type_
    return repaired


def _line_error(name: str) -> TokenError:
    return lambda first_line, i, reason: ConllError(name, first_line + i, reason)


def _check_labels(
    raw: list[tuple[list[str], list[str], int]],
    labels: Sequence[str],
    name: str,
    error: TokenError | None = None,
) -> None:
    error = error or _line_error(name)
    allowed = set(labels)
    for _, tags, first_line in raw:
        for i, tag in enumerate(tags):
            if tag not in allowed:
                shown = list(labels[:_MAX_SHOWN_LABELS])
                if len(labels) > _MAX_SHOWN_LABELS:
                    shown.append(f"... {len(labels) - _MAX_SHOWN_LABELS} more")
                raise error(first_line, i, f"label {tag!r} is not in the label set ({', '.join(shown)})")
