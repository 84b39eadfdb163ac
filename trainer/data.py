"""Where sentences come from: CoNLL files (local or shipped samples) or the `datasets` hub loader."""

from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass
from pathlib import Path

from raytag.cluster.digest import sha256_bytes, sha256_file

from .config import ConfigError
from .conll import ConllFile, ConllOptions, Sentence, label_list, read_conll

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
    endpoint_url: str | None = None,
    region: str | None = None,
) -> Split:
    """Read one CoNLL split (a local file or an s3:// object, with run.storage's endpoint and
    credential rules); raises ConllError naming file and line, StorageError for an unreadable object."""
    options = ConllOptions(tag_scheme=tag_scheme, strict=strict, max_sentences=max_sentences, labels=labels)
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
    if cf.repaired:
        log.warning(
            "%s: repaired %d stray I- tag(s) that started an entity to B- (conlleval's reading)",
            path,
            cf.repaired,
        )
    return Split(name, real, cf.sentences, cf.scheme, cf.repaired, sha)


def write_conll(split: Split, path: Path) -> None:
    """Write a split as a CoNLL file (word and tag columns), e.g. a hub dataset's training split."""
    with open(path, "w", encoding="utf-8") as f:
        for s in split.sentences:
            f.writelines(f"{w} {t}\n" for w, t in zip(s.words, s.tags, strict=True))
            f.write("\n")


def hub_splits(name: str, max_train: int | None, max_eval: int | None) -> dict[str, Split]:
    """Load a token-classification dataset with `datasets.load_dataset` (needs the hub).

    Expects `tokens` and `ner_tags` columns with ClassLabel names, as `conll2003` has.
    """
    import datasets

    ds = datasets.load_dataset(name)
    return {
        split: from_hf_dataset(ds[split], f"{name}:{split}", max_train if split == "train" else max_eval)
        for split in ("train", "validation", "test")
        if split in ds
    }


def from_hf_dataset(ds, name: str, limit: int | None) -> Split:
    """A `datasets.Dataset` with `tokens` and `ner_tags` (ClassLabel) -> Split (tags normalised to IOB2)."""
    from .conll import parse_conll_lines

    names = ds.features["ner_tags"].feature.names
    lines: list[str] = []
    n = len(ds) if limit is None else min(limit, len(ds))
    for row in ds.select(range(n)):
        for tok, tag in zip(row["tokens"], row["ner_tags"], strict=True):
            lines.append(f"{tok} {names[tag]}\n")
        lines.append("\n")
    cf = parse_conll_lines(lines, name)
    return Split(name.split(":")[-1], name, cf.sentences, cf.scheme, cf.repaired, None)


def make_labels(train: Split | None, configured: list[str] | None) -> list[str]:
    """The label set: as configured, else from the training data (O first, then B-/I- per type)."""
    if configured:
        if "O" not in configured:
            raise ConfigError(f"data.labels: the label set must contain 'O', got {configured}")
        return list(configured)
    if train is None:
        raise ConfigError("data.train: no training data and no data.labels: cannot know the label set")
    return label_list(train.sentences)
