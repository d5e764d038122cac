"""Start `evomerge` command lines as forks of one process that has already imported the heavy modules.

A test that kills and resumes many `evomerge run` processes would otherwise pay Python's import of torch,
transformers, Ray and Optuna for each (seconds each on a CI machine). This server imports them once and, for
each JSON argv read on stdin, forks a child that runs ``evomerge.cli.main(argv)`` in a new session (stderr to
the file named with it) and exits with its code; it answers the child's pid on stdout. It never starts Ray or a
thread pool itself, so a fork starts as clean as a new interpreter; children are reaped automatically
(SIGCHLD ignored), so a dead child leaves no /proc entry behind.

    server = ForkServer(); pid = server.run(["run", "exp.yaml", "--out", "run"], "part.log"); server.close()
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback


class ForkServer:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, argv: list[str], log: str) -> int:
        """Start ``evomerge ARGV``; returns its pid."""
        self.proc.stdin.write(json.dumps({"argv": argv, "log": log}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _serve() -> None:
    # the imports every child needs, done once here
    import optuna  # noqa: F401
    import ray  # noqa: F401
    import transformers  # noqa: F401

    import evomerge.cli
    import evomerge.commands.run  # noqa: F401
    import evomerge.search.launch  # noqa: F401
    import evomerge.search.worker  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 2)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 1
            try:
                code = evomerge.cli.main(request["argv"])
            except BaseException:  # os._exit below would swallow it: a crash must show in the log
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)


if __name__ == "__main__":
    _serve()
