"""A BERT-family token classifier (BERT, RoBERTa, XLM-R) in plain torch, for tagging.

`predict` is a command a user waits for: importing transformers' model code costs 4.5 s on this
project's 2-core machine (torch._dynamo, torch.distributed.tensor, scipy, accelerate come with it),
a fifth of tagging CoNLL-2003's test set. This module runs the same weights with the same operations
in the same order as transformers 5's `BertForTokenClassification` / `XLMRobertaForTokenClassification`
in eval mode with eager attention (embeddings word + token type, then + position, LayerNorm; per layer
q/k/v, `q @ k^T * d^-0.5` plus the padding mask, softmax, `@ v`, dense + residual + LayerNorm, GELU
feed-forward + residual + LayerNorm; the classifier), so the logits are transformers' own
(tests/test_tag.py compares them). Anything else it does not claim to know (another model type,
position embedding, activation, a decoder, sharded weights) returns None from `load`, and `predict`
loads the model with transformers instead.

`ExportTokenizer` is the part of a fast tokenizer that `features.encode` uses, over the `tokenizers`
library that transformers' fast tokenizers wrap, read from a raytag export's `tokenizer.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

FAMILIES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}  # model_type -> weights' prefix
VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when a tokenizer states none


class TokenClassifier:
    """The weights of a BERT-family token classifier and its forward pass: `logits(ids, mask)`."""

    def __init__(
        self, config: dict[str, Any], weights: dict[str, torch.Tensor], attention: str = "eager"
    ) -> None:
        self.config = config
        self.sdpa = attention == "sdpa"  # torch's fused kernel, as transformers' "sdpa"; else its eager maths
        self.w = weights
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.pad = int(config.get("pad_token_id") or 0)
        self.roberta = FAMILIES[config["model_type"]] == "roberta"  # positions count from pad + 1

    def to(self, device: torch.device) -> TokenClassifier:
        self.w = {k: v.to(device) for k, v in self.w.items()}
        return self

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Word + token type (0), then + position embeddings, normalised (transformers' order)."""
        w = self.w
        x = F.embedding(ids, w["embeddings.word_embeddings.weight"])
        x = x + F.embedding(torch.zeros_like(ids), w["embeddings.token_type_embeddings.weight"])
        x = x + F.embedding(positions, w["embeddings.position_embeddings.weight"])
        return self._norm(x, "embeddings.LayerNorm")

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of [batch, heads, length, head] queries; `keep` ([batch, 1, 1, length], None
        without padding) masks padded keys as transformers does: for sdpa the boolean mask itself,
        for eager 0 / the dtype's minimum added to the scores (in the embeddings' dtype)."""
        scale = q.shape[-1] ** -0.5
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        if keep is not None:
            dtype = self.w["embeddings.LayerNorm.weight"].dtype
            zero = torch.zeros((), device=q.device, dtype=dtype)
            scores = scores + torch.where(keep, zero, torch.finfo(dtype).min)
        return torch.matmul(F.softmax(scores, dim=-1), v)

    def _feed_forward(self, x: torch.Tensor, context: torch.Tensor, p: str) -> torch.Tensor:
        """A layer past its attention: output projection + residual + LayerNorm, GELU feed-forward +
        residual + LayerNorm."""
        x = self._norm(
            self._linear(context, p + "attention.output.dense") + x, p + "attention.output.LayerNorm"
        )
        inner = F.gelu(self._linear(x, p + "intermediate.dense"))
        return self._norm(self._linear(inner, p + "output.dense") + x, p + "output.LayerNorm")

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits per token ([batch, length, labels]) of padded `input_ids` (mask 1 on real tokens)."""
        batch, length = input_ids.shape
        if self.roberta:  # RoBERTa's create_position_ids_from_input_ids
            real = input_ids.ne(self.pad).int()
            positions = (torch.cumsum(real, dim=1).type_as(real) * real).long() + self.pad
        else:
            positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
        x = self._embed(input_ids, positions)
        keep = None if bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
        head = x.shape[-1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (
                self._linear(x, p + f"attention.self.{n}").view(batch, length, -1, head).transpose(1, 2)
                for n in ("query", "key", "value")
            )
            context = self._attend(q, k, v, keep).transpose(1, 2).contiguous().reshape(batch, length, -1)
            x = self._feed_forward(x, context.contiguous(), p)
        return self._linear(x, "classifier")

    def packed_logits(self, sequences: Sequence[np.ndarray], rows: np.ndarray) -> torch.Tensor:
        """Logits ([len(rows), labels]) at `rows`, indices into the tokens of `sequences` laid end to
        end. The same model as `logits` on the sequences padded to the longest, but its linear layers
        run on the real tokens alone: length-grouped batches of short sentences still pad 10-15% (a
        batch spans lengths 8 to 11), and those layers are three quarters of the time. Only attention
        sees the padded layout, and after the last attention only the rows asked for go on (the
        output projection and feed-forward of the other tokens change no logit asked for). The
        values agree with `logits` to rounding (other matrix shapes)."""
        device = self.w["classifier.weight"].device
        lengths = np.array([len(s) for s in sequences])
        batch, longest = len(lengths), int(lengths.max())
        ids_np = np.concatenate(sequences).astype(np.int64)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # each token's sequence start
        within = np.arange(len(ids_np)) - starts
        if self.roberta:  # create_position_ids_from_input_ids: count the tokens that are not padding
            real = (ids_np != self.pad).astype(np.int64)
            before = np.concatenate([[0], np.cumsum(real)])[starts]
            positions = (np.cumsum(real) - before) * real + self.pad
        else:
            positions = within
        slot = torch.from_numpy(np.repeat(np.arange(batch) * longest, lengths) + within).to(device)
        picked = torch.from_numpy(rows.astype(np.int64)).to(device)
        x = self._embed(torch.from_numpy(ids_np).to(device), torch.from_numpy(positions).to(device))
        keep = None
        if (lengths < longest).any():
            keep = (torch.arange(longest) < torch.from_numpy(lengths)[:, None]).to(device)[:, None, None, :]
        head = x.shape[-1] // self.heads

        def padded(t: torch.Tensor) -> torch.Tensor:  # [tokens, width] -> [batch, heads, longest, head]
            full = t.new_zeros(batch * longest, t.shape[-1]).index_copy_(0, slot, t)
            return full.view(batch, longest, self.heads, head).transpose(1, 2)

        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (padded(self._linear(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
            context = self._attend(q, k, v, keep).transpose(1, 2).reshape(batch * longest, -1)
            context = context.index_select(0, slot)
            if i == self.layers - 1:  # past the last attention only the rows asked for are needed
                context, x = context.index_select(0, picked), x.index_select(0, picked)
            x = self._feed_forward(x, context, p)
        return self._linear(x if self.layers else x.index_select(0, picked), "classifier")


def load(model_dir: str | Path, attention: str = "eager") -> TokenClassifier | None:
    """The folder's model as a TokenClassifier, or None when it is not one this module runs exactly
    (see the module's docstring): then load it with transformers. `attention`: "eager" or "sdpa"."""
    from safetensors.torch import load_file

    folder = Path(model_dir)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    plain = (
        config.get("model_type") in FAMILIES
        and any(a.endswith("ForTokenClassification") for a in config.get("architectures") or [])
        and config.get("position_embedding_type", "absolute") == "absolute"
        and config.get("hidden_act") == "gelu"
        and not config.get("is_decoder")
        and not config.get("add_cross_attention")
        and config.get("chunk_size_feed_forward", 0) in (0, None)
        and (config.get("pad_token_id") is not None or FAMILIES[config["model_type"]] != "roberta")
        and int(config["hidden_size"]) % int(config["num_attention_heads"]) == 0
        and (folder / "model.safetensors").is_file()
    )
    if not plain:
        return None
    prefix = FAMILIES[config["model_type"]] + "."
    weights = {}
    for key, tensor in load_file(str(folder / "model.safetensors")).items():
        if key.startswith(prefix):
            weights[key[len(prefix) :]] = tensor
        elif key.startswith("classifier."):
            weights[key] = tensor
    needed = ["embeddings.word_embeddings.weight", "classifier.weight", "classifier.bias"]
    needed += [f"encoder.layer.{i}.output.LayerNorm.bias" for i in range(int(config["num_hidden_layers"]))]
    if any(k not in weights for k in needed):
        return None
    return TokenClassifier(config, weights, attention)


class ExportTokenizer:
    """What `features.encode` asks of a tokenizer, over a `tokenizers.Tokenizer` read from the file:
    pre-split words to ids and word ids, the special tokens around a sentence, pad and unk ids, the
    longest input. The file is the tokenizer training ran (a raytag export writes it whole), and
    transformers' fast tokenizers make the same `encode_batch(..., is_pretokenized=True)` call on it."""

    is_fast = True

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        self._tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tk.no_truncation()  # transformers sets these per call; encode asks for neither
        self._tk.no_padding()
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.model_max_length = int(config.get("model_max_length") or VERY_LARGE_INTEGER)
        self.pad_token_id = self._id(config.get("pad_token"))
        self.unk_token_id = self._id(config.get("unk_token"))

    def _id(self, token: Any) -> int | None:
        if isinstance(token, dict):  # an AddedToken written out
            token = token.get("content")
        return self._tk.token_to_id(token) if isinstance(token, str) else None

    def __call__(
        self, words: Sequence[Any], is_split_into_words: bool = True, add_special_tokens: bool = True
    ) -> _Encoded:
        if not is_split_into_words:
            raise ValueError("ExportTokenizer takes words (is_split_into_words=True) only")
        if words and isinstance(words[0], str):  # one sentence, as transformers takes it
            return _Encoded(
                [self._tk.encode(list(words), is_pretokenized=True, add_special_tokens=add_special_tokens)],
                True,
            )
        batch = [list(w) for w in words]
        return _Encoded(
            self._tk.encode_batch(batch, is_pretokenized=True, add_special_tokens=add_special_tokens), False
        )


class _Encoded:
    """`["input_ids"]` and `word_ids(i)` of a batch (or of one sentence), as transformers gives them."""

    def __init__(self, encodings: list, single: bool) -> None:
        self._encodings, self._single = encodings, single
        self._ids: list[list[int]] | None = None

    def __getitem__(self, key: str) -> Any:
        if key != "input_ids":
            raise KeyError(key)
        if self._ids is None:  # once: encode reads it sentence by sentence
            self._ids = [e.ids for e in self._encodings]
        return self._ids[0] if self._single else self._ids

    def word_ids(self, index: int = 0) -> list[int | None]:
        return self._encodings[index].word_ids
