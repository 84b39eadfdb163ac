"""The run's data: the prepared training shards (rank 0 finds or makes them, every rank opens
their index), the evaluation sets read, checked against the training labels and tokenised, and
what the results say about where the training windows came from.

`read_splits`, `tokenizer_fingerprint` and `train_spec` also run in the Ray launcher's driver,
before any worker starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import Config, ConfigError
from .data import Split, read_split, with_hub_shorthand
from .features import Encoded, encode
from .model import load_tokenizer
from .shards import Prepared, open_prepared, prepare, prepared_root, spec_from_config

log = logging.getLogger("raytag")


@dataclass
class Data:
    """The prepared training shards' index (each rank reads its own shards' windows on demand) and
    the evaluation sets, read and tokenised on every worker."""

    splits: dict[str, Split]  # evaluation sets only
    labels: list[str]
    tokenizer: Any
    tokenizer_sha: str
    encoded: dict[str, Encoded]  # evaluation sets only
    train: Prepared
    weights: dict[str, float]  # corpus -> sampling weight

    @property
    def lengths(self) -> np.ndarray:  # train windows' token counts
        return self.train.lengths

    @property
    def eval_names(self) -> list[str]:
        """Evaluated during training: validation first, then the named sets."""
        return [n for n in self.splits if n not in ("train", "test")]


def load_data(cfg: Config, group: Any = None) -> Data:
    """The training shards (prepared once: rank 0 finds or makes them, the other ranks open what it
    names) and every evaluation set, read, checked against the label set and tokenised."""
    rank = group.rank if group is not None else 0
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    tokenizer_sha = tokenizer_fingerprint(tokenizer)
    spec = train_spec(cfg)
    found: Prepared | None = None
    error: BaseException | None = None
    if rank == 0:
        try:
            found = prepare(spec, tokenizer_sha)
        except BaseException as exc:
            error = exc
    if group is not None and group.world > 1:
        group.agree(error)
        fp = group.broadcast(found.fingerprint if found is not None else None)
        if rank != 0:
            found = open_prepared(spec.prepared, fp, spec.endpoint_url, spec.region)
    elif error is not None:
        raise error
    assert found is not None
    _log_stats("train", found.manifest["stats"])
    labels = found.labels
    label2id = {lab: i for i, lab in enumerate(labels)}
    splits = read_splits(cfg, labels)  # evaluation sets must only use the training labels
    mc = cfg.model
    encoded = {
        name: encode(sp.words, sp.tags, tokenizer, label2id, mc.max_length, mc.stride)
        for name, sp in splits.items()
    }
    for name, enc in encoded.items():
        _log_stats(name, enc.stats)
    return Data(
        splits=splits,
        labels=labels,
        tokenizer=tokenizer,
        tokenizer_sha=tokenizer_sha,
        encoded=encoded,
        train=found,
        weights={c.name: c.weight for c in spec.corpora},
    )


def train_spec(cfg: Config):
    """What to prepare for training: data.train's corpora (data.hf_dataset filling it in)."""
    from dataclasses import replace

    return spec_from_config(replace(cfg, data=with_hub_shorthand(cfg.data)))


def storage_of(cfg: Config):
    """The storage that holds the prepared shards (data.prepared, default <run.storage>/prepared-data)."""
    from raytag.cluster.storage import open_storage

    return open_storage(prepared_root(cfg), endpoint_url=cfg.run.s3_endpoint_url, region=cfg.run.s3_region)


def read_splits(cfg: Config, labels: list[str] | None = None) -> dict[str, Split]:
    """The evaluation sets: validation, the named sets, test (CoNLL files or datasets, local or
    s3://); with `labels`, a tag outside them is an error naming its file and line (or row)."""
    from .tables import Columns

    dc = with_hub_shorthand(cfg.data)
    splits: dict[str, Split] = {}
    for name, path in [("validation", dc.validation), *dc.eval_sets.items(), ("test", dc.test)]:
        if path:
            if name in splits or name == "train":
                raise ConfigError(f"data.eval_sets.{name}: the name is taken by a standard split")
            splits[name] = read_split(
                name,
                path,
                tag_scheme=dc.tag_scheme,
                strict=dc.strict,
                max_sentences=dc.max_eval_samples,
                labels=labels,
                columns=Columns(dc.columns.tokens, dc.columns.tags),
                endpoint_url=cfg.run.s3_endpoint_url,
                region=cfg.run.s3_region,
            )
    return splits


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, normaliser, specials)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _log_stats(name: str, st: dict[str, int]) -> None:
    if st.get("split_sentences") or st.get("cut_words") or st.get("empty_words"):
        log.info(
            "%s: %d sentence(s) longer than the window were split into overlapping windows; "
            "%d over-long word(s) cut to the window; %d word(s) with no sub-words mapped to <unk>",
            name,
            st.get("split_sentences", 0),
            st.get("cut_words", 0),
            st.get("empty_words", 0),
        )


def train_provenance(data: Data) -> dict[str, Any]:
    """Where the training windows came from: the preparation, its corpora (files, weights, sentences)."""
    m = data.train.manifest
    return {
        "prepared": data.train.uri,
        "fingerprint": data.train.fingerprint,
        "reused": data.train.reused,
        "sentences": m["sentences"],
        "windows": m["windows"],
        "shards": len(m["shards"]),
        "corpora": {
            name: {
                "weight": data.weights.get(name, 1.0),
                "sentences": c["sentences"],
                "shards": len(c["shards"]),
                "files": [f["uri"] for f in c["files"]],
            }
            for name, c in m["corpora"].items()
        },
    }
