"""The token-classification model and its tokenizer, from a folder, the hub, or the built-in tiny XLM-R."""

from __future__ import annotations

import importlib.resources
import logging
from typing import Any

import torch

log = logging.getLogger("raytag")

TINY = "builtin:tiny-xlmr"


def load_tokenizer(name_or_path: str):
    """A fast tokenizer for `name_or_path` (the demo's shipped tokenizer for the tiny model)."""
    from transformers import AutoTokenizer

    if name_or_path == TINY:
        path = importlib.resources.files("raytag.trainer") / "assets" / "demo-tokenizer"
        return AutoTokenizer.from_pretrained(str(path))
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"model.name_or_path {name_or_path!r}: cannot load a tokenizer: {first}") from None


def load_model(name_or_path: str, labels: list[str], tokenizer, seed: int, dropout: float | None = None):
    """AutoModelForTokenClassification with our label names (a fresh head when they differ)."""
    from transformers import AutoConfig, AutoModelForTokenClassification, XLMRobertaConfig

    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    extra: dict[str, Any] = {}
    if dropout is not None:
        extra = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    if name_or_path == TINY:
        # A 2-layer, 64-wide XLM-R: small enough to train in seconds on a laptop CPU.
        config = XLMRobertaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=514,
            type_vocab_size=1,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            id2label=id2label,
            label2id=label2id,
            **extra,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return AutoModelForTokenClassification.from_config(config)
    try:
        config = AutoConfig.from_pretrained(name_or_path, id2label=id2label, label2id=label2id, **extra)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the new classifier head is initialised from the run's seed
            return AutoModelForTokenClassification.from_pretrained(
                name_or_path, config=config, ignore_mismatched_sizes=True
            )
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"model.name_or_path {name_or_path!r}: cannot load the model: {first}") from None
