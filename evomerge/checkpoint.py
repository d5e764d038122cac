"""Hugging Face checkpoint folders: read them tensor by tensor, write them atomically.

Reading (``Checkpoint``) never loads a whole model: each tensor is read only when asked for, by default with one
``pread`` from the page cache into a buffer of its own (no shared mapping that in-place edits could corrupt or
that keeps every source page resident), or as a zero-copy memory-mapped view (``safe_open``) for read-only
callers. Every problem a user can cause (a missing folder, no config.json, no weights,
a truncated or corrupted safetensors file, an index naming a missing shard, pickle-only weights without
``--allow-pickle``) is found when the folder is opened, cheaply (headers only), and reported as one
``EvomergeError`` line naming the file, so a merge never fails half-way through.

Writing (``write_checkpoint``) streams: each tensor goes to disk as it arrives (after room reserved for the
shard's safetensors header, which is filled in when the shard is full), so at most one tensor is held in memory
however large the model. Everything is written into a temporary folder next to the destination and renamed into place at
the end: an interrupted write never leaves a folder that looks complete, and ``overwrite`` replaces an old
folder only once the new one is whole.

Safety: safetensors only by default. ``.bin`` (pickle) weights are read only with ``allow_pickle=True``, and
then with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
import yaml
from safetensors import safe_open

from evomerge.architecture import BLOCK_NAME, NUM_LAYERS_KEYS, Architecture, resolve
from evomerge.errors import EvomergeError
from evomerge.tensor_sets import check_written_tensors, source_tied_heads

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
GENERATION_CONFIG = "generation_config.json"

#: Files that make up a tokenizer (whichever of them a folder has are copied with it).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# safetensors header dtype names <-> torch dtypes.
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_TO_TORCH[_name] = getattr(torch, _attr)
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_LAYER_NAME = BLOCK_NAME  # model.layers.N., transformer.h.N., gpt_neox.layers.N.


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``, ``"bf16"``, ``"torch.float16"`` or a torch.dtype -> torch.dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise EvomergeError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16, float64")
    return _DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


def parse_size(size: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"500MB"``, ``"40KB"``, ``"1GiB"`` (powers of 1024), or an int of bytes.

    Decimal units follow the Hugging Face convention (``save_pretrained(max_shard_size="5GB")``).
    """
    if isinstance(size, bool):
        raise EvomergeError(f"invalid size {size!r}; use e.g. 2GB, 500MB, 40KB or a number of bytes")
    if isinstance(size, int):
        if size <= 0:
            raise EvomergeError(f"invalid size {size!r}; it must be positive")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not match:
        raise EvomergeError(f"invalid size {size!r}; use e.g. 2GB, 500MB, 40KB or a number of bytes")
    number, unit = float(match.group(1)), match.group(2)
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("B").rstrip("I")]
    value = int(number * base**power)
    if value <= 0:
        raise EvomergeError(f"invalid size {size!r}; it must be positive")
    return value


def find_tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer files present in ``folder`` (see TOKENIZER_FILES), in that order."""
    folder = Path(folder)
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def find_generation_config(*folders: str | Path | None) -> Path | None:
    """The ``generation_config.json`` of the first of ``folders`` that has one (EOS ids, decoding defaults).

    A merge takes it from the tokenizer source, else the base: its token ids belong to that tokenizer."""
    for folder in folders:
        if folder is not None and (Path(folder) / GENERATION_CONFIG).is_file():
            return Path(folder) / GENERATION_CONFIG
    return None


# --------------------------------------------------------------------------------------------------- reading


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and check a safetensors header without reading the data: {name: {dtype, shape, data_offsets}}."""
    return _parse_safetensors_header(path)[0]


def _parse_safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """(header, byte offset where the data section starts), after checking the file is whole and consistent.

    Catches truncated and corrupted files when a checkpoint is opened rather than mid-merge: the header must be
    valid JSON, every tensor's byte range must match its shape and dtype, the ranges must tile the data section,
    and the data section must end exactly where the file ends.
    """
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise EvomergeError(f"corrupted safetensors file {path}: too short to hold a header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise EvomergeError(f"corrupted safetensors file {path}: header length {header_len} "
                                    f"does not fit in a file of {file_size} bytes")
            raw = f.read(header_len)
    except OSError as exc:
        raise EvomergeError(f"cannot read safetensors file {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise EvomergeError(f"corrupted safetensors file {path}: unreadable header ({exc})".splitlines()[0]) from None
    header.pop("__metadata__", None)
    data_size = file_size - 8 - header_len
    ranges = []
    for name, info in header.items():
        try:
            dtype = _ST_TO_TORCH[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise EvomergeError(f"corrupted safetensors file {path}: bad header entry for tensor {name!r}") from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or begin < 0:
            raise EvomergeError(f"corrupted safetensors file {path}: tensor {name!r} has {end - begin} bytes "
                                f"for shape {shape} {info['dtype']}")
        ranges.append((begin, end))
    ranges.sort()
    position = 0
    for begin, end in ranges:
        if begin != position:
            raise EvomergeError(f"corrupted safetensors file {path}: tensor data ranges overlap or leave gaps")
        position = end
    if position != data_size:
        what = "truncated" if position > data_size else "corrupted"
        raise EvomergeError(f"{what} safetensors file {path}: header describes {position} bytes of tensor data "
                            f"but the file holds {data_size}")
    return header, 8 + header_len


class Checkpoint:
    """A local Hugging Face checkpoint folder, read lazily tensor by tensor.

    Opening checks everything cheaply (config.json, which weight files exist, every safetensors header, that an
    index's shards exist and hold the tensors it lists), so bad input fails at once with one line naming the file.
    ``get`` then reads one tensor at a time (see its docstring; open files and mappings are cached).
    """

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        if not self.path.exists():
            raise EvomergeError(f"model folder not found: {self.path}")
        if not self.path.is_dir():
            raise EvomergeError(f"not a model folder: {self.path}")
        self.config: dict[str, Any] = self._read_config()
        self._where: dict[str, Path] = {}  # tensor name -> file holding it
        self._info: dict[str, tuple[list[int], torch.dtype]] = {}  # tensor name -> (shape, dtype)
        self._offsets: dict[str, int] = {}  # tensor name -> absolute byte offset in its safetensors file
        self._handles: dict[Path, Any] = {}  # open safe_open handles, or loaded pickle state dicts
        self._fds: dict[Path, int] = {}  # plain read-only file descriptors for copying reads
        self.format = self._index_weights()
        self.tensor_names: list[str] = list(self._where)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensor_names)} tensors, {self.format})"

    def __contains__(self, name: str) -> bool:
        return name in self._where

    # -- what is in the folder

    def _read_config(self) -> dict[str, Any]:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise EvomergeError(f"no config.json in model folder {self.path}")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise EvomergeError(f"cannot read {config_path}: {str(exc).splitlines()[0]}") from None
        if not isinstance(config, dict):
            raise EvomergeError(f"cannot read {config_path}: not a JSON object")
        return config

    def _index_weights(self) -> str:
        """Find the weight files and record where each tensor lives; returns "safetensors" or "pickle"."""
        if (self.path / SAFETENSORS_INDEX).is_file():
            self._read_index(self.path / SAFETENSORS_INDEX, self._add_safetensors_file)
            return "safetensors"
        if (self.path / SAFETENSORS_SINGLE).is_file():
            self._add_safetensors_file(self.path / SAFETENSORS_SINGLE)
            return "safetensors"
        loose = sorted(self.path.glob("*.safetensors"))
        if loose:  # shards without an index, or a single file under another name
            for file in loose:
                self._add_safetensors_file(file)
            return "safetensors"
        pickles = (self.path / PICKLE_INDEX, self.path / PICKLE_SINGLE)
        if any(p.is_file() for p in pickles) or any(self.path.glob("pytorch_model*.bin")):
            if not self.allow_pickle:
                raise EvomergeError(f"model folder {self.path} has only pickle (.bin) weights; "
                                    "convert it to safetensors or pass --allow-pickle to load it "
                                    "(weights_only, no code is run)")
            if pickles[0].is_file():
                self._read_index(pickles[0], self._add_pickle_file)
            elif pickles[1].is_file():
                self._add_pickle_file(pickles[1])
            else:
                raise EvomergeError(f"model folder {self.path} has .bin files but neither {PICKLE_SINGLE} "
                                    f"nor {PICKLE_INDEX}")
            return "pickle"
        raise EvomergeError(f"no weights in model folder {self.path} (expected {SAFETENSORS_SINGLE} "
                            f"or {SAFETENSORS_INDEX})")

    def _read_index(self, index_path: Path, add_file) -> None:
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("empty weight_map")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise EvomergeError(f"cannot read index {index_path}: {str(exc).splitlines()[0]}") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        unheld: list[tuple[str, Path]] = []  # (a name the index lists, the shard it names, which lacks it)
        for file in sorted(files, key=str):
            if not isinstance(file, str) or Path(file).name != file:  # no paths out of the folder
                raise EvomergeError(f"index {index_path} names shard {file!r}, which is not a file name in "
                                    f"{self.path}")
            shard = self.path / file
            if not shard.is_file():
                raise EvomergeError(f"index {index_path} names shard {file}, which is missing from {self.path}")
            held = add_file(shard, only=set(files[file]))
            unheld += [(n, shard) for n in files[file] if n not in held]
        unheld = [(n, shard) for n, shard in unheld if not self._tied_alias(n, self._where)]
        if unheld:
            name, shard = unheld[0]
            count = sum(s == shard for _, s in unheld)
            raise EvomergeError(f"index {index_path} says {name!r} is in {shard}, but that file "
                                f"does not hold it" + (f" ({count} tensors missing)" if count > 1 else ""))

    def _tied_alias(self, name: str, held: Iterable[str]) -> bool:
        """Is ``name`` a head this config ties to an embedding that is held? transformers then loads the model
        from the embedding alone, so an index listing the head under a shard without it is still valid."""
        embedding = source_tied_heads(self.config).get(name)
        return embedding is not None and embedding in held

    def _add_safetensors_file(self, file: Path, only: set[str] | None = None) -> set[str]:
        header, data_start = _parse_safetensors_header(file)
        names = sorted(header, key=lambda n: header[n]["data_offsets"][0])  # file order
        for name in names:
            if only is not None and name not in only:
                continue
            if name in self._where:
                raise EvomergeError(f"tensor {name!r} appears in both {self._where[name]} and {file}")
            self._where[name] = file
            self._info[name] = ([int(d) for d in header[name]["shape"]], _ST_TO_TORCH[header[name]["dtype"]])
            self._offsets[name] = data_start + int(header[name]["data_offsets"][0])
        return set(header)

    def _add_pickle_file(self, file: Path, only: set[str] | None = None) -> set[str]:
        state = self._load_pickle(file)
        for name, tensor in state.items():
            if only is not None and name not in only:
                continue
            self._where[name] = file
            self._info[name] = (list(tensor.shape), tensor.dtype)
        return set(state)

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file in self._handles:
            return self._handles[file]
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                    raise
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to unpickle is a bad file, reported in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EvomergeError(f"cannot load pickle weights {file}: {first}") from None
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise EvomergeError(f"pickle weights {file} do not hold a dict of tensors")
        self._handles[file] = dict(state)
        return self._handles[file]

    # -- tensors

    def shape(self, name: str) -> list[int]:
        """The shape of tensor ``name`` (from the file headers; no data read)."""
        return list(self._lookup(name)[0])

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name`` (from the file headers; no data read)."""
        return self._lookup(name)[1]

    def _lookup(self, name: str) -> tuple[list[int], torch.dtype]:
        try:
            return self._info[name]
        except KeyError:
            raise EvomergeError(f"tensor {name!r} not found in model {self.path}") from None

    def get(self, name: str, device: str | torch.device = "cpu",
            dtype: str | torch.dtype | None = None, *, copy: bool = True) -> torch.Tensor:
        """One tensor, read from its file, moved to ``device`` and cast to ``dtype`` if given.

        By default the result is a tensor of its own, read with one ``pread`` from the page cache straight into
        a fresh buffer: the safetensors library hands out views of one copy-on-write mapping per file, so an
        in-place change to such a view would silently alter every later read of that tensor, and every page
        touched through the mapping stays in the process's resident memory while the file is open (a merge
        would end up "holding" every source model). ``copy=False`` returns the zero-copy memory-mapped view
        (``safe_open``) for callers that only read it.
        """
        shape, stored_dtype = self._lookup(name)
        file = self._where[name]
        if self.format == "pickle":
            tensor = self._load_pickle(file)[name]
        elif copy:
            tensor = self._pread(name, file, shape, stored_dtype)
            dtype = parse_dtype(dtype)
            if dtype is not None and tensor.dtype != dtype:
                return tensor.to(device=device, dtype=dtype)
            return tensor.to(device=device)
        else:
            handle = self._handles.get(file)
            if handle is None:
                try:
                    handle = safe_open(str(file), framework="pt", device="cpu")
                except Exception as exc:  # noqa: BLE001
                    raise EvomergeError(f"cannot open safetensors file {file}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
                self._handles[file] = handle
            tensor = handle.get_tensor(name)
        dtype = parse_dtype(dtype)
        if dtype is not None and tensor.dtype != dtype:
            result = tensor.to(device=device, dtype=dtype)
        else:
            result = tensor.to(device=device)
        if copy and result.data_ptr() == tensor.data_ptr() and tensor.numel():
            result = result.clone()
        return result

    def _pread(self, name: str, file: Path, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            except OSError as exc:
                raise EvomergeError(f"cannot read safetensors file {file}: {exc.strerror or exc}") from None
        tensor = torch.empty(shape, dtype=dtype)
        if not tensor.numel():
            return tensor
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy().data).cast("B")
        offset, done = self._offsets[name], 0
        while done < len(buffer):
            count = os.preadv(fd, [buffer[done:done + (1 << 30)]], offset + done)
            if count <= 0:
                raise EvomergeError(f"safetensors file {file} ended early while reading {name!r} "
                                    "(was it changed after it was opened?)")
            done += count
        return tensor

    def tensors(self, device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, in file order, one at a time."""
        for name in self.tensor_names:
            yield name, self.get(name, device=device, dtype=dtype)

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files present in the folder (``TOKENIZER_FILES`` order)."""
        return find_tokenizer_files(self.path)

    @property
    def num_layers(self) -> int:
        """Decoder layer count: from config.json, else counted from the tensor names."""
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            value = self.config.get(key)
            if isinstance(value, int):
                return value
        text_config = self.config.get("text_config")
        if isinstance(text_config, dict) and isinstance(text_config.get("num_hidden_layers"), int):
            return text_config["num_hidden_layers"]
        return _count_layers(self.tensor_names) or 0

    def close(self) -> None:
        """Release open files and mappings (the Checkpoint reopens them if used again)."""
        self._handles.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            for fd in getattr(self, "_fds", {}).values():
                os.close(fd)
        except OSError:
            pass


def _count_layers(names: Iterable[str]) -> int | None:
    indices = {int(m.group(1)) for m in map(_LAYER_NAME.match, names) if m}
    return max(indices) + 1 if indices else None


# --------------------------------------------------------------------------------------------------- writing


class _ShardWriter:
    """Streams tensors into safetensors shards holding only one tensor in memory at a time.

    A safetensors file starts with its header, which is only known once the shard is full. So each shard file is
    opened with room reserved for the header (blank-padded JSON is valid safetensors: the format allows trailing
    spaces in the header) and tensor bytes are written after that room as they arrive; when the shard closes its
    header is written into the room. In the rare case where the header outgrows the room (a shard of very many
    small tensors), the shard is rewritten with a header of the right size by an in-kernel copy of its data.
    """

    def __init__(self, folder: Path, max_shard_bytes: int, dtype: torch.dtype | None):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        # Room for the header: ~100-200 bytes per tensor; 64 KiB fits hundreds of tensors per (large) shard.
        self.header_room = max(1024, min(64 * 1024, max_shard_bytes // 64)) // 8 * 8
        self.shards: list[Path] = []  # finished shard files (temporary names)
        self.weight_map: dict[str, int] = {}  # tensor name -> shard number
        self.bytes_by_dtype: dict[torch.dtype, int] = {}
        self.total_bytes = 0
        self.layer_indices: set[int] = set()
        self._header: dict[str, dict[str, Any]] = {}
        self._file: BinaryIO | None = None  # the shard being written
        self._data_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor to the current shard (a new shard starts when it would pass the limit)."""
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"write_checkpoint expects (name: str, tensor: torch.Tensor) pairs, got {type(name)}, "
                            f"{type(tensor)}")
        if name in self.weight_map or name in self._header:
            raise ValueError(f"tensor {name!r} given twice")
        if tensor.dtype not in _TORCH_TO_ST:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        tensor = tensor.detach()
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._header and self._data_bytes + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._file is None:
            self._file = open(self.folder / f".shard-{len(self.shards):05d}.safetensors", "wb")
            self._file.seek(8 + self.header_room)
        file = self._file
        if nbytes:
            file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self._header[name] = {"dtype": _TORCH_TO_ST[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self._data_bytes, self._data_bytes + nbytes]}
        self._data_bytes += nbytes
        self.total_bytes += nbytes
        if tensor.is_floating_point():
            self.bytes_by_dtype[tensor.dtype] = self.bytes_by_dtype.get(tensor.dtype, 0) + nbytes
        match = _LAYER_NAME.match(name)
        if match:
            self.layer_indices.add(int(match.group(1)))

    def _close_shard(self) -> None:
        header = dict(self._header)
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        file = self._file
        assert file is not None, "a shard is open while it has tensors"
        path = Path(file.name)
        if len(raw) <= self.header_room:
            file.seek(0)
            file.write(struct.pack("<Q", self.header_room) + raw.ljust(self.header_room, b" "))
            file.close()
        else:
            file.close()
            raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the safetensors library does
            roomy = path.with_suffix(".roomy")
            path.rename(roomy)
            with open(roomy, "rb") as src, open(path, "wb") as dst:
                dst.write(struct.pack("<Q", len(raw)) + raw)
                dst.flush()
                src.seek(8 + self.header_room)
                _append_file(src, dst, self._data_bytes)
            roomy.unlink()
        self._file = None
        number = len(self.shards)
        self.shards.append(path)
        for tensor_name in self._header:
            self.weight_map[tensor_name] = number
        self._header = {}
        self._data_bytes = 0

    def finish(self) -> dict[str, str] | None:
        """Close the last shard and give shards their final names; returns the index weight_map (None if one file)."""
        if self._file is not None:
            self._close_shard()
        if not self.shards:
            raise ValueError("write_checkpoint got no tensors")
        count = len(self.shards)
        names = ([SAFETENSORS_SINGLE] if count == 1
                 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        for path, final in zip(self.shards, names):
            path.rename(self.folder / final)
        if count == 1:
            return None
        return {name: names[number] for name, number in self.weight_map.items()}

    def abort(self) -> None:
        """Close the open shard file, if any (the temporary folder is removed by the caller)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _append_file(src, dst, count: int) -> None:
    """Append ``count`` bytes of ``src`` to ``dst`` at their current offsets, in the kernel where possible."""
    src_fd, dst_fd = src.fileno(), dst.fileno()
    remaining = count
    copy_range = getattr(os, "copy_file_range", None)
    while remaining and copy_range is not None:
        try:
            done = copy_range(src_fd, dst_fd, min(remaining, 1 << 30))
        except OSError:  # not supported here (e.g. across file systems): copy the rest through a buffer
            break
        if done == 0:
            break
        remaining -= done
    while remaining:
        chunk = os.read(src_fd, min(remaining, 16 << 20))
        if not chunk:
            raise OSError(f"{src.name} is shorter than expected")
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view):]
        remaining -= len(chunk)


def model_card(recipe_yaml: str, sources: list[str], method: str) -> str:
    """README.md for a merged model: a YAML header (library_name, tags, base_model), the sources, method, recipe."""
    front = {"library_name": "transformers", "tags": ["evomerge", "merge"]}
    if sources:
        front["base_model"] = list(sources)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             "# Merged model", "",
             f"This model was made with evomerge using the **{method}** merge method.", "",
             "## Source models", ""]
    lines += [f"- {source}" for source in sources] or ["- (none)"]
    lines += ["", "## Recipe", "", "The recipe (mergekit-compatible YAML, also saved as `recipe.yaml`):", "",
              "```yaml", recipe_yaml.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def write_checkpoint(out_dir: str | Path, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     config: Mapping[str, Any], *, tokenizer_dir: str | Path | None = None,
                     recipe_yaml: str | None = None, model_card: str | None = None,
                     max_shard_size: str | int = "2GB", overwrite: bool = False,
                     dtype: str | torch.dtype | None = None, generation_config: str | Path | None = None) -> Path:
    """Write a Hugging Face checkpoint folder atomically; returns ``out_dir``.

    ``tensors`` is a dict or an iterable of (name, tensor), consumed once and streamed to disk (one tensor in
    memory at a time). Writes ``model.safetensors`` or shards + ``model.safetensors.index.json``,
    ``config.json`` (``dtype`` set from the floating tensors written, ``num_hidden_layers`` / ``n_layer`` from
    the block names (``model.layers.N.``, ``transformer.h.N.``, ...) when they disagree, e.g. after stacking
    layers; everything else as given), the tokenizer files of ``tokenizer_dir`` (chat template included), a copy
    of the ``generation_config`` file (``generation_config.json``: EOS ids, decoding defaults), ``recipe.yaml``
    and ``README.md``. ``dtype`` casts floating tensors. When the config names an architecture transformers
    knows, the tensors written must be exactly the ones transformers expects for the written config
    (``tensor_sets.check_written_tensors``): a missing or extra tensor is an ``EvomergeError`` and nothing is
    written. All of it goes to a temporary folder next to ``out_dir`` first: on any exception the temporary
    folder is removed and ``out_dir`` is untouched; an existing ``out_dir`` is an error unless ``overwrite``,
    and is then replaced only after the new folder is complete.
    """
    out_dir = Path(out_dir)
    cast = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    if out_dir.exists() and not overwrite:
        raise EvomergeError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise EvomergeError(f"output path {out_dir} exists and is not a folder")
    tokenizer_files = find_tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    if tokenizer_dir is not None and not tokenizer_files:
        raise EvomergeError(f"no tokenizer files in {tokenizer_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    writer = _ShardWriter(tmp, max_bytes, cast)
    try:
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        for name, tensor in items:
            writer.add(name, tensor)
        weight_map = writer.finish()
        if weight_map is not None:
            index = {"metadata": {"total_size": writer.total_bytes}, "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        out_config = _output_config(config, writer)
        check_written_tensors(writer.weight_map, out_config, out_dir)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if generation_config is not None:
            shutil.copyfile(generation_config, tmp / GENERATION_CONFIG)
        for file in tokenizer_files:
            shutil.copyfile(file, tmp / file.name)
        if recipe_yaml is not None:
            (tmp / "recipe.yaml").write_text(recipe_yaml if recipe_yaml.endswith("\n") else recipe_yaml + "\n",
                                             encoding="utf-8")
        if model_card is not None:
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _output_config(config: Mapping[str, Any], writer: _ShardWriter) -> dict[str, Any]:
    out = json.loads(json.dumps(dict(config)))  # a deep copy that is also known to be JSON-serialisable
    if writer.bytes_by_dtype:
        name = dtype_name(max(writer.bytes_by_dtype, key=lambda dtype: writer.bytes_by_dtype[dtype]))
        out["dtype"] = name
        if "torch_dtype" in out:
            out["torch_dtype"] = name
    key = next((k for k in NUM_LAYERS_KEYS if isinstance(out.get(k), int)), None)
    if writer.layer_indices and key is not None:
        layers = max(writer.layer_indices) + 1
        if out[key] != layers:
            out[key] = layers
            layer_types = out.get("layer_types")
            if isinstance(layer_types, list) and layer_types and len(set(layer_types)) == 1:
                out["layer_types"] = [layer_types[0]] * layers
    return out


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder to ``out_dir``; an old ``out_dir`` is removed only afterwards."""
    if not out_dir.exists():
        try:
            tmp.rename(out_dir)
            return
        except OSError:
            if not out_dir.exists():
                raise
    if not overwrite:
        raise EvomergeError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_architecture(path: str | Path) -> Architecture:
    """The architecture (evomerge/architecture.py) of the checkpoint folder ``path``.

    Args:
        path: a Hugging Face checkpoint folder; its config.json and safetensors headers are read, no tensor.

    Returns:
        Where its blocks, embeddings, final norm and head are (``Architecture``).

    Raises:
        EvomergeError: the folder cannot be opened as a checkpoint.
    """
    ckpt = Checkpoint(path)
    try:
        return resolve(ckpt.config, ckpt.tensor_names, ckpt.num_layers)
    finally:
        ckpt.close()
