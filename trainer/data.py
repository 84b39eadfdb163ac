"""Where evaluation sentences come from: CoNLL files (local, s3:// or shipped samples) or datasets
(trainer/tables.py: Parquet, JSON Lines, CSV, save_to_disk folders, hf: hub datasets)."""

from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from raytag.cluster.digest import sha256_bytes, sha256_file

from .config import ConfigError
from .conll import ConllFile, ConllOptions, Sentence, label_list, read_conll
from .tables import HUB, Columns, expand, hub_uri, read_table, split_suffix, table_format

log = logging.getLogger("raytag")

BUILTIN = "builtin:"


def resolve_path(path: str) -> str:
    """`builtin:demo/train.txt` -> the shipped file; anything else is returned as an absolute path."""
    if path.startswith(BUILTIN):
        res = importlib.resources.files("raytag.trainer") / "assets" / path[len(BUILTIN) :]
        return str(res)
    return str(Path(path).expanduser().resolve())


@dataclass
class Split:
    name: str
    path: str
    sentences: list[Sentence]
    scheme: str = "iob2"
    repaired: int = 0
    sha256: str | None = None
    files: list[str] = field(default_factory=list)  # a dataset's input files, when it has several

    @property
    def words(self) -> list[tuple[str, ...]]:
        return [s.words for s in self.sentences]

    @property
    def tags(self) -> list[tuple[str, ...]]:
        return [s.tags for s in self.sentences]


def read_split(
    name: str,
    path: str,
    *,
    tag_scheme: str,
    strict: bool,
    max_sentences: int | None,
    labels: list[str] | None,
    columns: Columns | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> Split:
    """Read one evaluation split: a CoNLL file (local or s3://, with run.storage's endpoint and
    credential rules) or a dataset (trainer/tables.py; a save_to_disk folder gives the split called
    `name`). Raises ConllError (TableError) naming the file and line (row and column), StorageError
    for an unreadable object."""
    options = ConllOptions(tag_scheme=tag_scheme, strict=strict, max_sentences=max_sentences, labels=labels)
    columns = columns or Columns()
    if is_table_path(path):
        files = expand(resolve_data_path(path), name, endpoint_url=endpoint_url, region=region)
        sentences: list[Sentence] = []
        read: list[ConllFile] = []
        for f in files:
            left = None if max_sentences is None else max_sentences - len(sentences)
            if left == 0:
                break
            part = read_input_file(f.uri, replace(options, max_sentences=left), columns, endpoint_url, region)
            read.append(part)
            sentences += part.sentences
        _log_read(path, read)
        sha = files[0].tag if len(files) == 1 else sha256_bytes("\n".join(f.tag for f in files).encode())
        return Split(
            name, path, sentences, read[0].scheme, sum(c.repaired for c in read), sha, [f.uri for f in files]
        )
    if path.startswith("s3://"):
        from raytag.cluster.inputs import read_input

        from .conll import parse_conll_bytes

        data = read_input(path, endpoint_url=endpoint_url, region=region)
        cf: ConllFile = parse_conll_bytes(data, path, options)
        real, sha = path, sha256_bytes(data)
    else:
        real = resolve_path(path)
        cf = read_conll(real, options)
        sha = sha256_file(real)
    _log_read(path, [cf])
    return Split(name, real, cf.sentences, cf.scheme, cf.repaired, sha)


def is_table_path(path: str) -> bool:
    """Whether a data path names a dataset (trainer/tables.py) rather than one CoNLL file."""
    if path.startswith(HUB) or table_format(path) is not None or split_suffix(path)[1] is not None:
        return True
    return not path.startswith(("s3://", BUILTIN)) and Path(path).expanduser().is_dir()


def resolve_data_path(path: str) -> str:
    """A data path made absolute where it is local (a `:split` suffix and `hf:` names kept)."""
    if path.startswith((HUB, "s3://")):
        return path
    base, split = split_suffix(path)
    return resolve_path(base) + (f":{split}" if split else "")


def read_input_file(
    uri: str,
    options: ConllOptions,
    columns: Columns,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> ConllFile:
    """One input file (as `expand` lists them) as sentences: a table, else CoNLL text."""
    if table_format(uri) is not None:
        return read_table(uri, columns, options, endpoint_url=endpoint_url, region=region)
    from raytag.cluster.inputs import read_input

    from .conll import parse_conll_bytes

    return parse_conll_bytes(read_input(uri, endpoint_url=endpoint_url, region=region), uri, options)


def _log_read(path: str, read: list[ConllFile]) -> None:
    repaired = sum(c.repaired for c in read)
    if repaired:
        log.warning(
            "%s: repaired %d stray I- tag(s) that started an entity to B- (conlleval's reading)",
            path,
            repaired,
        )
    empty = sum(c.empty_rows for c in read)
    if empty:
        log.warning("%s: %d row(s) with no tokens are no sentences: not used", path, empty)


def with_hub_shorthand(dc: Any) -> Any:
    """data.hf_dataset NAME -> `hf:NAME:SPLIT` for data.train, data.validation and data.test where
    they are unset (validation and test where the hub dataset has that split)."""
    if not dc.hf_dataset:
        return dc
    import datasets

    try:
        have = set(datasets.get_dataset_split_names(dc.hf_dataset))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"data.hf_dataset {dc.hf_dataset!r}: cannot reach it on the Hugging Face hub ({first}); "
            "without the hub, name local files in data.train/validation/test (save_to_disk folders, "
            "Parquet, JSON Lines, CSV or CoNLL)"
        ) from None
    if "train" not in have and not dc.train:
        raise ConfigError(
            f"data.hf_dataset {dc.hf_dataset!r} has no train split (it has {', '.join(sorted(have))})"
        )

    def pick(current: Any, split: str) -> Any:
        return current if current or split not in have else hub_uri(dc.hf_dataset, None, split)

    return replace(
        dc,
        train=pick(dc.train, "train"),
        validation=pick(dc.validation, "validation"),
        test=pick(dc.test, "test"),
    )


def make_labels(train: Split | None, configured: list[str] | None) -> list[str]:
    """The label set: as configured, else from the training data (O first, then B-/I- per type)."""
    if configured:
        if "O" not in configured:
            raise ConfigError(f"data.labels: the label set must contain 'O', got {configured}")
        return list(configured)
    if train is None:
        raise ConfigError("data.train: no training data and no data.labels: cannot know the label set")
    return label_list(train.sentences)
