"""Built-in model names: `builtin:xlmr-base-random[:TOKENIZER]` builds xlm-roberta-base's architecture."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import torch

from raytag.trainer.config import ConfigError
from raytag.trainer.model import (
    RANDOM_BASE,
    load_model,
    load_tokenizer,
    random_base_tokenizer,
    xlmr_base_config,
)

DEMO_TOKENIZER = str(importlib.resources.files("raytag.trainer") / "assets" / "demo-tokenizer")
XLMR_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "xlm-roberta-base-tokenizer"
LABELS = ["O", "B-PER", "I-PER"]


def test_random_base_name_selects_its_tokenizer():
    assert random_base_tokenizer(RANDOM_BASE) == "xlm-roberta-base"
    assert random_base_tokenizer(f"{RANDOM_BASE}:/some/folder") == "/some/folder"
    assert random_base_tokenizer("xlm-roberta-base") is None
    assert random_base_tokenizer("builtin:tiny-xlmr") is None
    with pytest.raises(ConfigError, match="no tokenizer after the colon"):
        random_base_tokenizer(f"{RANDOM_BASE}:")


@pytest.mark.slow  # builds an 85M-parameter model on the CPU (about 10 s on 2 cores)
def test_random_base_loads_the_named_tokenizer_and_a_base_shaped_model():
    name = f"{RANDOM_BASE}:{DEMO_TOKENIZER}"
    tokenizer = load_tokenizer(name)
    assert len(tokenizer) == len(load_tokenizer("builtin:tiny-xlmr"))
    model = load_model(name, LABELS, tokenizer, seed=3)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (
        12,
        768,
        12,
        3072,
    )
    assert cfg.vocab_size == len(tokenizer)
    assert cfg.max_position_embeddings == 514 and cfg.type_vocab_size == 1
    assert cfg.id2label == dict(enumerate(LABELS))
    # A 512-token window fits the position table (XLM-R's positions start after the padding id).
    ids = torch.full((1, 512), 5, dtype=torch.long)
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 512, len(LABELS))


@pytest.mark.shared
def test_random_base_with_xlmr_tokenizer_has_xlmr_base_size():
    if not XLMR_TOKENIZER.is_dir():
        pytest.skip(f"{XLMR_TOKENIZER} is absent (../shared is not beside this checkout)")
    tokenizer = load_tokenizer(f"{RANDOM_BASE}:{XLMR_TOKENIZER}")
    assert len(tokenizer) == 250002
    config = xlmr_base_config(tokenizer, num_labels=9)
    from transformers import AutoModelForTokenClassification

    with torch.device("meta"):  # shapes only: no 1 GB of weights to initialise
        model = AutoModelForTokenClassification.from_config(config)
    # xlm-roberta-base is 278M parameters with its pooler; the tagger has none and a 9-way head.
    assert sum(p.numel() for p in model.parameters()) == 277_459_977
