"""Source folders shipped through Ray's object store, copied to each node once (``workers.sources: object_store``).

For clusters without a shared disk the driver puts every source folder in Ray's object store as one object,
{relative path: bytes} (``ray_runtime.put_source_blobs``); no worker ever opens the driver's paths. On a
worker's node the first worker that needs a folder takes the folder's lock, fetches the object (Ray moves its
bytes to this node once), writes the files under the node's temporary directory and marks the copy done; the
node's other workers, and the replacements of dead ones, wait on the lock and load the same copy. Every fetch
appends one line to the node's ``fetches.jsonl`` (object id, the driver's folder, bytes, pid): the record of
what crossed the network to this node, kept for the operator and read by the cluster tests.

Copies live in ``$TMPDIR/evomerge-sources-NODE/`` (``NODE``: the first 16 hex digits of the Ray node id), on the
node's own disk, each named by its object's id: one copy per source folder per stage of a driver (a resumed
driver puts its sources again, under new ids), so two runs on one node never share a copy. When a stage's search
ends (budget or wall time spent), one worker per node removes that stage's copies (``drop_node_copies``, under
each copy's lock); the fetch log stays. A run stopped otherwise (Ctrl-C, an error, a killed driver or node)
leaves its copies, as may a replacement worker still fetching when the stage ended: they go with the node's
other temporary files.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray

FETCH_LOG = "fetches.jsonl"


def node_cache(node: str) -> Path:
    """This node's folder of source copies.

    Args:
        node: the Ray node id (hex) of the node the caller runs on.
    """
    return Path(tempfile.gettempdir()) / f"evomerge-sources-{node[:16]}"


def node_source_copy(source: str, ref: Any, node: str) -> Path:
    """The local copy of the source folder ``source`` on this node, fetched and written by the first caller.

    Args:
        source: the folder's path on the driver (a key only: never opened here).
        ref: the Ray object ref of its files, {relative path: bytes}.
        node: this node's Ray node id.

    Returns:
        The local folder, complete (every file of the driver's folder, byte for byte).
    """
    root = node_cache(node)
    root.mkdir(parents=True, exist_ok=True)
    key = str(ref.hex())
    folder, done = root / key, root / f"{key}.done"
    with open(root / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, or when its process dies
        if done.exists():
            return folder
        _write_folder(folder, ray.get(ref))
        done.touch()
        line = {"object": key, "source": source, "bytes": sum(f.stat().st_size for f in folder.rglob("*")
                                                             if f.is_file()), "pid": os.getpid()}
        with open(root / FETCH_LOG, "a") as log:
            log.write(json.dumps(line) + "\n")
    return folder


def _write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Write {relative path: bytes} into ``folder`` (anything a killed worker left there is replaced)."""
    for rel, data in files.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def drop_node_copies(keys: list[str], node: str) -> int:
    """Remove this node's copies of the objects ``keys`` (their folders, done markers and locks), each under its
    lock, so that a worker of the same stage still loading it finishes first.

    Args:
        keys: the object ids (hex) of the source folders (``ref.hex()``).
        node: this node's Ray node id.

    Returns:
        How many copies were removed.
    """
    root = node_cache(node)
    removed = 0
    for key in keys:
        lock_path = root / f"{key}.lock"
        if not lock_path.exists():
            continue
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            shutil.rmtree(root / key, ignore_errors=True)
            (root / f"{key}.done").unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
        removed += 1
    return removed

