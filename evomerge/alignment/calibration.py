"""Calibration data for data-aware merges: texts for language models, tensors for plain modules.

Texts come from a JSONL file (one JSON object per line, the text in ``field``) or a plain text file (one
sample per non-empty line). ``samples`` picks that many (a seeded random subset when the file has more, all of
them in file order otherwise), so a recipe names its data and its size and the merge is reproducible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from evomerge.errors import EvomergeError


def load_texts(path: str | Path, field: str = "text", samples: int | None = None, seed: int = 0) -> list[str]:
    """Calibration texts from ``path`` (.jsonl / .json lines with ``field``, or any other file as text lines)."""
    p = Path(path)
    if not p.is_file():
        raise EvomergeError(f"calibration file not found: {p}")
    texts: list[str] = []
    if p.suffix.lower() in (".jsonl", ".json"):
        with p.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvomergeError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict) or field not in row:
                    raise EvomergeError(f"{p}:{lineno}: no field {field!r}")
                if not isinstance(row[field], str):
                    raise EvomergeError(f"{p}:{lineno}: field {field!r} is not a string")
                if row[field].strip():
                    texts.append(row[field])
    else:
        texts = [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise EvomergeError(f"calibration file {p} has no texts")
    if samples is not None:
        if samples < 1:
            raise EvomergeError(f"calibration samples must be at least 1, got {samples}")
        if samples < len(texts):
            keep = sorted(random.Random(seed).sample(range(len(texts)), samples))
            texts = [texts[i] for i in keep]
    return texts


def tokenized_batches(texts: list[str], tokenizer, max_length: int = 512, batch_size: int = 4,
                      ) -> list[dict[str, torch.Tensor]]:
    """Padded tokenizer batches (``input_ids``, ``attention_mask``), truncated to ``max_length`` tokens."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def tensor_batches(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 256,
                   samples: int | None = None, seed: int = 0) -> list:
    """Batches of ``x`` (or ``(x, y)`` pairs) for plain modules, optionally a seeded subset of ``samples`` rows."""
    idx = torch.arange(x.shape[0])
    if samples is not None and samples < x.shape[0]:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    out = []
    for i in range(0, len(idx), batch_size):
        sel = idx[i:i + batch_size]
        out.append(x[sel] if y is None else (x[sel], y[sel]))
    return out
