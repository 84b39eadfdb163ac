"""The token-classification model and its tokenizer: from a folder or the hub, or built from a config.

Two built-in names build a randomly initialised XLM-R from `XLMRobertaConfig` instead of loading
weights: `builtin:tiny-xlmr` (the demo's 2-layer model, with its shipped tokenizer) and
`builtin:xlmr-base-random[:TOKENIZER]` (xlm-roberta-base's architecture, for throughput and
memory measurements on machines without the hub; TOKENIZER is a folder or hub name, by
default `xlm-roberta-base`).
"""

from __future__ import annotations

import importlib.resources
import logging
from typing import Any

from .config import ConfigError

log = logging.getLogger("raytag")

TINY = "builtin:tiny-xlmr"
RANDOM_BASE = "builtin:xlmr-base-random"
RANDOM_BASE_TOKENIZER = "xlm-roberta-base"


def random_base_tokenizer(name_or_path: str) -> str | None:
    """The tokenizer named by `builtin:xlmr-base-random[:TOKENIZER]`, or None for any other name."""
    if name_or_path == RANDOM_BASE:
        return RANDOM_BASE_TOKENIZER
    if name_or_path.startswith(RANDOM_BASE + ":"):
        tokenizer = name_or_path[len(RANDOM_BASE) + 1 :]
        if not tokenizer:
            raise ConfigError(f"model.name_or_path {name_or_path!r}: no tokenizer after the colon")
        return tokenizer
    return None


def xlmr_base_config(tokenizer, **kwargs: Any):
    """xlm-roberta-base's architecture as an `XLMRobertaConfig`, sized to `tokenizer`'s vocabulary.

    `XLMRobertaConfig()`'s defaults are the base model's shape (12 layers, 768 wide, 12 heads,
    3072-wide feed-forward, GELU, dropout 0.1); its vocabulary (30522), position table (512)
    and token types (2) are BERT's, so those three, the layer-norm epsilon and the special ids
    are set as in xlm-roberta-base's config.json: 514 positions, because XLM-R's position ids
    start after the padding id (2 + 512 tokens).
    """
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )


def load_tokenizer(name_or_path: str):
    """A fast tokenizer for `name_or_path` (the demo's shipped tokenizer for the tiny model)."""
    from transformers import AutoTokenizer

    if name_or_path == TINY:
        path = importlib.resources.files("raytag.trainer") / "assets" / "demo-tokenizer"
        return AutoTokenizer.from_pretrained(str(path))
    random_tokenizer = random_base_tokenizer(name_or_path)
    if random_tokenizer is not None:
        name_or_path = random_tokenizer
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"model.name_or_path {name_or_path!r}: cannot load a tokenizer: {first}") from None


def load_model(
    name_or_path: str,
    labels: list[str],
    tokenizer,
    seed: int,
    dropout: float | None = None,
    attention: str | None = None,
):
    """AutoModelForTokenClassification with our label names (a fresh head when they differ).

    `attention`: transformers' `attn_implementation` (eager, sdpa); None: the library's default.
    """
    import torch  # here, not at the top: data preparation's processes load tokenizers only
    from transformers import AutoConfig, AutoModelForTokenClassification, XLMRobertaConfig

    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    extra: dict[str, Any] = {}
    kernel: dict[str, Any] = {"attn_implementation": attention} if attention else {}
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
            return AutoModelForTokenClassification.from_config(config, **kernel)
    if random_base_tokenizer(name_or_path) is not None:
        config = xlmr_base_config(tokenizer, id2label=id2label, label2id=label2id, **extra)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return AutoModelForTokenClassification.from_config(config, **kernel)
    try:
        config = AutoConfig.from_pretrained(name_or_path, id2label=id2label, label2id=label2id, **extra)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the new classifier head is initialised from the run's seed
            return AutoModelForTokenClassification.from_pretrained(
                name_or_path, config=config, ignore_mismatched_sizes=True, **kernel
            )
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"model.name_or_path {name_or_path!r}: cannot load the model: {first}") from None
