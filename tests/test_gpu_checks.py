"""tests/gpu_checks.py without a GPU: its plan (one export that every profile uses, TensorRT
engines built before they are profiled), a CPU run that skips every GPU step with its reason
and writes valid JSON, the guards around failing and hanging steps, the links that make a bare
checkout importable, and the in-process GPU steps' logic on a host-memory stand-in for CUDA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types

import gpu_checks
import gpu_steps
import numpy as np
import pytest
from dff.plugins import kernel
from dff.plugins.reference import flow_warp_numpy
from dff.runtime import buffers
from dff.runtime.buffers import HostMemory, host_view

Step = gpu_checks.Step
HAVE_GPU = kernel.cuda_device_count() > 0


def arg(step: Step, flag: str) -> str:
    """The value that follows `flag` in a step's command."""
    return step.command[step.command.index(flag) + 1]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.fixture
def steps(tmp_path):
    return gpu_checks.plan(tmp_path / "out", tmp_path / "engines", quick=True)


# --- the plan -------------------------------------------------------------------------------

TASKS = [("segmentation", "engines", ""), ("detection", "engines-detection", "-detection"),
         ("rfcn", "engines-rfcn", "-rfcn")]


def of_task(steps, suffix):
    """The export, build and profile steps of one demo (by their names' suffix)."""
    mine = [s for s in steps if s.name.split("-")[0] in ("export", "build", "profile")]
    if suffix:
        return [s for s in mine if s.name.endswith(suffix)]
    return [s for s in mine if not s.name.endswith(tuple(x for _, _, x in TASKS if x))]


@pytest.mark.parametrize("task, folder, suffix", TASKS)
def test_plan_exports_once_into_the_folder_every_profile_step_uses(steps, tmp_path, task,
                                                                    folder, suffix):
    names = [s.name for s in steps]
    exports = [s for s in of_task(steps, suffix) if "dff.commands.export" in s.command]
    assert len(exports) == 1 and exports[0].name == f"export{suffix}"
    assert arg(exports[0], "-o") == str(tmp_path / folder)
    assert arg(exports[0], "--demo") == task
    profiles = [s for s in of_task(steps, suffix) if "dff.commands.profile" in s.command]
    assert {arg(s, "--backend") for s in profiles} == {"torch-cuda", "onnxruntime-cuda",
                                                       "tensorrt"}
    for s in profiles:
        assert arg(s, "-e") == str(tmp_path / folder)
        assert "--demo" not in s.command
        assert f"export{suffix}" in s.after
        assert names.index(f"export{suffix}") < names.index(s.name)


@pytest.mark.parametrize("task, folder, suffix", TASKS)
def test_plan_builds_each_tensorrt_precision_before_profiling_it(steps, tmp_path, task,
                                                                  folder, suffix):
    names = [s.name for s in steps]
    trt = [s for s in of_task(steps, suffix) if "dff.commands.profile" in s.command
           and arg(s, "--backend") == "tensorrt"]
    assert sorted(arg(s, "--precision") for s in trt) == ["fp16", "fp32"]
    for s in trt:
        precision = arg(s, "--precision")
        build = steps[names.index(f"build-{precision}{suffix}")]
        assert arg(build, "dff.commands.build") == str(tmp_path / folder)
        assert f"--{precision}" in build.command
        assert build.name in s.after and names.index(build.name) < names.index(s.name)
        assert "tensorrt" in s.needs and "tensorrt" in build.needs
    assert "fast_fp16" in steps[names.index(f"build-fp16{suffix}")].needs


def test_detection_then_rfcn_steps_come_last_and_need_their_shipped_weights(steps):
    names = [s.name for s in steps]
    detection = [i for i, n in enumerate(names) if n.endswith("-detection")]
    rfcn = [i for i, n in enumerate(names) if n.endswith("-rfcn")]
    assert len(detection) == len(rfcn) == 7
    assert detection + rfcn == list(range(len(names) - 14, len(names)))
    for i in detection:
        assert steps[i].needs[0] == "gpu" and "detection_demo" in steps[i].needs
    for i in rfcn:
        assert steps[i].needs[0] == "gpu" and "rfcn_demo" in steps[i].needs
    assert not any("detection_demo" in s.needs or "rfcn_demo" in s.needs
                   for s in steps[:detection[0]])


def test_detection_demo_fact_says_which_weights_are_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_checks, "DETECTION_WEIGHTS",
                        gpu_checks.ROOT / "models" / "weights" / "nowhere.pth")
    assert gpu_checks.detection_demo_fact() == (
        "no shipped detection weights here (models/weights/nowhere.pth is missing)")
    monkeypatch.setattr(gpu_checks, "DETECTION_WEIGHTS", gpu_checks.ROOT / "pyproject.toml")
    assert gpu_checks.detection_demo_fact() is None
    monkeypatch.setattr(gpu_checks, "RFCN_WEIGHTS", gpu_checks.ROOT / "nowhere.pth")
    assert gpu_checks.rfcn_demo_fact() == "no shipped rfcn weights here (nowhere.pth is missing)"


def test_quick_plan_asks_for_few_samples(steps):
    bench = next(s for s in steps if s.name == "kernel-time")
    assert arg(bench, "--iterations") == "30" and "--plugin-ptx" in bench.command
    for s in steps:
        if "dff.commands.profile" in s.command:
            assert arg(s, "--iterations") == "50" and arg(s, "--key-intervals") == "1,10"
        assert "--quick" in s.command or s.name not in gpu_steps.STEPS


def test_plan_flag_lists_the_steps_in_order_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert gpu_checks.main(["--plan", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    names = re.findall(r"^\s*\d+\. (\S+)", printed, re.MULTILINE)
    assert names == [s.name for s in gpu_checks.plan(out, tmp_path, quick=False)]
    assert not out.exists()


# --- a run on this CPU machine --------------------------------------------------------------

def reject(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


@pytest.mark.skipif(HAVE_GPU, reason="a CUDA device is present: the GPU steps would run")
def test_cpu_run_skips_every_gpu_step_with_its_reason_fails_none_and_writes_json(tmp_path,
                                                                                 capsys):
    out, engines = tmp_path / "out", tmp_path / "engines"
    rc = gpu_checks.main(["--quick", "--out", str(out), "--engines", str(engines)])
    doc = json.loads((out / "gpu_checks.json").read_text(), parse_constant=reject)
    assert rc == 0 == doc["exit_status"] and doc["failed"] == 0
    plan = gpu_checks.plan(out, engines, quick=True)
    results = {r["name"]: r for r in doc["steps"]}
    assert list(results) == [s.name for s in plan]
    for step in plan:
        r = results[step.name]
        assert isinstance(r["seconds"], float) and r["command"]
        if "gpu" in step.needs:
            assert r["status"] == "skipped" and r["seconds"] == 0.0
            assert r["reason"].startswith("no CUDA device here")
            if "tensorrt" in step.needs and doc["facts"]["tensorrt"]:
                assert "no TensorRT here" in r["reason"]
    if doc["facts"]["torch_cuda"]:
        assert "pip install torch --index-url" in results["profile-torch-cuda"]["reason"]
    ptx = results["ptx"]
    if doc["facts"]["nvrtc"] is None:  # the CPU part: the sm_80 PTX and its ISA
        assert ptx["status"] == "passed"
        assert re.fullmatch(r"\d+\.\d+", ptx["figures"]["isa"])
        assert ptx["figures"]["isa"] == doc["environment"]["ptx_isa"]
    assert doc["environment"]["cuda_devices"] == 0
    assert doc["detection_engines_dir"] == str(tmp_path / "engines-detection")
    assert doc["rfcn_engines_dir"] == str(tmp_path / "engines-rfcn")
    assert not engines.exists()  # nothing to profile: nothing exported
    assert not (tmp_path / "engines-detection").exists()
    assert not (tmp_path / "engines-rfcn").exists()
    printed = capsys.readouterr().out
    assert "skipped  kernel" in printed and f"wrote {out / 'gpu_checks.json'}" in printed


# --- the guards -----------------------------------------------------------------------------

def test_a_failing_step_is_recorded_and_the_steps_after_it_still_run(tmp_path):
    ok, bad = tmp_path / "ok.json", tmp_path / "bad.json"
    steps = [
        Step("broken", "exits 1", python("import sys; sys.exit('broken: reinstall it')"), 30),
        Step("after-broken", "needs broken", python("pass"), 30, after=("broken",)),
        Step("ok", "writes figures", python(f"open({str(ok)!r}, 'w').write('{{\"x\": 1}}')"),
             30, output=ok, read=lambda: gpu_checks.read_json(ok)),
        Step("off", "exits 0 with a problem",
             python(f"open({str(bad)!r}, 'w').write('{{\"problems\": [\"fp16 off\"]}}')"), 30,
             output=bad, read=lambda: gpu_checks.read_json(bad)),
        Step("no-gpu", "needs a GPU", python("pass"), 30, needs=("gpu",)),
    ]
    results = gpu_checks.run_steps(steps, {"gpu": "no CUDA device here"}, tmp_path,
                                   time.monotonic() + 120)
    status = {r["name"]: (r["status"], r["reason"]) for r in results}
    assert status == {"broken": ("failed", "exit 1: broken: reinstall it"),
                      "after-broken": ("skipped", "needs step broken, which failed"),
                      "ok": ("passed", ""), "off": ("failed", "fp16 off"),
                      "no-gpu": ("skipped", "no CUDA device here")}
    assert results[2]["figures"] == {"x": 1}
    assert gpu_checks.exit_status(results) == 1
    assert gpu_checks.exit_status([r for r in results if r["status"] != "failed"]) == 0


def test_a_hanging_step_is_stopped_at_its_timeout_and_the_budget_skips_the_rest(tmp_path):
    steps = [Step("hangs", "sleeps", python("import time; time.sleep(60)"), 1.0),
             Step("late", "after the budget", python("pass"), 30)]
    start = time.monotonic()
    results = gpu_checks.run_steps(steps, {}, tmp_path, start + gpu_checks.MIN_STEP_S + 0.5)
    assert time.monotonic() - start < 10
    assert results[0]["status"] == "failed"
    assert results[0]["reason"].startswith("timed out after 1 s")
    assert results[1]["status"] == "skipped" and results[1]["reason"].startswith("out of time")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the links read pyproject with tomllib")
def test_links_make_the_checkout_importable_as_dff_without_an_install(tmp_path):
    gpu_checks.link_package(tmp_path)
    code = ("import dff.runtime.buffers as b, dff.plugins.kernel as k, dff; "
            "print(b.__file__, k.KERNEL_SOURCE.is_file(), dff.__version__)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONSAFEPATH": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True)
    where, source_found, _ = result.stdout.split()
    assert where.startswith(str(tmp_path / "dff" / "runtime")) and source_found == "True"


def test_profile_figures_come_from_dff_profiles_json(engines, tmp_path):
    from dff.commands import profile

    path = tmp_path / "profile.json"
    assert profile.main(["-e", str(engines), "--backend", "onnxruntime-cpu", "--warmUp", "0",
                         "--iterations", "2", "--frames", "4", "--key-intervals", "1,2",
                         "--json", str(path)]) == 0
    figures = gpu_checks.read_profile(path)
    assert [r["key_interval"] for r in figures["end_to_end"]] == [1, 2]
    assert figures["end_to_end"][1]["efficiency"] > 0
    assert set(figures["stage_median"]) == {"feature", "flow", "task"}
    assert figures["headline"].startswith("K=2: ")
    assert gpu_checks.read_engines(engines, None)["graphs"] == ["feature", "flow", "task",
                                                                 "warp"]


# --- the in-process GPU steps on a stand-in -------------------------------------------------

class FakeRuntime:
    """The graph calls step_graph makes, as cuda.bindings.runtime returns them: a capture
    records launches, a replay runs them."""

    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)
    capturing: list | None = None

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        for launch in graph_exec:
            launch()
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (0,)

    def cudaGraphDestroy(self, graph):
        return (0,)


class FakeCudaMemory(HostMemory):
    def __init__(self, device=0):
        super().__init__()
        self.rt = FakeRuntime()
        FakeKernel.runtime = self.rt


class FakeKernel:
    """FlowWarpKernel's call on host memory: the NumPy reference, recorded while capturing."""

    runtime: FakeRuntime | None = None
    error = 0.0  # added to every output

    def __init__(self, device=0, ptx=None):
        assert ptx.startswith(b"//") and b".target sm_80" in ptx  # the plugin's PTX

    def __call__(self, feat, flow, scale, out, n, c, h, w, dtype="float32", stream=0):
        def launch():
            views = [host_view(p, (n, k, h, w), dtype).astype(np.float64)
                     for p, k in ((feat, c), (flow, 2), (scale, c))]
            host_view(out, (n, c, h, w), dtype)[...] = flow_warp_numpy(*views) + self.error

        if self.runtime.capturing is not None:
            self.runtime.capturing.append(launch)
        else:
            launch()

    def close(self):
        pass


@pytest.fixture
def fake_gpu(monkeypatch):
    pytest.importorskip("cuda.bindings.nvrtc", reason="the steps compile the real PTX")
    monkeypatch.setattr(buffers, "CudaMemory", FakeCudaMemory)
    monkeypatch.setattr(kernel, "FlowWarpKernel", FakeKernel)
    monkeypatch.setattr(gpu_steps, "WARP_SHAPES", [(1, 1, 1, 1), (2, 3, 5, 7)])


def test_kernel_step_reports_the_max_error_per_shape_dtype_and_flow(fake_gpu):
    figures = gpu_steps.step_kernel(quick=True)
    assert figures["problems"] == []
    assert {(c["shape"], c["dtype"], c["flow"]) for c in figures["cases"]} == {
        (s, d, f) for s in ("1x1x1x1", "2x3x5x7") for d in ("fp32", "fp16")
        for f in ("small", "outside")}
    assert figures["worst"]["fp32"] < 1e-6 and figures["worst"]["fp16"] < 2e-3
    json.dumps(figures, allow_nan=False)


def test_kernel_step_names_each_case_off_by_more_than_its_tolerance(fake_gpu, monkeypatch):
    monkeypatch.setattr(FakeKernel, "error", 1e-4)
    problems = gpu_steps.step_kernel(quick=True)["problems"]
    assert len(problems) == 8  # fp32 only (1e-4 is within fp16's 2e-3), both references
    assert problems[0] == "fp32 1x1x1x1 small flow: max |kernel - numpy| = 1.00e-04 > 1e-05"
    assert all(p.startswith("fp32") for p in problems)


def test_kernel_step_counts_unwritten_cells_as_failures_and_stays_valid_json(fake_gpu,
                                                                             monkeypatch):
    monkeypatch.setattr(FakeKernel, "__call__", lambda self, *args, **kw: None)
    figures = gpu_steps.step_kernel(quick=True)
    assert figures["worst"] == {"fp32": None, "fp16": None}  # the NaN the output started as
    assert len(figures["problems"]) == 16
    json.dumps(figures, allow_nan=False)


def test_graph_step_replays_the_captured_launch_like_the_direct_one(fake_gpu):
    figures = gpu_steps.step_graph(quick=True)
    assert figures["problems"] == []
    assert figures["capture_ran_nothing"] and figures["replay_equals_direct"]
    assert figures["max_abs_vs_numpy"] < 1e-6


def test_graph_step_catches_a_capture_that_ran_the_kernel(fake_gpu, monkeypatch):
    monkeypatch.setattr(FakeRuntime, "cudaStreamBeginCapture", lambda self, stream, mode: (0,))
    monkeypatch.setattr(FakeRuntime, "cudaStreamEndCapture", lambda self, stream: (0, []))
    figures = gpu_steps.step_graph(quick=True)
    assert figures["problems"] == ["the capture ran the kernel instead of recording it"]
