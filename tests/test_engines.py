"""dff.engines: engine names, the compatibility refusal and its rebuild command, engine
selection, profile shapes from a real manifest, manifest entries, dff-build without TensorRT,
mypy against the TensorRT stubs, and (with TensorRT and a GPU) a real build."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from dff.engines import builder, entries, naming
from dff.engines.compat import EngineError, check_engine_compatible, select_engines
from dff.engines.profile import ProfileShapeError, profile_shapes
from dff.export.manifest import load_manifest, sha256_file
from dff.plugins import trt_plugin

from dff.commands import build as build_cli
from dff.errors import DffError

REPO = Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"
L4 = "NVIDIA L4"
TRT = "10.13.0.35"
HAVE_TRT = builder.tensorrt_available()
needs_no_trt = pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")


def entry(graph: str, precision: str = "fp16", gpu: str = H100, cc: str = "9.0",
          trt: str = TRT, **extra: object) -> tuple[str, dict]:
    name = naming.engine_name(graph, gpu, trt, precision)
    return name, {"file": name + ".plan", "sha256": "0" * 64, "bytes": 1, "graph": graph,
                  "precision": precision, "gpu": gpu, "compute_capability": cc,
                  "tensorrt": trt, **extra}


def manifest_with(*items: tuple[str, dict]) -> dict:
    return {"graphs": {g: {"file": f"{g}.onnx", "sha256": g * 4} for g in ("feature", "flow",
                                                                          "task")},
            "engines": dict(items)}


def full_set(**kw: object) -> list[tuple[str, dict]]:
    return [entry(g, **kw) for g in ("feature", "flow", "task")]  # type: ignore[arg-type]


# --- names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3"),
    ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090"),
    ("Tesla T4", "tesla-t4"),
    ("  NVIDIA  A100-SXM4-40GB ", "a100-sxm4-40gb"),
    ("NVIDIA", "nvidia"),
])
def test_gpu_slug_is_lowercase_dashed_without_the_vendor(name, slug):
    assert naming.gpu_slug(name) == slug


def test_engine_and_cache_names_carry_graph_gpu_version_and_precision():
    assert (naming.engine_filename("feature", H100, TRT, "fp16")
            == "feature.h100-80gb-hbm3.trt10.13.0.35.fp16.plan")
    assert naming.engine_name("task", L4, "10.7.0", "fp32") == "task.l4.trt10.7.0.fp32"
    assert naming.timing_cache_filename(H100, TRT) == "timing.h100-80gb-hbm3.trt10.13.0.35.cache"


@pytest.mark.parametrize("bad", [("feature", "", TRT, "fp16"), ("feature", H100, "ten", "fp16"),
                                 ("feature", H100, TRT, "int4")])
def test_engine_name_rejects_empty_gpu_bad_version_and_unknown_precision(bad):
    with pytest.raises(ValueError):
        naming.engine_filename(*bad)


def test_compute_capability_is_stored_as_major_dot_minor():
    assert naming.format_cc((8, 6)) == naming.format_cc([8, 6]) == naming.format_cc("8.6") == "8.6"
    with pytest.raises(ValueError):
        naming.format_cc("sm_86")


# --- compatibility --------------------------------------------------------------------------

def test_engine_built_here_is_accepted():
    _, e = entry("feature")
    check_engine_compatible(e, H100, (9, 0), TRT)  # no exception


def test_engine_for_another_gpu_is_refused_with_both_machines_and_the_rebuild_command():
    _, e = entry("feature")
    with pytest.raises(EngineError) as info:
        check_engine_compatible(e, L4, "8.9", "10.7.0.23")
    msg = str(info.value)
    assert msg.startswith(f"engines/{e['file']} was built for {H100}")
    assert f"with TensorRT {TRT}; this machine has {L4}" in msg and "TensorRT 10.7.0.23" in msg
    assert msg.endswith("rebuild with `dff-build engines/ --fp16`")


def test_engine_for_another_tensorrt_version_is_refused():
    _, e = entry("flow", precision="fp32")
    with pytest.raises(EngineError, match=r"TensorRT 10\.14\.1\.48: rebuild with "
                                          r"`dff-build out/eng/ --fp32`"):
        check_engine_compatible(e, H100, "9.0", "10.14.1.48", directory="out/eng")


def test_same_name_with_another_compute_capability_is_refused():
    _, e = entry("task")
    with pytest.raises(EngineError, match="compute 8.0"):
        check_engine_compatible(e, H100, "8.0", TRT)


def test_entry_without_gpu_field_is_refused_naming_the_field():
    _, e = entry("task")
    del e["gpu"]
    with pytest.raises(EngineError, match="no field 'gpu'.*dff-build engines/ --fp16"):
        check_engine_compatible(e, H100, "9.0", TRT)


# --- selection ------------------------------------------------------------------------------

def test_select_prefers_fp16_and_honours_an_explicit_precision():
    m = manifest_with(*full_set(), *full_set(precision="fp32"))
    chosen = select_engines(m, H100, "9.0", TRT)
    assert sorted(chosen) == ["feature", "flow", "task"]
    assert {e["precision"] for e in chosen.values()} == {"fp16"}
    assert chosen["flow"]["file"] == "flow.h100-80gb-hbm3.trt10.13.0.35.fp16.plan"
    chosen = select_engines(m, H100, "9.0", TRT, precision="fp32")
    assert {e["precision"] for e in chosen.values()} == {"fp32"}


def test_select_picks_this_gpus_engines_among_several_machines():
    m = manifest_with(*full_set(gpu=L4, cc="8.9", trt="10.7.0.23"), *full_set(precision="fp32"))
    chosen = select_engines(m, L4, (8, 9), "10.7.0.23")
    assert {e["gpu"] for e in chosen.values()} == {L4}
    assert select_engines(m, H100, "9.0", TRT)["task"]["precision"] == "fp32"


def test_select_refuses_engines_from_another_gpu_with_the_rebuild_command():
    m = manifest_with(*full_set())
    with pytest.raises(EngineError, match=r"was built for NVIDIA H100.*this machine has NVIDIA "
                                          r"L4.*rebuild with `dff-build engines/ --fp16`"):
        select_engines(m, L4, "8.9", TRT)


def test_select_refuses_another_tensorrt_version():
    with pytest.raises(EngineError, match=r"TensorRT 10\.13\.0\.35; this machine .* TensorRT 10\.8"):
        select_engines(manifest_with(*full_set()), H100, "9.0", "10.8.0.43")


def test_select_refuses_a_missing_precision_and_says_what_is_there():
    m = manifest_with(*full_set(), entry("feature", precision="fp32"))
    with pytest.raises(EngineError, match=r"no complete set of fp32 engines.*feature: fp16, "
                                          r"fp32; flow: fp16.*`dff-build engines/ --fp32`"):
        select_engines(m, H100, "9.0", TRT, precision="fp32")


def test_select_refuses_an_empty_engines_dict_and_a_missing_graph():
    with pytest.raises(EngineError, match="lists no TensorRT engines; build them with "
                                          "`dff-build e/ --fp16`"):
        select_engines(manifest_with(), H100, "9.0", TRT, directory="e/")
    with pytest.raises(EngineError, match="no engine for the task graph"):
        select_engines(manifest_with(entry("feature"), entry("flow")), H100, "9.0", TRT)


def test_select_refuses_an_engine_built_from_another_onnx_graph():
    m = manifest_with(*full_set(onnx_sha256="stale"))
    with pytest.raises(EngineError, match="built from another feature.onnx"):
        select_engines(m, H100, "9.0", TRT)
    fresh = manifest_with(*[entry(g, onnx_sha256=g * 4) for g in ("feature", "flow", "task")])
    assert len(select_engines(fresh, H100, "9.0", TRT)) == 3


def test_select_rejects_an_unknown_precision():
    with pytest.raises(EngineError, match="int8"):
        select_engines(manifest_with(*full_set()), H100, "9.0", TRT, precision="int8")


# --- a real export: profile shapes, manifest entries, dff-export's --fp16 ------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model exported through dff-export --fp16: (folder, stdout)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from conftest import tiny_config
    from dff.models.checkpoint import save_checkpoint
    from dff.models.dff import DFF

    from dff.commands import export as export_cli

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("engines")
    save_checkpoint(root / "tiny.pth", DFF(tiny_config()).eval())
    out = root / "engines"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = export_cli.main([str(root / "tiny.pth"), "-o", str(out), "--fp16",
                              "--max-shape", "2x128x192"])
    assert rc == 0, stdout.getvalue()
    return out, stdout.getvalue()


def test_profile_shapes_follow_the_manifest_profile_and_stride(exported):
    out, _ = exported
    m = load_manifest(out)
    assert m["profile"]["min"] == [1, 64, 64] and m["profile"]["max"] == [2, 128, 192]
    c = m["feat_channels"]
    assert profile_shapes(m, "feature") == {"image": ((1, 3, 64, 64), (1, 3, 64, 96),
                                                      (2, 3, 128, 192))}
    flow = profile_shapes(m, "flow")
    assert list(flow) == ["image", "key_image", "key_feat"]
    assert flow["key_image"] == flow["image"]
    assert flow["key_feat"] == ((1, c, 4, 4), (1, c, 4, 6), (2, c, 8, 12))
    assert profile_shapes(m, "task") == {"feat": flow["key_feat"]}


def test_profile_shapes_skip_fixed_inputs_and_refuse_unknown_axes(exported):
    m = load_manifest(exported[0])
    fixed = copy.deepcopy(m)
    fixed["graphs"]["task"]["inputs"][0]["shape"] = [1, 16, 4, 6]
    assert profile_shapes(fixed, "task") == {}
    odd = copy.deepcopy(m)
    odd["graphs"]["task"]["inputs"][0]["shape"] = ["N", "C", "h", "w"]
    with pytest.raises(ProfileShapeError, match="unknown axis 'C'"):
        profile_shapes(odd, "task")
    odd = copy.deepcopy(m)
    odd["profile"]["max"] = [2, 120, 192]
    with pytest.raises(ProfileShapeError, match="multiples of the stride 16"):
        profile_shapes(odd, "feature")


@needs_no_trt
def test_dff_export_fp16_without_tensorrt_writes_onnx_and_says_so_in_one_line(exported):
    out, stdout = exported
    assert stdout.strip().splitlines()[-1] == (
        f"TensorRT is not installed: wrote the ONNX graphs only; build engines later with "
        f"dff-build {out} --fp16 on a machine with TensorRT")
    assert not list(out.glob("*.plan")) and load_manifest(out)["engines"] == {}


def test_recorded_engines_pass_load_manifest_and_replace_their_old_entry(tmp_path, exported):
    out = tmp_path / "engines"
    out.mkdir()
    for f in exported[0].iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    m = load_manifest(out)
    shapes = profile_shapes(m, "feature")
    made = {}
    for gpu, plan in ((H100, b"plan-a"), (L4, b"plan-b")):
        name, e = entries.engine_entry(
            graph="feature", plan=plan, gpu_name=gpu, cc="9.0", trt_version=TRT,
            precision="fp16", onnx_sha256=m["graphs"]["feature"]["sha256"], shapes=shapes,
            workspace_mib=512, timing_cache=naming.timing_cache_filename(gpu, TRT), seconds=1.0)
        entries.write_atomic(out / e["file"], plan)
        made[name] = e
    entries.record_engines(out, m, made)
    # rebuilt on the H100: same file, new bytes, one entry for it
    name, e = entries.engine_entry(
        graph="feature", plan=b"plan-a2", gpu_name=H100, cc="9.0", trt_version=TRT,
        precision="fp16", onnx_sha256="x", shapes=shapes, workspace_mib=None,
        timing_cache="t.cache", seconds=2.0)
    before = load_manifest(out)
    entries.write_atomic(out / e["file"], b"plan-a2")
    entries.record_engines(out, before, {name: e})
    m2 = load_manifest(out)  # checks every engine file's sha256
    assert sorted(m2["engines"]) == sorted(made)
    kept = m2["engines"][name]
    assert kept["sha256"] == sha256_file(out / kept["file"]) and kept["bytes"] == 7
    assert set(kept) >= {"file", "sha256", "bytes", "graph", "precision", "gpu",
                         "compute_capability", "tensorrt", "onnx_sha256", "profile"}
    assert kept["profile"]["image"] == {"min": [1, 3, 64, 64], "opt": [1, 3, 64, 96],
                                        "max": [2, 3, 128, 192]}
    assert m2["graphs"] == m["graphs"]
    assert not list(out.glob(".*.tmp")), "temporary file left behind"


def test_prune_drops_entries_whose_engine_is_missing_or_changed(tmp_path, exported):
    out = tmp_path / "engines"
    out.mkdir()
    for f in exported[0].iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    m = load_manifest(out)
    made = {}
    for graph in ("feature", "flow", "task"):
        name, e = entries.engine_entry(
            graph=graph, plan=graph.encode(), gpu_name=H100, cc="9.0", trt_version=TRT,
            precision="fp32", onnx_sha256="x", shapes={}, workspace_mib=None,
            timing_cache="t.cache", seconds=0.0)
        entries.write_atomic(out / e["file"], graph.encode())
        made[name] = e
    entries.record_engines(out, m, made)
    assert entries.prune_engines(out) == []
    (out / made[naming.engine_name("flow", H100, TRT, "fp32")]["file"]).unlink()
    (out / made[naming.engine_name("task", H100, TRT, "fp32")]["file"]).write_bytes(b"cut short")
    with pytest.raises(DffError):
        load_manifest(out)
    assert sorted(entries.prune_engines(out)) == sorted(
        naming.engine_name(g, H100, TRT, "fp32") for g in ("flow", "task"))
    assert list(load_manifest(out)["engines"]) == [naming.engine_name("feature", H100, TRT,
                                                                      "fp32")]


# --- dff-build without TensorRT -------------------------------------------------------------

@needs_no_trt
def test_dff_build_without_tensorrt_exits_1_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dff.commands.build", str(tmp_path), "--fp32"],
                          check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dff-build: TensorRT is not installed")
    assert f"`dff-build {tmp_path}/ --fp32`" in lines[0]


@needs_no_trt
def test_empty_tensorrt_namespace_package_is_not_mistaken_for_tensorrt(tmp_path, monkeypatch):
    (tmp_path / "tensorrt").mkdir()  # what tensorrt-stubs leaves when its folders are not renamed
    monkeypatch.syspath_prepend(str(tmp_path))
    # the import below puts the empty package into sys.modules: setitem makes undo drop it
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.delitem(sys.modules, "tensorrt")
    with pytest.raises(builder.TensorRTMissing, match="found only an empty package"):
        builder.require_tensorrt()
    assert not builder.tensorrt_available()


def test_engines_package_imports_without_tensorrt_or_torch():
    code = ("import sys, dff.engines.builder, dff.commands.build, dff.engines; "
            "bad = {'tensorrt', 'torch'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("argv, message", [
    ([], "ENGINES_DIR is required"),
    (["e", "--fp16", "--fp32"], "not allowed with argument"),
    (["e", "--workspace", "0"], "positive size in MiB"),
    (["e", "--graphs", "feature,wrap"], "subset of feature,flow_key,flow,warp,task"),
    (["e", "--inspect", "x.plan"], "not both"),
])
def test_dff_build_rejects_bad_arguments_with_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        build_cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# --- mypy against tensorrt-stubs ------------------------------------------------------------

def _stubs_installed() -> bool:
    return any((Path(p) / "tensorrt-stubs" / "__init__.pyi").is_file() for p in sys.path if p)


TRT_FACING = ["engines", "plugins/trt_plugin.py", "runtime/trt_backend.py"]
needs_stubs = pytest.mark.skipif(
    not _stubs_installed() or importlib.util.find_spec("mypy") is None,
    reason="tensorrt-stubs (scripts/install_tensorrt_stubs.sh) or mypy is not installed")


def _mypy(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                           str(REPO / "pyproject.toml"), "--cache-dir", str(cache), *args],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=600)


@needs_stubs
@pytest.mark.parametrize("target", TRT_FACING)
def test_mypy_passes_on_the_tensorrt_facing_modules(target, tmp_path):
    if not (REPO / target).exists():
        pytest.skip(f"{target} does not exist yet")
    proc = _mypy(target, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_stubs
def test_mypy_catches_a_misspelt_tensorrt_call(tmp_path):
    bad = tmp_path / "misspelt.py"
    bad.write_text(textwrap.dedent("""\
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        network = trt.Builder(logger).create_netwrk(0)
    """))
    proc = _mypy(str(bad), cache=tmp_path / "cache")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert '"Builder" has no attribute "create_netwrk"' in proc.stdout


# --- the build's orchestration, against a recording stand-in for TensorRT ------------------
# mypy checks the TensorRT calls against the stubs; this checks what dff-build does with them:
# plugin before parsing, the profile's shapes, flags, timing cache, files and manifest.

class _FakeTRT(types.ModuleType):
    """Just enough of `tensorrt` for builder.build_engines, recording every call in `events`."""

    def __init__(self, fail_graph: str | None = None):
        super().__init__("tensorrt")
        self.__version__ = TRT
        self.events: list[tuple] = []
        self.fail_graph = fail_graph
        trt = self
        ev = self.events
        enum = types.SimpleNamespace
        self.Logger = type("Logger", (), {"WARNING": 2, "VERBOSE": 4,
                                          "__init__": lambda s, sev: None})
        self.LayerType = enum(PLUGIN_V3="plugin_v3", PLUGIN_V2="plugin_v2", PLUGIN="plugin",
                              GRID_SAMPLE="grid_sample", CONSTANT="constant")
        self.MemoryPoolType = enum(WORKSPACE="workspace")
        self.BuilderFlag = enum(FP16="fp16", INT8="int8")
        self.ProfilingVerbosity = enum(DETAILED="detailed")
        self.NetworkDefinitionCreationFlag = enum(PREFER_AOT_PYTHON_PLUGINS=3)
        self.Dims = tuple

        class Network:
            def __init__(self):
                self.inputs: list[str] = []
                self.layers: list[str] = []

            num_inputs = property(lambda s: len(s.inputs))
            num_layers = property(lambda s: len(s.layers))

            def get_input(self, i):
                return types.SimpleNamespace(name=self.inputs[i])

            def get_layer(self, i):
                return types.SimpleNamespace(type=self.layers[i])

        class ParserError:
            def node(self): return 7
            def node_name(self): return "/model/Conv_3"
            def node_operator(self): return "Conv"
            def desc(self): return "kernel weights are not constant"
            def code(self): return "ErrorCode.UNSUPPORTED_NODE"

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                import onnx
                ev.append(("parse", Path(path).name))
                if Path(path).stem == trt.fail_graph:
                    self.num_errors = 1
                    return False
                graph = onnx.load(path, load_external_data=False).graph
                self.network.inputs = [i.name for i in graph.input]
                # the parser's rule: a node with a local function becomes the plugin only when
                # its plugin_namespace attribute names a registered plugin's namespace
                self.network.layers = [
                    ("plugin_v3" if {a.name: a.s for a in n.attribute}.get("plugin_namespace")
                     == b"dff" and ("register_plugin",) in ev else "grid_sample")
                    if n.op_type == "FlowWarp" else "conv" for n in graph.node]
                return True

            def get_error(self, i):
                return ParserError()

        class Cache:
            def __init__(self, blob):
                self.blob = bytes(blob) or b"cache"

            def serialize(self):
                return self.blob + b"+"

        class Config:
            profiling_verbosity = None

            def set_memory_pool_limit(self, pool, size): ev.append(("pool", pool, size))
            def set_flag(self, flag): ev.append(("flag", flag))
            def add_optimization_profile(self, profile): ev.append(("profile", profile.shapes))

            def create_timing_cache(self, blob):
                ev.append(("cache", bytes(blob)))
                return Cache(blob)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def __init__(self): self.shapes = {}
            def set_shape(self, name, lo, opt, hi): self.shapes[name] = (lo, opt, hi)

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger): pass
            def create_network(self, flags):
                ev.append(("network", flags))
                return Network()
            def create_builder_config(self): return Config()
            def create_optimization_profile(self): return Profile()
            def build_serialized_network(self, network, config):
                return b"PLAN " + ",".join(network.inputs).encode()

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, object


@pytest.fixture
def fake_trt(monkeypatch, exported, tmp_path):
    """A copy of the export, a stand-in TensorRT, an H100, and a recorded register_plugin."""
    out = tmp_path / "engines"
    out.mkdir()
    for f in exported[0].iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    fake = _FakeTRT()
    plugin = types.ModuleType("dff.plugins.trt_plugin")
    plugin.register_plugin = lambda: fake.events.append(("register_plugin",))  # type: ignore
    plugin.ptx_isa = lambda: "9.0"  # type: ignore
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setitem(sys.modules, "dff.plugins.trt_plugin", plugin)
    monkeypatch.setattr(builder, "device_info", lambda device=0: (H100, "9.0"))
    return out, fake


def test_build_registers_the_plugin_first_and_records_four_engines(fake_trt):
    out, fake = fake_trt
    lines: list[str] = []
    result = builder.build_engines(out, precision="fp16", workspace_mib=256, log=lines.append)
    ev = fake.events
    assert ev.index(("register_plugin",)) < ev.index(("parse", "feature.onnx"))
    assert [e[1] for e in ev if e[0] == "parse"] == ["feature.onnx", "flow.onnx", "warp.onnx",
                                                      "task.onnx"]
    assert ("network", 1 << 3) in ev  # prefer the AOT plugin implementation
    assert ("pool", "workspace", 256 << 20) in ev and ("flag", "fp16") in ev
    profiles = [e[1] for e in ev if e[0] == "profile"]
    m = load_manifest(out)
    assert profiles == [profile_shapes(m, g) for g in ("feature", "flow", "warp", "task")]
    assert profiles[1]["key_feat"][2] == (2, 16, 8, 12)
    assert profiles[2]["flow"][2] == (2, 2, 8, 12)  # warp.onnx: the host flow's grid
    chosen = select_engines(m, H100, "9.0", TRT, directory=out)
    assert {e["file"] for e in chosen.values()} == {
        naming.engine_filename(g, H100, TRT, "fp16") for g in ("feature", "flow", "warp", "task")}
    assert "flow_warp" not in chosen["warp"]  # standard ONNX: TensorRT's own GridSample
    assert (out / chosen["flow"]["file"]).read_bytes() == b"PLAN image,key_image,key_feat"
    assert chosen["flow"]["flow_warp"] == "plugin" and "flow_warp" not in chosen["task"]
    assert chosen["flow"]["ptx_isa"] == "9.0"  # the PTX the flow engine embeds
    assert "ptx_isa" not in chosen["feature"] and "ptx_isa" not in chosen["task"]
    assert chosen["feature"]["workspace_mib"] == 256
    assert chosen["task"]["onnx_sha256"] == m["graphs"]["task"]["sha256"]
    cache = out / naming.timing_cache_filename(H100, TRT)
    assert cache.read_bytes() == b"cache+" and result.timing_cache == cache
    assert any("flow.h100-80gb-hbm3.trt10.13.0.35.fp16.plan" in line for line in lines)

    fake.events.clear()  # a rebuild loads the saved cache and replaces the entries
    builder.build_engines(out, precision="fp16")
    assert ("cache", b"cache+") in fake.events
    assert len(load_manifest(out)["engines"]) == 4


NVRTC_FAILS = ("dff-build: NVRTC could not compile plugins/flow_warp.cu for the FlowWarp plugin "
               "(flow_warp.cu(7): error: expected a \";\"): install the NVRTC it is built with, "
               "pip install 'nvidia-cuda-nvrtc==13.0.*'")
NVRTC_TOO_NEW = ("dff-build: NVRTC 13.5 makes FlowWarp PTX of ISA 9.5, which this GPU driver "
                 "(CUDA 13.0) cannot load: pip install 'nvidia-cuda-nvrtc==13.0.*'")


@pytest.mark.parametrize("nvrtc, message", [("fails", NVRTC_FAILS), ("13.5", NVRTC_TOO_NEW)])
def test_nvrtc_trouble_stops_the_build_in_one_line_before_any_parsing(fake_trt, monkeypatch,
                                                                      capsys, nvrtc, message):
    """The real register_plugin compiles the PTX first: nothing can fail later inside
    TensorRT's launch-parameter callback, where TensorRT only logs the exception."""
    from dff.plugins import kernel

    out, fake = fake_trt
    monkeypatch.setitem(sys.modules, "dff.plugins.trt_plugin", trt_plugin)
    monkeypatch.setattr(trt_plugin, "_require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_plugin, "_ptx", functools.cache(trt_plugin._ptx.__wrapped__))

    def compile_ptx(arch: str = "sm_80", fp16: bool = True) -> bytes:
        if nvrtc == "fails":
            raise RuntimeError("NVRTC failed on flow_warp.cu for sm_80:\n"
                               'flow_warp.cu(7): error: expected a ";"\n\n1 error detected')
        return b"//\n// Generated by NVIDIA NVVM Compiler\n.version 9.5\n.target sm_80\n"

    monkeypatch.setattr(kernel, "compile_ptx", compile_ptx)
    monkeypatch.setattr(kernel, "nvrtc_version", lambda: (13, 5))
    monkeypatch.setattr(kernel, "driver_cuda_version", lambda: (13, 0))
    assert build_cli.main([str(out), "--fp16"]) == 1
    assert capsys.readouterr().err == message + "\n"
    assert not [e for e in fake.events if e[0] in ("network", "parse")]
    assert "engines" not in load_manifest(out) or not load_manifest(out)["engines"]


def test_a_flowwarp_node_without_plugin_namespace_is_reported_as_the_slow_body(fake_trt):
    import onnx

    out, fake = fake_trt
    model = onnx.load(str(out / "flow.onnx"))
    for node in model.graph.node:  # as an older dff-export wrote it
        if node.op_type == "FlowWarp":
            del node.attribute[:]
    onnx.save(model, str(out / "old_flow.onnx"))
    fake.events.append(("register_plugin",))
    lines: list[str] = []
    shapes = profile_shapes(load_manifest(out), "flow")
    for name, want in (("flow.onnx", "plugin"), ("old_flow.onnx", "onnx function (GridSample)")):
        _, _, extras = builder.build_engine(fake.Builder(None), None, out / name, shapes, "fp16",
                                            None, None, lines.append, has_warp=True)
        assert extras["flow_warp"] == want
    assert len(lines) == 1 and "old_flow.onnx" in lines[0] and "re-export" in lines[0]


def test_build_reports_parser_errors_with_the_node_and_keeps_earlier_engines(fake_trt, capsys):
    out, fake = fake_trt
    fake.fail_graph = "task"
    rc = build_cli.main([str(out), "--fp32"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 2, err
    assert "task.onnx: TensorRT's ONNX parser failed" in err
    assert "node 7 '/model/Conv_3' (Conv): kernel weights are not constant" in err
    kept = load_manifest(out)["engines"]
    assert sorted(e["graph"] for e in kept.values()) == ["feature", "flow", "warp"]


def test_int8_set_builds_the_calibrated_feature_graph_in_int8_and_the_rest_in_fp16(
        fake_trt, tmp_path):
    pytest.importorskip("cv2", reason="calibration decodes a video with OpenCV")
    from dff.runtime.video import write_synthetic_clip

    out, fake = fake_trt
    write_synthetic_clip(tmp_path / "clip.mp4", seed=1, num_frames=6, height=64, width=96)
    assert build_cli.main([str(out), "--int8", "--calib-video", str(tmp_path / "clip.mp4"),
                           "--calib-frames", "3"]) == 0
    ev = fake.events
    assert [e[1] for e in ev if e[0] == "parse"] == ["feature.int8.onnx", "flow.onnx", "warp.onnx",
                                                      "task.onnx"]
    flags = [e[1] for e in ev if e[0] == "flag"]
    assert flags == ["fp16", "int8", "fp16", "fp16", "fp16"]  # int8 for the feature engine only
    m = load_manifest(out)
    chosen = select_engines(m, H100, "9.0", TRT, precision="int8", directory=out)
    assert chosen["feature"]["onnx_sha256"] == m["graphs"]["feature"]["int8"]["sha256"]
    assert [chosen[g]["kernels"] for g in ("feature", "flow", "task")] == ["int8", "fp16", "fp16"]
    assert chosen["flow"]["file"] == naming.engine_filename("flow", H100, TRT, "int8")
    mode = os.stat(out / chosen["flow"]["file"]).st_mode & 0o777
    assert mode == 0o666 & ~_umask(), oct(mode)  # not mkstemp's private 0600


def test_an_int8_set_from_a_reduce_range_graph_says_tensorrt_wants_all_8_bits(
        fake_trt, tmp_path, capsys):
    pytest.importorskip("cv2", reason="calibration decodes a video with OpenCV")
    from dff.runtime.video import write_synthetic_clip

    out, _ = fake_trt
    write_synthetic_clip(tmp_path / "clip.mp4", seed=1, num_frames=6, height=64, width=96)
    assert build_cli.main([str(out), "--int8", "--calib-video", str(tmp_path / "clip.mp4"),
                           "--calib-frames", "3", "--reduce-range"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert len(notes) == 1 and "7-bit weights (--reduce-range" in notes[0]
    assert f"calibrate again without it (`dff-build {out}/ --int8 --calib-video" in notes[0]
    assert load_manifest(out)["graphs"]["feature"]["int8"]["reduce_range"] is True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fp16_on_a_strongly_typed_only_tensorrt_is_refused(fake_trt):
    out, fake = fake_trt
    fake.BuilderFlag = types.SimpleNamespace()  # TensorRT 11 has no BuilderFlag.FP16
    with pytest.raises(builder.EngineBuildError, match="--fp32"):
        builder.build_engines(out, precision="fp16")


@pytest.fixture
def fake_trt_detection(fake_trt, detection_engines):
    """fake_trt, its folder holding a copy of the tiny detection export instead."""
    out, fake = fake_trt
    for f in out.iterdir():
        f.unlink()
    for f in detection_engines.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out, fake


def test_build_takes_a_detection_export_through_the_same_code_path(fake_trt_detection):
    out, fake = fake_trt_detection
    before = load_manifest(out)
    assert before["task"]["kind"] == "detection"
    builder.build_engines(out, precision="fp16")
    ev = fake.events
    assert ev.index(("register_plugin",)) < ev.index(("parse", "feature.onnx"))
    assert [e[1] for e in ev if e[0] == "parse"] == ["feature.onnx", "flow.onnx", "warp.onnx",
                                                      "task.onnx"]
    profiles = [e[1] for e in ev if e[0] == "profile"]
    assert profiles[3] == {"feat": ((1, 16, 2, 2), (1, 16, 4, 6), (2, 16, 8, 12))}
    m = load_manifest(out)
    chosen = select_engines(m, H100, "9.0", TRT, directory=out)
    assert (out / chosen["task"]["file"]).read_bytes() == b"PLAN feat"
    assert chosen["flow"]["flow_warp"] == "plugin" and "flow_warp" not in chosen["task"]
    assert {k: v for k, v in m.items() if k != "engines"} == {
        k: v for k, v in before.items() if k != "engines"}  # task, outputs: as exported


# --- a real build (TensorRT and a GPU) ------------------------------------------------------

def gpu_and_copy(export_dir, tmp_path):
    """This machine's (GPU name, compute capability), or a skip; and a copy of the export."""
    try:
        gpu, cc = builder.device_info()
    except Exception as e:  # noqa: BLE001 - any failure here means no usable GPU
        pytest.skip(f"no CUDA GPU: {e}")
    out = tmp_path / "engines"
    out.mkdir()
    for f in Path(export_dir).iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return gpu, cc, out


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed")
def test_dff_build_builds_three_engines_this_gpu_may_load(exported, tmp_path):
    gpu, cc, out = gpu_and_copy(exported[0], tmp_path)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = build_cli.main([str(out), "--fp16", "--workspace", "1024", "--json"])
    assert rc == 0, stdout.getvalue()
    built = json.loads(stdout.getvalue())
    assert len(built) == 3
    version = builder.require_tensorrt()
    m = load_manifest(out)
    chosen = select_engines(m, gpu, cc, version, directory=out)
    for graph, e in chosen.items():
        assert e["file"] == naming.engine_filename(graph, gpu, version, "fp16")
        assert os.path.getsize(out / e["file"]) == e["bytes"]
    assert (out / naming.timing_cache_filename(gpu, version)).stat().st_size > 0
    assert chosen["flow"]["flow_warp"] in ("plugin", "onnx function (GridSample)")
    report = builder.inspect_engine(out / chosen["feature"]["file"])
    assert [t["name"] for t in report["tensors"]] == ["image", "feat"]
    assert report["tensors"][0]["profile"]["max"] == [2, 3, 128, 192]


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed")
def test_dff_build_builds_detection_engines_with_the_contracts_outputs(detection_engines,
                                                                       tmp_path):
    gpu, cc, out = gpu_and_copy(detection_engines, tmp_path)
    assert build_cli.main([str(out), "--fp32"]) == 0
    m = load_manifest(out)
    chosen = select_engines(m, gpu, cc, builder.require_tensorrt(), directory=out)
    report = builder.inspect_engine(out / chosen["task"]["file"])
    assert [(t["name"], t["dtype"]) for t in report["tensors"]] == [
        ("feat", "FLOAT"), ("boxes", "FLOAT"), ("scores", "FLOAT"), ("classes", "INT32"),
        ("num", "INT32")]
    assert report["tensors"][1]["shape"][1:] == [m["task"]["max_detections"], 4]
