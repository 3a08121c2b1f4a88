"""The FlowWarp GPU checks in one command, for a machine with a GPU (not collected by pytest).

    python tests/gpu_checks.py [--out DIR] [--quick]

Prints what the machine has (GPU, driver, torch, cuda-python, NVRTC, nvcc, TensorRT), runs
the GPU-parametrised tests (kernel, plugin, buffers, TensorRT backend; skips listed with their
reasons), benchmarks/bench_flow_warp.py (fewer samples with --quick), and dff-profile on the
shipped model with every GPU backend this machine has (onnxruntime-cuda needs onnxruntime-gpu,
torch-cuda), whose end-to-end rows give the runtime efficiency. Writes environment.json,
pytest.xml, bench.json and profile-BACKEND.json to DIR ($OUT if set, else ./gpu_checks).
Exit status: 2 without a CUDA device, else the first failing step's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def environment() -> dict:
    """Versions of everything the GPU path uses; a missing piece shows as its error."""
    env: dict = {"python": sys.version.split()[0], "nvcc": shutil.which("nvcc")}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        if env["gpu"]:
            env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except ImportError as e:
        env["torch"] = f"missing: {e}"
    try:
        from cuda.bindings import driver

        driver.cuInit(0)
        _, version = driver.cuDriverGetVersion()
        env["driver_cuda"] = f"{version // 1000}.{version % 1000 // 10}"
    except (ImportError, RuntimeError) as e:
        env["driver_cuda"] = f"unknown: {e}"
    from dff.plugins import kernel

    from dff.errors import DffError

    try:
        env["nvrtc"] = ".".join(map(str, kernel.nvrtc_version()))
    except (DffError, RuntimeError) as e:
        env["nvrtc"] = f"missing: {e}"
    try:
        import tensorrt

        env["tensorrt"] = getattr(tensorrt, "__version__", "not TensorRT (stubs?)")
    except ImportError:
        env["tensorrt"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_checks")
    p.add_argument("--quick", action="store_true", help="fewer benchmark samples")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    env = environment()
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    for key, value in env.items():
        print(f"{key:>20}: {value}")
    if not env.get("gpu"):
        print("gpu_checks: no CUDA device (torch.cuda) here: nothing to check", file=sys.stderr)
        return 2

    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", f"--junitxml={out / 'pytest.xml'}",
         "tests/test_kernel.py", "tests/test_trt_plugin.py", "tests/test_buffers.py",
         "tests/test_trt_backend.py"], cwd=ROOT, check=False)
    bench_args = ["--json", str(out / "bench.json")]
    if args.quick:
        bench_args += ["--warmUp", "5", "--iterations", "30"]
    bench = subprocess.run([sys.executable, "benchmarks/bench_flow_warp.py", *bench_args],
                           cwd=ROOT, check=False)
    profiles = [profile(kind, out, args.quick) for kind in gpu_backends()]
    return tests.returncode or bench.returncode or next((rc for rc in profiles if rc), 0)


def gpu_backends() -> list[str]:
    from dff.runtime.backends import available_backends

    return [k for k in available_backends() if not k.endswith("-cpu")]


def profile(kind: str, out: Path, quick: bool) -> int:
    """dff-profile --demo on one GPU backend; prints its table, writes profile-KIND.json."""
    cmd = [sys.executable, "-m", "dff.runtime.profile", "--demo", "--backend", kind,
           "--key-intervals", "1,10", "--json", str(out.resolve() / f"profile-{kind}.json")]
    if quick:
        cmd += ["--warmUp", "200", "--iterations", "50"]
    print("$", " ".join(cmd[1:]), flush=True)
    with tempfile.TemporaryDirectory() as work:  # the demo export, not worth bringing back
        return subprocess.run(cmd, cwd=work, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
