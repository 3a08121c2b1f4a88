"""The install is reproducible: .ci/run and the README's quick start install with the same
constraints file, which pins exact versions of packages the project really depends on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+ (as constraints.txt)")

ROOT = Path(__file__).resolve().parents[1]
# what the pinned packages come with, beside the project's own requirements
TRANSITIVE = {"onnx-ir": "onnxscript", "cuda-bindings": "cuda-python", "filterpy": "norfair"}


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def project_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("dff-trt")]
    return {canonicalize_name(r.name): r for r in reqs}


def test_every_pin_is_exact_and_of_a_package_the_project_uses():
    wanted = project_requirements()
    for name, spec in pins().items():
        assert re.fullmatch(r"==[0-9][0-9A-Za-z.]*", spec), f"{name}{spec}: pin exact versions"
        owner = TRANSITIVE.get(name, name)
        assert owner in wanted, f"{name} is pinned but nothing in pyproject.toml needs it"
        if owner == name:  # the pin must lie in the project's own range
            assert wanted[name].specifier.contains(spec[2:]), (name, spec, wanted[name])


def test_the_nvrtc_pin_is_cuda_13_0_whose_ptx_every_cuda_13_driver_loads():
    assert pins()["nvidia-cuda-nvrtc"].startswith("==13.0.")


def test_ci_and_the_readme_install_with_the_constraints_and_run_the_readme_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start"):readme.index("## Commands")]
    commands = re.findall(r"^(?!#)(.+)$", quick_start.split("```bash")[1].split("```")[0], re.MULTILINE)
    install, tests = commands
    assert "-c constraints.txt" in install and "torch==2.13.0" in install
    assert re.search(r"pip install -q -c constraints\.txt -e \"\.\[dev", ci)
    assert ci.splitlines()[-1].replace("python3 ", "python ") == tests.strip()
