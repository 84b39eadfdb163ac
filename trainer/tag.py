"""An exported model ready to tag text: loaded once, then given batches of lines or sentences.

`Tagger` is what every `predict` runs, whether it tags one file in this process or a corpus on a
Ray actor pool (one Tagger per actor): sentences are tokenised in one batched call, long ones cut
into the training windows (trainer/features.py), the windows sorted into length-grouped batches
under a token budget (trainer/batching.py), and each batch run under `torch.inference_mode` in the
precision the run evaluated in (bf16 where the CPU or GPU computes it natively). Each word's tag
is read at its first sub-token, from the window that owns it, as training's evaluation reads it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("raytag")

# Padded tokens per forward pass. Smaller batches keep a layer's activations in the core's cache:
# CPU seconds for 1000 CoNLL-2003 test sentences on the offline encoder (12 layers, 384 wide, bf16
# autocast, 1 thread, two rounds each): 1024 tokens 6.2-7.3, 2048 6.8-7.5, 4096 7.2-8.7, 8192
# 10.0-11.8, 16384 (predict's budget before) 11.5-12.1. A GPU wants more (--batch-tokens).
BATCH_TOKENS = 2048
MAX_BATCH_SENTENCES = 1024


def inference_precision(meta: dict, device: torch.device) -> str:
    """The precision to tag in: the run's own (raytag.json's `precision`), as training decided it;
    for a model without one, what training would decide here (`resolve_precision("auto")`: bf16
    on GPUs and CPUs that compute it natively, fp16 on older GPUs, else fp32). bf16 asked of a
    device without native bf16 falls back to fp32, as training's `auto` would."""
    import torch

    from .engine import cpu_has_bf16, resolve_precision

    on_gpu = device.type == "cuda"
    precision = meta.get("precision") or resolve_precision("auto", on_gpu)
    if precision == "bf16":
        native = torch.cuda.is_bf16_supported(including_emulation=False) if on_gpu else cpu_has_bf16()
        return "bf16" if native else "fp32"
    if precision == "fp16" and not on_gpu:
        return "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """torch.autocast for `precision` ('bf16', 'fp16') on `device`, or a no-op for fp32."""
    from contextlib import nullcontext

    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtypes[precision])


class Tagger:
    """An exported model (a raytag `model/` folder or any Hugging Face token-classification folder)
    loaded once, on the GPU when one is visible, else on the CPU.

    A raytag export of a BERT-family model (BERT, RoBERTa, XLM-R) runs on trainer/encoder.py, its
    tokenizer read from `tokenizer.json` with the `tokenizers` library: the same logits and token
    ids as transformers gives, without importing transformers (4.5 s on 2 cores). Any other folder
    is loaded with transformers (`predict.load_exported`).

    `tag_words` gives tags per word of pre-split sentences; `entities` gives the entities of raw
    text lines with character offsets. Raises FileNotFoundError for a folder without a model.
    """

    def __init__(self, model_dir: str, batch_tokens: int = BATCH_TOKENS, device: str | None = None):
        import torch

        from . import encoder

        folder = Path(model_dir)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:  # a broken file in the folder (a truncated download, bad JSON) is the user's to mend
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            meta_file = folder / "raytag.json"
            self.meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
            tokenizer_files = all((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
            lean = None
            if self.meta and tokenizer_files:
                # transformers' default kernel for BERT-family models is sdpa; a raytag export names its own
                lean = encoder.load(folder, self.meta.get("attention") or "sdpa")
            self.encoder = lean.to(self.device) if lean is not None else None
            self._hf: Any = None
            if lean is not None:
                self.tokenizer: Any = encoder.ExportTokenizer(folder)
                self.engine = "raytag's encoder"
            else:
                from .predict import load_exported

                self._hf, self.tokenizer, _ = load_exported(model_dir)
                self._hf.to(self.device)
                self.engine = "transformers"
        except Exception as e:
            from .predict import PredictError

            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise PredictError(f"{model_dir}: cannot load the model ({type(e).__name__}: {first})") from e
        self.threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        self.precision = inference_precision(self.meta, self.device)
        self.batch_tokens = batch_tokens
        self.labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def describe(self) -> str:
        """One phrase for the log: device, precision, window and batch settings."""
        length = self.meta.get("max_length")
        windows = f"windows of {length} tokens" if length else "the tokenizer's windows"
        return f"{self.engine}, {self.device.type}, {self.precision}, {windows}, batches of {self.batch_tokens} tokens"

    def tag_words(
        self, sentences: Sequence[Sequence[str]], with_probs: bool = False
    ) -> tuple[list[list[str]], list[np.ndarray] | None]:
        """The predicted tag of every word of every sentence and, with `with_probs`, each word's
        probability of its tag (at its first sub-token, where the tag is read)."""
        from .features import encode, stitch

        enc = encode(
            sentences, None, self.tokenizer, None, self.meta.get("max_length"), self.meta.get("stride", 64)
        )
        preds, probs = self._run(enc.windows, with_probs)
        tags = [[self.labels[int(t)] for t in arr] for arr in stitch(enc, preds)]
        return tags, (stitch(enc, probs) if probs is not None else None)

    def entities(self, lines: Sequence[str]) -> list[list[dict]]:
        """The entities of each line, split into words as CoNLL writes them (trainer/words.py):
        `{"text", "type", "start", "end", "score"}` with `line[start:end] == text`; a line without
        words has none."""
        from .predict import line_entities
        from .words import word_spans

        spans = [word_spans(line) for line in lines]
        words = [[line[a:b] for a, b in sp] for line, sp in zip(lines, spans, strict=True) if sp]
        tags, probs = self.tag_words(words, with_probs=True)
        assert probs is not None
        tagged = iter(zip(tags, probs, strict=True))
        return [
            line_entities(line, sp, *next(tagged)) if sp else []
            for line, sp in zip(lines, spans, strict=True)
        ]

    def _run(self, windows, with_probs: bool) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Per window: the label id of each owned word and (`with_probs`) its probability."""
        from .batching import plan_batches

        lengths = [len(w) for w in windows]
        batches = plan_batches(
            lengths, self.batch_tokens, MAX_BATCH_SENTENCES, seed=0, epoch=0, shuffle=False
        )
        preds: list[np.ndarray] = [None] * len(windows)  # type: ignore[list-item]
        probs: list[np.ndarray] = [None] * len(windows)  # type: ignore[list-item]
        for idx, (best, top) in zip(
            batches, self._map(lambda idx: self._batch(windows, idx), batches), strict=True
        ):
            start = 0
            for i in idx:
                end = start + len(windows[i].positions)
                preds[i], probs[i] = best[start:end], top[start:end]
                start = end
        return preds, (probs if with_probs else None)

    def _batch(self, windows, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """One batch: each owned word's label id and its probability, in window order. Only the owned
        words' first sub-tokens are read: the softmax runs over those rows alone."""
        import numpy as np
        import torch

        with torch.inference_mode(), autocast(self.precision, self.device):
            if self.encoder is not None:
                seqs = [windows[i].input_ids for i in idx]
                starts = np.cumsum([0] + [len(s) for s in seqs[:-1]])
                rows = np.concatenate([windows[i].positions + o for i, o in zip(idx, starts, strict=True)])
                picked = self.encoder.packed_logits(seqs, rows)
            else:
                from .evaluate import collate

                batch = collate(windows, idx, self.pad_id, self.device)
                logits = self._hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                at = np.concatenate([np.full(len(windows[i].positions), r) for r, i in enumerate(idx)])
                cols = np.concatenate([windows[i].positions for i in idx]).astype(np.int64)
                picked = logits[
                    torch.from_numpy(at).to(logits.device), torch.from_numpy(cols).to(logits.device)
                ]
            top, best = picked.float().softmax(-1).max(-1)
        return best.cpu().numpy(), top.cpu().numpy()

    def _map(self, fn, items: list) -> list:
        """fn over items: on a CPU with several threads, one batch per thread at a time, each with one
        torch thread. CoNLL-2003's test set on 2 idle cores: 11.3 s side by side, 13.4 s one batch at
        a time on 2 threads (26.2 CPU seconds against 22.0: the threads of one batch wait for each
        other), the same results (each operation runs on one thread, as on a one-CPU Ray actor)."""
        import torch

        if self.threads <= 1:
            return [fn(x) for x in items]
        from concurrent.futures import ThreadPoolExecutor

        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(self.threads) as pool:
                return list(pool.map(fn, items))
        finally:
            torch.set_num_threads(self.threads)
