import subprocess
import sys

from evomerge.commands import COMMANDS


def test_every_command_has_help():
    for name in COMMANDS:
        out = subprocess.run([sys.executable, "-m", "evomerge.cli", name, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "usage: evomerge " + name in out.stdout
