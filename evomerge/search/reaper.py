"""A watchdog for the embedded Ray of one `evomerge run`: if the driver is killed (kill -9), end what is left.

Ray ends its GCS and raylet with the driver that started them, but some per-node agents (the dashboard and
runtime-env agents) can outlive a SIGKILLed driver as orphans. The driver starts this tiny process in its own
session right after starting Ray; it polls the driver's pid, and once the driver is gone it SIGKILLs every
process that still holds a file of THAT Ray session's folder (nothing else: other Ray clusters on the machine
are untouched). After a normal exit Ray has already stopped everything and there is nothing to kill.

    python -m evomerge.search.reaper DRIVER_PID SESSION_DIR
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def session_processes(session_dir: str) -> list[int]:
    """Pids of processes with an open file (log, socket path) inside ``session_dir``."""
    me = os.getpid()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd).startswith(session_dir):
                    found.append(int(proc.name))
                    break
            except OSError:
                continue
    return found


def main(argv: list[str]) -> int:
    """``python -m evomerge.search.reaper DRIVER_PID SESSION_DIR``: wait for the driver to go, then kill what is
    left of its Ray session. Returns the exit code 0."""
    driver, session_dir = int(argv[0]), os.path.realpath(argv[1])
    if not Path("/proc").is_dir():
        return 0
    while _alive(driver):
        time.sleep(1.0)
    time.sleep(2.0)  # let Ray's own fate-sharing go first
    for pid in session_processes(session_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
