"""Reusable scratch memory for the per-tensor kernels.

The in-memory engine materializes thousands of candidates; allocating a fresh tensor is about 10x slower than
writing into an existing one on this CPU, so every kernel asks a ``Workspace`` for its temporaries. A buffer
grows only when a larger tensor than ever before asks for it: after the first candidate no kernel allocates
anything tensor-sized.
"""

from __future__ import annotations

import torch


class Workspace:
    """Named flat buffers, grown on demand and reused; ``get`` returns a view of the requested shape."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` viewing buffer ``key`` (grown if too small; contents undefined)."""
        numel = 1
        for dim in shape:
            numel *= int(dim)
        buf = self._buffers.get((key, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self._buffers[(key, dtype)] = buf
        return buf[:numel].view(tuple(shape))

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
