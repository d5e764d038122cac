"""C++ kernels compiled on first use and cached without locks (the fused TIES merge, decode attention).

A kernel is C++ source built with torch's extension builder (a C++ compiler and ninja are needed). Each build
happens in a private temporary folder and its library is renamed into the cache (atomic; concurrent builders
produce the same file): ``~/.cache/evomerge/kernels``, or ``$EVOMERGE_CACHE/kernels``. Later processes import
the cached file directly.

Why not torch's own loader: it takes a lock file in a shared build folder on every load, and a process killed
while holding it (kill -9 of a search worker) makes every later load wait forever.

Every kernel has a torch fallback in its caller. Where a kernel cannot be built, or with
``EVOMERGE_FUSED_KERNELS=0``, the fallback runs and no compile is attempted.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$EVOMERGE_CACHE/kernels`` (default ``~/.cache/evomerge/kernels``)."""
    root = os.environ.get("EVOMERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "evomerge")
    return Path(root) / "kernels"


def enabled() -> bool:
    """False when the user switched compiled kernels off (``EVOMERGE_FUSED_KERNELS=0``)."""
    return os.environ.get("EVOMERGE_FUSED_KERNELS", "1") != "0"


AVX512_FLAGS = ["-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]


def simd_flags(avx512: bool = False) -> tuple[str, list[str]]:
    """A build tag and flags for 8-wide AVX2 where torch reports AVX2/AVX512, else the baseline instruction set;
    with ``avx512``, an AVX-512 build where torch runs AVX-512 kernels (tag ``avx512``). The tag goes into the
    library's name, so cluster nodes sharing a home folder each get a build they can run."""
    capability = torch.backends.cpu.get_cpu_capability()
    if avx512 and capability == "AVX512":
        return "avx512", list(AVX512_FLAGS)
    if capability in ("AVX2", "AVX512"):
        return "avx2", ["-mavx2"]
    return "base", []


def _import_shared_object(name: str, path: Path):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    if spec is None:
        raise ImportError(f"cannot load the compiled kernel {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class Kernel:
    """One C++ extension module: ``load()`` returns it (imported from the cache or built now), or None."""

    def __init__(self, name: str, source: str, flags: list[str], what: str) -> None:
        self.name, self.source, self.flags, self.what = name, source, list(flags), what
        self._lock = threading.Lock()
        self._module = None
        self._failed = False

    def load(self):
        """The compiled module (built on first use, then imported from the cache), or None where it cannot be built."""
        if self._module is not None or self._failed:
            return self._module
        with self._lock:
            if self._module is not None or self._failed:
                return self._module
            if not enabled():
                self._failed = True
                return None
            try:
                self._module = self._build_or_import()
            except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, ...: the caller's torch path runs
                log.warning("%s unavailable (%s); using the torch fallback", self.what,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self._failed = True
        return self._module

    def available(self) -> bool:
        """Whether the kernel loads on this machine."""
        return self.load() is not None

    def _build_or_import(self):
        key = hashlib.sha256("\0".join([self.source, *self.flags, torch.__version__, sys.version]).encode())
        cache = cache_dir()
        target = cache / f"{self.name}-{key.hexdigest()[:16]}.so"
        if target.is_file():
            return _import_shared_object(self.name, target)
        from torch.utils.cpp_extension import load_inline  # deferred: pulls in setuptools; only a first build needs it

        cache.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f"{self.name}-build-", dir=cache))
        try:
            # a one-time pause of about half a minute: say so (the library logs nothing else at info level)
            print(f"evomerge: compiling {self.what} (once per machine, about 30 s)", file=sys.stderr, flush=True)
            module = load_inline(name=self.name, cpp_sources=[self.source], functions=None, verbose=False,
                                 extra_cflags=self.flags, build_directory=str(build))
            built = next(build.glob(f"{self.name}*.so"))
            staged = cache / f".{target.name}.{os.getpid()}"
            shutil.copyfile(built, staged)
            os.replace(staged, target)
            return module
        finally:
            shutil.rmtree(build, ignore_errors=True)
