"""The README's `python -m` forms of the commands still run dff.commands' mains, with the same
usage line, output and exit code."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module, argv, code, start", [
    ("dff.models.quality", ["--help"], 0, "usage: python -m dff.models.quality"),
    ("dff.models.quality", [], 2, "usage: python -m dff.models.quality"),
    ("dff.serve.scaleout", ["127.0.0.1"], 1, "dff.serve.scaleout: error: server '127.0.0.1'"),
    ("dff.serve.scaleout", ["10.0.0.1:8001"], 0, "# nginx in front of 1 Triton server(s)"),
])
def test_documented_module_commands_run_the_command_layer(module, argv, code, start):
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == code, proc.stderr
    assert (proc.stdout or proc.stderr).startswith(start)
