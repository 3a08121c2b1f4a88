"""Every GPU check in one command, sized for a lent GPU machine (not collected by pytest).

    python tests/gpu_checks.py [--quick] [--out DIR] [--engines DIR] [--plan]

Runs from a bare checkout: when `dff` is not importable it installs the checkout into a
temporary folder first. Each step is a subprocess with a timeout (a hang or a crash costs that
step only) and is skipped, with the reason, where this machine lacks what it needs. Writes
DIR/gpu_checks.json after every step (environment, then each step's name, status, reason,
seconds, figures) and logs/STEP.log. Exit status 0 when no step failed (skips are not
failures), 1 when one did. `--plan` lists the steps in order and runs nothing. The demo
models are exported once each (segmentation into --engines, detection into ENGINES-detection,
the R-FCN detection model into ENGINES-rfcn), built and profiled alike; the detection and
R-FCN steps skip while their shipped weights are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gpu_steps

ROOT = Path(__file__).resolve().parents[1]
STEPS_SCRIPT = Path(gpu_steps.__file__).resolve()
DEFAULT_ENGINES = Path(tempfile.gettempdir()) / "dff-gpu-checks" / "engines"  # 38 MB: not in --out
DETECTION_WEIGHTS = ROOT / "models" / "weights" / "dff_small_detection.pth"
RFCN_WEIGHTS = ROOT / "models" / "weights" / "dff_small_rfcn.pth"
BUDGET_S = {True: 450.0, False: 1800.0}  # whole run by --quick: 450 s leaves margin under 8 min
MIN_STEP_S = 15.0  # a step is not started with less of the budget left


@dataclass
class Step:
    """One check: a command with a timeout, what it needs here, and how to read its figures."""

    name: str
    what: str
    command: list[str]
    timeout: float
    needs: tuple[str, ...] = ()  # facts (see `probe`) that must hold on this machine
    after: tuple[str, ...] = ()  # steps that must have passed first
    output: Path | None = None  # what the command writes (removed before it runs)
    read: Callable[[], dict] | None = None  # its figures, after it ran


# --- the plan -------------------------------------------------------------------------------

def plan(out: Path, engines: Path, quick: bool, detection_engines: Path | None = None,
         rfcn_engines: Path | None = None) -> list[Step]:
    """The steps in order: kernel and buffers, one export per demo (segmentation into
    `engines`, detection into `detection_engines` and R-FCN into `rfcn_engines`, by default
    `engines`-detection and `engines`-rfcn beside it), then per backend on each folder
    (TensorRT: engines built before they are profiled). The detection steps come after the
    segmentation ones and the R-FCN steps last, so a short budget cuts them first."""
    py, gpu = sys.executable, ("gpu",)
    detection_engines = detection_engines or engines.with_name(f"{engines.name}-detection")
    rfcn_engines = rfcn_engines or engines.with_name(f"{engines.name}-rfcn")

    def own(name: str, what: str, timeout: float, needs: tuple[str, ...]) -> Step:
        path = out / f"{name}.json"
        cmd = [py, str(STEPS_SCRIPT), name, "--figures", str(path)] + ["--quick"] * quick
        return Step(name, what, cmd, timeout, needs, ("ptx",) * (name != "ptx"), path,
                    lambda: read_json(path))

    def export(folder: Path, task: str, suffix: str, needs: tuple[str, ...]) -> Step:
        return Step(f"export{suffix}", f"dff-export --demo {task}, once, into the folder every "
                    f"{task} profile uses",
                    [py, "-m", "dff.commands.export", "--demo", task, "-o", str(folder)],
                    180 if quick else 600, gpu + ("gpu_backend",) + needs,
                    read=lambda: read_engines(folder, None))

    def profile(folder: Path, suffix: str, backend: str, needs: tuple[str, ...],
                precision: str | None = None) -> Step:
        name = f"profile-{backend}" + (f"-{precision}" if precision else "") + suffix
        path = out / f"{name}.json"
        cmd = [py, "-m", "dff.commands.profile", "-e", str(folder), "--backend", backend]
        cmd += ["--precision", precision] if precision else []
        cmd += (["--warmUp", "100", "--iterations", "50", "--frames", "30", "--key-intervals",
                 "1,10"] if quick else ["--key-intervals", "1,5,10,20"])
        after = (f"export{suffix}",) + ((f"build-{precision}{suffix}",) if precision else ())
        return Step(name, f"dff-profile --backend {backend}{f' --precision {precision}' * bool(precision)} on "
                    f"the {folder.name} export",
                    cmd + ["--json", str(path)], 120 if quick else 600, gpu + needs, after,
                    path, lambda: read_profile(path))

    def build(folder: Path, suffix: str, precision: str, needs: tuple[str, ...]) -> Step:
        cmd = [py, "-m", "dff.commands.build", str(folder), f"--{precision}"]
        return Step(f"build-{precision}{suffix}", f"dff-build --{precision} on the "
                    f"{folder.name} export", cmd,
                    240 if quick else 900, gpu + needs, (f"export{suffix}",),
                    read=lambda: read_engines(folder, precision))

    def per_task(folder: Path, task: str, suffix: str, needs: tuple[str, ...]) -> list[Step]:
        return [
            export(folder, task, suffix, needs),
            profile(folder, suffix, "torch-cuda", ("torch_cuda",) + needs),
            profile(folder, suffix, "onnxruntime-cuda", ("ort_cuda",) + needs),
            build(folder, suffix, "fp32", ("tensorrt",) + needs),
            build(folder, suffix, "fp16", ("tensorrt", "fast_fp16") + needs),
            profile(folder, suffix, "tensorrt", ("tensorrt",) + needs, "fp32"),
            profile(folder, suffix, "tensorrt", ("tensorrt", "fast_fp16") + needs, "fp16"),
        ]

    buffers_xml = out / "buffers.xml"
    bench = out / "kernel-time.json"
    bench_cmd = [py, str(ROOT / "benchmarks" / "bench_flow_warp.py"), "--plugin-ptx",
                 "--json", str(bench)] + ["--warmUp", "5", "--iterations", "30"] * quick
    return [
        own("ptx", "NVRTC compiles the sm_80 PTX TensorRT embeds; on a GPU the driver loads it",
            60, ("nvrtc",)),
        own("kernel", "FlowWarp (sm_80 PTX) vs the NumPy and PyTorch references, fp32/fp16",
            120 if quick else 300, gpu),
        own("graph", "a FlowWarp launch captured into a CUDA graph, replayed, vs a direct launch",
            60, gpu),
        Step("buffers", "tests/test_buffers.py's CudaMemory cases (buffers, pool, pinned ring)",
             [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
              str(ROOT / "tests" / "test_buffers.py"), "-k", "cuda and not ort_cuda",
              f"--junitxml={buffers_xml}"], 120, gpu, (), buffers_xml,
             lambda: read_pytest(buffers_xml)),
        Step("kernel-time", "FlowWarp vs the PyTorch warp and a device copy, C=1024",
             bench_cmd, 120 if quick else 600, gpu + ("torch_cuda",), ("ptx",), bench,
             lambda: read_bench(bench)),
        *per_task(engines, "segmentation", "", ()),
        *per_task(detection_engines, "detection", "-detection", ("detection_demo",)),
        *per_task(rfcn_engines, "rfcn", "-rfcn", ("rfcn_demo",)),
    ]


def weights_fact(demo: str, path: Path) -> str | None:
    """None when the checkout ships the demo's weights at `path`, else why its steps skip."""
    if path.is_file():
        return None
    return f"no shipped {demo} weights here ({path.relative_to(ROOT)} is missing)"


def detection_demo_fact() -> str | None:
    return weights_fact("detection", DETECTION_WEIGHTS)


def rfcn_demo_fact() -> str | None:
    return weights_fact("rfcn", RFCN_WEIGHTS)


# --- reading the figures --------------------------------------------------------------------

def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_profile(path: Path) -> dict:
    """dff-profile's stage medians and end-to-end rows (fps, speedup, runtime efficiency)."""
    d = read_json(path)
    stages = {name: {"latency_ms": s["latency_ms"]["median"],
                     "gpu_compute_ms": (s.get("gpu_compute_ms") or {}).get("median")}
              for name, s in d["stages"].items()}
    rows = [{k: r[k] for k in ("key_interval", "fps", "speedup", "efficiency")}
            for r in d["end_to_end"]]
    last = rows[-1]
    return {"backend": d["backend"], "precision": d["precision"], "stage_median": stages,
            "end_to_end": rows, "headline": f"K={last['key_interval']}: {last['fps']:.0f} fps, "
            f"{last['speedup']:.2f}x, efficiency {last['efficiency']:.2f}"}


def read_bench(path: Path) -> dict:
    d = read_json(path)
    worst = min(d["results"], key=lambda r: r["bandwidth_vs_copy"])
    d["headline"] = (f"slowest vs copy: {worst['map']} {worst['dtype']} {worst['kernel_us']:.1f}"
                     f" us, {worst['speedup_vs_torch']:.1f}x torch, "
                     f"{worst['bandwidth_vs_copy']:.2f} of copy bandwidth")
    return d


def read_pytest(path: Path) -> dict:
    """Outcomes of the [cuda] cases in a JUnit XML; a GPU run must have run them all."""
    outcome: dict[str, str] = {}
    for case in ET.parse(path).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcome[case.get("name", "?")] = kinds[0] if kinds else "passed"
    cuda = {name: o for name, o in outcome.items() if name.endswith("[cuda]")}
    counts = {o: sum(v == o for v in outcome.values()) for o in set(outcome.values())}
    figures = {"counts": counts, "cuda_cases": cuda,
               "headline": f"{sum(v == 'passed' for v in cuda.values())}/{len(cuda)} CudaMemory "
                           "cases passed"}
    bad = [f"{name} {o}" for name, o in cuda.items() if o != "passed"]
    if bad or not cuda:
        figures["problems"] = [f"{len(bad)} of {len(cuda)} CudaMemory cases did not pass: "
                               + (", ".join(bad) or "none collected")]
    return figures


def read_engines(engines: Path, precision: str | None) -> dict:
    """The manifest's graphs (precision None) or its engines of `precision`."""
    manifest = read_json(engines / "manifest.json")
    if precision is None:
        return {"dir": str(engines), "graphs": sorted(manifest["graphs"]),
                "headline": f"{engines}"}
    built = {name: {k: e.get(k) for k in ("file", "bytes", "build_seconds")}
             for name, e in manifest["engines"].items() if e.get("precision") == precision}
    return {"engines": built, "headline": f"{len(built)} {precision} engines"}


# --- running it -----------------------------------------------------------------------------

def skip_reason(step: Step, facts: dict[str, str | None], done: list[dict]) -> str | None:
    """Why `step` cannot run here (every fact it needs that is missing, else the earlier step
    it needs that did not pass), or None."""
    missing = [facts[need] for need in step.needs if facts[need] is not None]
    if missing:
        return "; ".join(dict.fromkeys(missing))  # once each: fast_fp16 repeats tensorrt's
    status = {r["name"]: r["status"] for r in done}
    for name in step.after:
        if status.get(name) != "passed":
            return f"needs step {name}, which {status.get(name, 'did not run')}"
    return None


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "no output")[:300]


def execute(step: Step, out: Path, timeout: float) -> dict:
    """Run one step's command under `timeout`; its status, reason, seconds and figures."""
    log = out / "logs" / f"{step.name}.log"
    if step.output is not None:
        step.output.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1"}  # cwd never shadows
    start = time.monotonic()
    with log.open("w") as f:
        try:
            rc: int | None = subprocess.run(step.command, check=False, stdout=f,
                                            stderr=subprocess.STDOUT, cwd=out, env=env,
                                            timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.monotonic() - start, 2)
    figures: dict = {}
    if step.read is not None and (rc == 0 or (step.output and step.output.is_file())):
        try:
            figures = step.read()
        except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as e:
            figures = {"problems": [f"could not read its figures: {e!r}"]}
    problems = figures.get("problems") or []
    if rc is None:
        status, reason = "failed", f"timed out after {timeout:.0f} s (see {log})"
    elif problems:
        status, reason = "failed", "; ".join(problems)[:500]
    elif rc != 0:
        status, reason = "failed", f"exit {rc}: {last_line(log)}"
    else:
        status, reason = "passed", ""
    return {"status": status, "reason": reason, "seconds": seconds, "figures": figures,
            "log": str(log)}


def run_steps(steps: list[Step], facts: dict[str, str | None], out: Path, deadline: float,
              on_step: Callable[[list[dict]], None] = lambda results: None) -> list[dict]:
    """Each step in order, guarded: a failure is recorded and the next step runs."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for step in steps:
        record = {"name": step.name, "what": step.what, "command": shlex.join(step.command)}
        reason = skip_reason(step, facts, results)
        left = deadline - time.monotonic()
        if reason is None and left < MIN_STEP_S:
            reason = f"out of time: {left:.0f} s of the run's budget left"
        if reason is None:
            record.update(execute(step, out, min(step.timeout, left)))
        else:
            record.update(status="skipped", reason=reason, seconds=0.0, figures={})
        results.append(record)
        print(summary_line(record), flush=True)
        on_step(results)
    return results


def exit_status(results: list[dict]) -> int:
    return int(any(r["status"] == "failed" for r in results))


def summary_line(r: dict) -> str:
    seconds = f"{r['seconds']:6.1f} s" if r["status"] != "skipped" else " " * 8
    note = r["reason"] or r["figures"].get("headline", "")
    return f"  {r['status']:<8} {r['name']:<24} {seconds}  {note}"


# --- this machine ---------------------------------------------------------------------------

def ensure_dff() -> str:
    """'installed' if `dff.runtime` imports; else install this checkout into a temporary folder
    (pip --target; links to its folders if pip cannot), on sys.path and PYTHONPATH."""
    with contextlib.suppress(ImportError):
        if importlib.util.find_spec("dff.runtime") is not None:
            return "installed"
    target = Path(tempfile.mkdtemp(prefix="dff-trt-"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
           "--no-index", "--target", str(target), str(ROOT)]
    try:
        ok = subprocess.run(pip, check=False, capture_output=True, timeout=180).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        link_package(target)
    for name in [m for m in sys.modules if m == "dff" or m.startswith("dff.")]:
        del sys.modules[name]  # a `dff` found elsewhere while looking
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target),
                                                            os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    how = "pip install --target" if ok else "links to the checkout (pip failed)"
    line = f"dff is not installed: made it importable from {target} ({how}) for this run"
    print(f"gpu_checks: {line}", flush=True)
    return line


def link_package(target: Path) -> None:
    """target/dff as pyproject's package-dir maps it, as symlinks to the checkout's folders."""
    import tomllib

    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    pkg = target / "dff"
    pkg.mkdir(exist_ok=True)
    for name, folder in dirs["package-dir"].items():
        if name == "dff":
            for f in (ROOT / folder).glob("*.py"):
                (pkg / f.name).symlink_to(f)
        else:
            (pkg / name.split(".", 1)[1]).symlink_to(ROOT / folder, target_is_directory=True)


# --- the command ----------------------------------------------------------------------------

def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_checks",
                   help="folder for gpu_checks.json and the logs (default: $OUT, else "
                        "./gpu_checks)")
    p.add_argument("--engines", default=str(DEFAULT_ENGINES),
                   help=f"folder of the segmentation demo export (default: {DEFAULT_ENGINES}); "
                        "the detection and R-FCN demos go beside it, into ENGINES-detection "
                        "and ENGINES-rfcn")
    p.add_argument("--quick", action="store_true",
                   help=f"few samples and shapes, the whole run within {BUDGET_S[True]:.0f} s")
    p.add_argument("--budget", type=float, metavar="S",
                   help="seconds for the whole run (default: 450 with --quick, else 1800)")
    p.add_argument("--plan", action="store_true", help="list the steps in order; run nothing")
    args = p.parse_args(argv)
    start, started = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out, engines = Path(args.out).resolve(), Path(args.engines).resolve()
    detection = engines.with_name(f"{engines.name}-detection")
    rfcn = engines.with_name(f"{engines.name}-rfcn")
    steps = plan(out, engines, args.quick, detection, rfcn)
    if args.plan:
        for i, step in enumerate(steps, 1):
            needs = ", ".join(step.needs + tuple(f"step {a}" for a in step.after)) or "nothing"
            print(f"{i:2}. {step.name:<24} {step.what} (needs {needs}; {step.timeout:.0f} s max)"
                  f"\n      $ {shlex.join(step.command)}")
        return 0
    dff_import = ensure_dff()
    out.mkdir(parents=True, exist_ok=True)
    env, facts = gpu_steps.probe()
    facts["detection_demo"] = detection_demo_fact()
    facts["rfcn_demo"] = rfcn_demo_fact()
    for key, value in env.items():
        print(f"{key:>20}: {value}")
    budget = args.budget or BUDGET_S[args.quick]
    doc: dict[str, Any] = {"tool": "gpu_checks", "started": started, "quick": args.quick,
                           "budget_s": budget, "dff_import": dff_import,
                           "engines_dir": str(engines),
                           "detection_engines_dir": str(detection),
                           "rfcn_engines_dir": str(rfcn),
                           "environment": env, "facts": facts}
    json_path = out / "gpu_checks.json"
    print(f"\n{len(steps)} steps, {budget:.0f} s budget:", flush=True)

    def save(results: list[dict]) -> None:
        counts = {s: sum(r["status"] == s for r in results) for s in
                  ("passed", "failed", "skipped")}
        write_json(json_path, {**doc, "steps": results, **counts,
                               "exit_status": exit_status(results),
                               "wall_s": round(time.monotonic() - start, 1)})

    results = run_steps(steps, facts, out, start + budget, save)
    save(results)
    counts = {s: sum(r["status"] == s for r in results) for s in ("passed", "failed", "skipped")}
    print(f"gpu_checks on {env.get('gpu', 'a machine without a CUDA device')}: "
          + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f" in {time.monotonic() - start:.0f} s; wrote {json_path}")
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
