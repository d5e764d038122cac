"""Perplexity on a text file or a JSONL field: token-weighted, with strided windows for long texts.

Each document (the whole text file, or each JSONL record's field) is tokenized once at build time. A document
longer than ``max_length`` tokens is covered by windows of ``max_length`` tokens starting every ``stride``
tokens; each token is scored once and sees at least ``max_length - stride`` tokens of context (all earlier
tokens when fewer; smaller stride = more context and more compute). The first token of a document has no
context and is not scored.
Perplexity = exp(total negative log-likelihood / number of scored tokens), over all documents together
(token-weighted, not an average of per-document perplexities).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.evaluators.base import Evaluator, check_keys, model_device, resolve_path

CONFIG_KEYS = {"type", "name", "description", "path", "field", "max_length", "stride", "batch_size", "metrics"}


def load_documents(path: Path, field: str = "text") -> list[str]:
    """The whole file as one document, or one document per JSONL record (``field``)."""
    if not path.is_file():
        raise EvomergeError(f"perplexity data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() not in (".jsonl", ".json"):
        docs = [text]
    else:
        docs = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)[field]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvomergeError(f"{path}:{line_no}: expected a JSON object with a {field!r} field") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise EvomergeError(f"{path}: no text")
    return docs


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: tokens [begin, end) are fed, targets first_scored..end-1 scored.

    The first window is [0, max_length); each next one scores the next ``stride`` tokens and ends there,
    starting max_length tokens earlier, so every scored token has at least max_length - stride tokens of
    context (all of them near the start of the document). Needs 1 <= stride < max_length.
    """
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be in 1..max_length-1, got stride={stride}, max_length={max_length}")
    if n_tokens < 2:
        return []
    end = min(max_length, n_tokens)
    spans = [(0, end, 1)]
    while end < n_tokens:
        first = end
        end = min(first + stride, n_tokens)
        spans.append((end - max_length, end, first))
    return spans


class PerplexityEvaluator(Evaluator):
    """Token-weighted perplexity (``perplexity``) and mean negative log-likelihood per token (``nll``)."""

    def __init__(self, config: dict[str, Any], base_dir: Path, limit: int | None = None, seed: int = 0) -> None:
        check_keys(config, CONFIG_KEYS, "perplexity evaluator")
        if "path" not in config:
            raise EvomergeError("perplexity evaluator needs a 'path'")
        self.path = resolve_path(config["path"], base_dir)
        self.name = str(config.get("name", f"perplexity_{self.path.stem}"))
        self.documents = load_documents(self.path, str(config.get("field", "text")))
        if limit is not None and limit < len(self.documents):
            chosen = sorted(random.Random(seed).sample(range(len(self.documents)), limit))
            self.documents = [self.documents[i] for i in chosen]
        self.max_length = config.get("max_length")
        self.stride = config.get("stride")
        self.batch_size = int(config.get("batch_size", 8))
        self.metric_names = tuple(config.get("metrics") or ("perplexity", "nll"))
        bad = [m for m in self.metric_names if m not in ("perplexity", "nll")]
        if bad:
            raise EvomergeError(f"perplexity evaluator: unknown metric(s) {', '.join(bad)}; available: perplexity, nll")
        self._token_cache: tuple[Any, list[list[int]]] | None = None

    def _tokens(self, tokenizer) -> list[list[int]]:
        if self._token_cache is None or self._token_cache[0] is not tokenizer:
            ids = [list(tokenizer(doc)["input_ids"]) for doc in self.documents]
            self._token_cache = (tokenizer, ids)
        return self._token_cache[1]

    def _window_sizes(self, model) -> tuple[int, int]:
        max_length = self.max_length or getattr(model.config, "max_position_embeddings", None) or 1024
        max_length = int(min(max_length, 4096))
        stride = int(self.stride or max(1, max_length // 2))
        if not 1 <= stride < max_length:
            raise EvomergeError(f"perplexity: stride must be in 1..max_length-1 ({max_length - 1}), got {stride}")
        return max_length, stride

    @torch.inference_mode()
    def evaluate(self, model, tokenizer) -> dict[str, float]:
        """``perplexity`` (exp of the mean negative log-likelihood per scored token, >= 1) and ``nll`` (nats per
        token), those of ``metric_names``."""
        max_length, stride = self._window_sizes(model)
        pieces: list[tuple[list[int], int]] = []  # (input ids of the window, index of the first scored target)
        for ids in self._tokens(tokenizer):
            for begin, end, first in windows(len(ids), max_length, stride):
                pieces.append((ids[begin:end], first - begin))
        pieces.sort(key=lambda p: -len(p[0]))
        device = model_device(model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        total_nll, total_tokens = 0.0, 0
        for start in range(0, len(pieces), self.batch_size):
            batch = pieces[start:start + self.batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            targets = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (ids, first) in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention[row, :len(ids)] = 1
                targets[row, first:len(ids)] = torch.tensor(ids[first:])  # right padding: positions stay 0..n-1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            logits = logits[:, :-1].float()
            labels = targets[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total_nll += float(nll)
            total_tokens += int((labels != -100).sum())
        if total_tokens == 0:
            raise EvomergeError(f"perplexity: {self.path} has fewer than 2 tokens to score")
        mean_nll = total_nll / total_tokens
        metrics = {"perplexity": math.exp(mean_nll), "nll": mean_nll}
        return {k: metrics[k] for k in self.metric_names}
