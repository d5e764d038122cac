"""Source folders shipped through Ray's object store, copied to each node once (``workers.sources: object_store``).

For clusters without a shared disk the driver puts every source folder in Ray's object store as one object,
{relative path: bytes} (``ray_runtime.put_source_blobs``); no worker ever opens the driver's paths. On a
worker's node the first worker that needs a folder takes the folder's lock, fetches the object (Ray moves its
bytes to this node once), writes the files under the node's temporary directory and marks the copy done; the
node's other workers, and the replacements of dead ones, wait on the lock and load the same copy. Every fetch
appends one line to the node's ``fetches.jsonl`` (object id, the driver's folder, bytes, pid): the record of
what crossed the network to this node, kept for the operator and read by the cluster tests.

Copies live in ``$TMPDIR/evomerge-sources-NODE/`` (``NODE``: the first 16 hex digits of the Ray node id), on the
node's own disk; one copy per source folder per driver (a resumed driver puts its sources again). They are
not removed by the run (a worker killed with its node cannot clean up): remove them with the node's other
temporary files.
"""

from __future__ import annotations

import fcntl
import json
import os
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
