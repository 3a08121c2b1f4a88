"""The README's `python -m` forms of the commands still run dff.commands' mains, with the same
usage line, output and exit code; and the library keeps the layering of DESIGN.md §12 (no
argparse or dff.commands in it, no private names imported across modules, no import cycles)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the library's packages (pyproject's package-dir): folder -> dotted name
PACKAGES = {"dff": "dff", "models": "dff.models", "data": "dff.data", "export": "dff.export",
            "engines": "dff.engines", "runtime": "dff.runtime", "plugins": "dff.plugins",
            "serve": "dff.serve"}


@pytest.mark.parametrize("module, argv, code, start", [
    ("dff.models.quality", ["--help"], 0, "usage: python -m dff.models.quality"),
    ("dff.models.quality", [], 2, "usage: python -m dff.models.quality"),
    ("dff.serve.scaleout", ["127.0.0.1"], 1, "dff.serve.scaleout: error: server '127.0.0.1'"),
    ("dff.serve.scaleout", ["10.0.0.1:8001"], 0, "# nginx in front of 1 Triton server(s)"),
    ("dff.models.pretrain_flow", ["--help"], 0, "usage: python -m dff.models.pretrain_flow"),
])
def test_documented_module_commands_run_the_command_layer(module, argv, code, start):
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == code, proc.stderr
    assert (proc.stdout or proc.stderr).startswith(start)


def test_pretraining_without_the_fetched_clips_stops_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dff.models.pretrain_flow", "--out",
                           str(tmp_path / "w.pth"), "--minutes", "0.01"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "DFF_CACHE": str(tmp_path / "empty")})
    assert proc.returncode == 1, proc.stderr
    line = (f"python -m dff.models.pretrain_flow: bikes.mp4 is not in {tmp_path / 'empty'}: "
            "run python scripts/fetch_material.py --small")
    assert proc.stderr.splitlines() == [line]
    assert not list(tmp_path.glob("w.pth*"))



def test_pretraining_stopped_with_ctrl_c_says_what_it_left(tmp_path):
    """SIGINT once the progress bar shows: exit 130, one line, no weights written."""
    # Python ignores SIGINT when it starts with SIGINT ignored (a background CI job): the
    # child puts Python's own handler back, then runs the module as `python -m` does
    run = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "sys.argv[0] = 'dff.models.pretrain_flow'; "
           "runpy.run_module('dff.models.pretrain_flow', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", run, "--out", str(tmp_path / "w.pth"),
                             "--minutes", "5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "%|" not in seen:  # tqdm's bar: training has started
        char = proc.stderr.read(1)
        assert char, f"pretraining ended before its progress bar: {seen[-500:]}"
        seen += char
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest[-500:]
    lines = [line for line in rest.splitlines() if "interrupted" in line]
    line = (f"python -m dff.models.pretrain_flow: interrupted (Ctrl-C); {tmp_path / 'w.pth'} "
            "not written; no checkpoint yet (the first is saved after a minute)")
    assert lines == [line]
    assert not (tmp_path / "w.pth").exists()

def _library() -> dict[str, tuple[Path, ast.Module]]:
    """Every library module by dotted name, parsed (dff/commands is the command layer)."""
    found = {}
    for folder, package in PACKAGES.items():
        for file in sorted((ROOT / folder).rglob("*.py")):
            parts = file.relative_to(ROOT / folder).with_suffix("").parts
            if parts[0] == "commands" and folder == "dff":
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = (file, ast.parse(file.read_text(), str(file)))
    return found


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports a module runs when imported: outside functions and `if` blocks (TYPE_CHECKING,
    `__main__`)."""
    return [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_the_library_keeps_the_command_layers_rules():
    library = _library()
    broken = []
    for file, tree in library.values():
        where = file.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                broken += [f"{where}:{node.lineno} imports argparse" for a in node.names
                           if a.name == "argparse"]
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dff"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    broken.append(f"{where}:{node.lineno} imports {private} from {node.module}")
        for node in _top_level_imports(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""])
            broken += [f"{where}:{node.lineno} imports {m} when imported" for m in modules
                       if m.startswith("dff.commands")]
    assert not broken, "\n".join(broken)


def test_the_library_has_no_import_cycles():
    library = _library()
    edges: dict[str, set[str]] = {}
    for name, (_, tree) in library.items():
        targets = set()
        for node in _top_level_imports(tree):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif node.module:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in library
                            else node.module for a in node.names}
        edges[name] = {t for t in targets if t in library and t != name}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [module, target] if target in path \
                    else [module, target]
            if target not in state:
                found = cycle_from(target, path + [module])
                if found:
                    return found
        state[module] = 2
        return None

    for module in sorted(library):
        if module not in state:
            found = cycle_from(module, [])
            assert found is None, " -> ".join(found)
