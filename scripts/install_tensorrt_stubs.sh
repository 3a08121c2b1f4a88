#!/usr/bin/env bash
# Install TensorRT type stubs so that mypy checks dff-trt's TensorRT calls (DESIGN.md §4).
#
#   scripts/install_tensorrt_stubs.sh            # into the `python3` on PATH
#   PYTHON=.venv/bin/python scripts/install_tensorrt_stubs.sh
#
# tensorrt-stubs needs three fixes before mypy can use it:
#   1. install it with --no-deps (it requires the `tensorrt` sdist, which needs NVIDIA's libraries);
#   2. rename its `tensorrt/` and `tensorrt_bindings/` folders to `tensorrt-stubs/` and
#      `tensorrt_bindings-stubs/` (PEP 561 stub packages). Left as they are, mypy ignores them
#      (no py.typed), and `import tensorrt` succeeds at run time as an empty namespace package;
#   3. fix five syntax errors in tensorrt_bindings/tensorrt.pyi: four parameters named `in`, and
#      add_scale_nd's `channel_axis` without a default after defaulted parameters.
# A real TensorRT `tensorrt/` package (one with __init__.py) is never touched. Running the script
# again is harmless: it installs only what is missing and repeats the checks.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VERSION="${TENSORRT_STUBS_VERSION:-10.13.0.35.1}"

SITE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
installed="$("$PYTHON" -c 'import importlib.metadata as m
try: print(m.version("tensorrt-stubs"))
except m.PackageNotFoundError: pass')"
if [[ "$installed" == "$VERSION" && -d "$SITE/tensorrt_bindings-stubs" && ! -d "$SITE/tensorrt_bindings" ]]; then
    echo "tensorrt-stubs $VERSION already installed; checking the renames and patches"
else
    "$PYTHON" -m pip install -q --no-deps --force-reinstall "tensorrt-stubs==${VERSION}"
fi

"$PYTHON" - <<'EOF'
"""Steps 2 and 3: rename the stub folders to PEP 561 names, then patch the .pyi syntax."""
import ast
import re
import shutil
import sys
import sysconfig
from pathlib import Path

site = Path(sysconfig.get_paths()["purelib"])
renames = {"tensorrt": "tensorrt-stubs", "tensorrt_bindings": "tensorrt_bindings-stubs"}

for old, new in renames.items():
    src, dst = site / old, site / new
    if not src.is_dir():
        continue
    if (src / "__init__.py").exists() or any(src.glob("*.so")):
        print(f"{src}: a real TensorRT package, left as it is")
        continue
    if dst.exists():
        shutil.rmtree(dst)
    src.rename(dst)
    print(f"renamed {src.name}/ -> {dst.name}/")

# Keep `pip uninstall tensorrt-stubs` able to find the renamed files.
records = sorted(site.glob("tensorrt_stubs-*.dist-info/RECORD"))
lines = records[-1].read_text().splitlines() if records else []
fixed = []
for line in lines:
    for old, new in renames.items():
        if line.startswith(old + "/") and (site / new / line[len(old) + 1:].split(",")[0]).exists():
            line = new + line[len(old):]
    fixed.append(line)
if records:
    records[-1].write_text("\n".join(fixed) + "\n")

pyi = site / "tensorrt_bindings-stubs" / "tensorrt.pyi"
if not pyi.is_file():
    sys.exit(f"{pyi}: missing after the rename; is this the tensorrt-stubs wheel the script expects?")
text = pyi.read_text(encoding="utf-8")
# `in` is a keyword: rename the parameter (positional use is unaffected).
text, n_in = re.subn(r"(?<=[(,])(\s*)in(\s*:)", r"\1in_\2", text)
# a parameter without a default may not follow defaulted ones: give channel_axis a default.
text, n_axis = re.subn(r"(def add_scale_nd\([^)]*?channel_axis\s*:\s*int)(\s*\))", r"\1 = ...\2",
                       text)
pyi.write_text(text, encoding="utf-8")
print(f"patched {pyi.name}: {n_in} parameter(s) named `in`, {n_axis} add_scale_nd default(s)")

bad = []
for stub in sorted((site / "tensorrt-stubs").rglob("*.pyi")) + sorted(
        (site / "tensorrt_bindings-stubs").rglob("*.pyi")):
    try:
        ast.parse(stub.read_text(encoding="utf-8"), str(stub))
    except SyntaxError as e:
        bad.append(f"{stub}:{e.lineno}: {e.msg}")
if bad:
    sys.exit("stubs still have syntax errors:\n  " + "\n  ".join(bad))
print(f"TensorRT stubs ready for mypy in {site}")
EOF
