"""dff-export: a tiny checkpoint to feature/flow/task.onnx + manifest.json, the graphs' shape
and warp contract, parity with PyTorch on ONNX Runtime, onnx.reference and polygraphy, bad
inputs, all-or-nothing writes, and the manifest reader the runtime uses."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_config
from dff.export import cli, exporter, graphs, parity
from dff.export.manifest import FORMAT, ManifestError, load_manifest, sha256_file
from dff.export.profile import Profile, ProfileError, default_profile, parse_shape
from dff.models.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from dff.models.dff import DFF

from dff.errors import DffError

pytest.importorskip("onnxruntime")
FILES = ["feature.onnx", "flow.onnx", "task.onnx", "manifest.json"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, DFF(tiny_config()).eval())
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """One export through the CLI (default profile of the 64x96 tiny model): dir, stdout."""
    out = tmp_path_factory.mktemp("export") / "engines"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main([str(checkpoint), "-o", str(out)])
    assert rc == 0, stdout.getvalue()
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint(checkpoint)


def paths(out):
    return {name: out / f"{name}.onnx" for name in graphs.WRAPPERS}


# --- files and manifest ---------------------------------------------------------------------

def test_export_writes_three_graphs_and_a_manifest_and_nothing_else(exported):
    out, stdout = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert not list(out.parent.glob(".engines.dff-export-*")), "temp folder left behind"
    assert "parity: pass" in stdout and "FAIL" not in stdout
    assert "max abs error" in stdout  # the parity table


def test_manifest_records_contract_profile_and_provenance(exported, checkpoint):
    out, _ = exported
    m = load_manifest(out)
    cfg = tiny_config()
    assert (m["format"], m["version"], m["task"]) == (FORMAT, 1, "segmentation")
    assert m["class_names"] == list(cfg.class_names) and m["num_classes"] == cfg.num_classes
    assert m["normalisation"]["mean"] == cfg.mean and m["normalisation"]["std"] == cfg.std
    assert (m["stride"], m["key_interval"], m["feat_channels"]) == (16, 10, 16)
    assert (m["profile"]["min"], m["profile"]["opt"], m["profile"]["max"]) == (
        [1, 64, 64], [1, 64, 96], [4, 128, 192])
    assert m["engines"] == {}
    assert m["plugin"] | {"function": None} == {
        "op": "FlowWarp", "domain": "dff", "version": 1, "graph": "flow",
        "inputs": ["feat", "flow", "scale"], "outputs": ["out"], "function": None}
    flow = m["graphs"]["flow"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in flow["inputs"]] == [
        ("image", "uint8", ["N", 3, "H", "W"]), ("key_image", "uint8", ["N", 3, "H", "W"]),
        ("key_feat", "float32", ["N", 16, "h", "w"])]
    assert [t["name"] for t in flow["outputs"]] == ["flow", "scale", "feat"]
    assert flow["custom_ops"] == ["dff::FlowWarp"]
    task = m["graphs"]["task"]["outputs"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in task] == [
        ("labels", "uint8", ["N", "H", "W"])]  # probs only with --probs
    for name, g in m["graphs"].items():
        assert g["sha256"] == sha256_file(out / g["file"]), name
    exp = m["export"]
    assert exp["checkpoint_sha256"] == file_sha256(checkpoint)
    assert exp["opset"] == 20 and exp["torch"] == torch.__version__
    assert exp["parity"]["passed"] is True and len(exp["parity"]["cases"]) == 2


def test_graphs_pass_full_check_with_the_warp_only_in_flow(exported):
    out, _ = exported
    for name, path in paths(out).items():
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        warps = [n for n in model.graph.node if n.op_type == "FlowWarp"]
        functions = [(f.domain, f.name) for f in model.functions]
        if name == "flow":
            assert [n.domain for n in warps] == ["dff"]
            assert functions == [("dff", "FlowWarp")]
            assert {o.domain: o.version for o in model.opset_import}["dff"] == 1
        else:
            assert warps == [] and functions == [], name


def test_onnx_io_dims_carry_the_manifest_names(exported):
    out, _ = exported
    m = load_manifest(out)
    for name, path in paths(out).items():
        model = onnx.load(path)
        for values, key in ((model.graph.input, "inputs"), (model.graph.output, "outputs")):
            got = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                   for v in values]
            assert got == [t["shape"] for t in m["graphs"][name][key]], (name, key)


# --- parity ---------------------------------------------------------------------------------

def assert_all_pass(rows, graphs_expected=3):
    assert len({r.graph for r in rows}) == graphs_expected
    failed = [r for r in rows if not r.passed]
    assert not failed, parity.format_table(rows)
    for r in rows:  # and in absolute terms: 1e-4, relative to the peak where it exceeds 1
        if r.metric == "equal":
            assert r.value >= 0.999
        else:
            assert r.value <= 1e-4 * max(1.0, r.peak)


@pytest.mark.parametrize("shape", [(1, 64, 96), (2, 80, 128), (2, 128, 64)])
def test_onnxruntime_matches_torch_at_dynamic_shapes(exported, model, shape):
    out, _ = exported
    rows = parity.check_parity(model, paths(out), parity.default_cases(shape, seed=3))
    assert_all_pass(rows)
    assert {r.case for r in rows} == {f"random {'x'.join(map(str, shape))}",
                                      f"clip {'x'.join(map(str, shape))}"}


def test_probs_flag_adds_the_softmax_output_checked_against_torch(checkpoint, model,
                                                                   tmp_path):
    result = exporter.export_model(checkpoint, tmp_path / "e", min_shape=(1, 32, 32),
                                   opt_shape=(1, 64, 64), max_shape=(1, 64, 64), probs=True)
    task = load_manifest(tmp_path / "e")["graphs"]["task"]["outputs"]
    assert [(t["name"], t["shape"]) for t in task] == [("labels", [1, "H", "W"]),
                                                       ("probs", [1, 5, "H", "W"])]
    rows = parity.check_parity(model, paths(tmp_path / "e"), parity.default_cases((1, 64, 64)))
    assert_all_pass(rows)
    probs = [r for r in rows if r.output == "probs"]
    assert len(probs) == 2 and result.manifest["export"]["parity"]["passed"]


def test_reference_evaluator_matches_torch(exported, model):
    from onnx.reference import ReferenceEvaluator

    evaluators = {}

    def run(graph, path, feeds):
        ev = evaluators.setdefault(path, ReferenceEvaluator(path))
        return dict(zip(ev.output_names, ev.run(None, dict(feeds))))

    rows = parity.check_parity(model, paths(exported[0]), [parity.clip_case((1, 64, 64))],
                               run=run)
    assert_all_pass(rows)


def test_polygraphy_onnxruntime_runner_matches_torch(exported, model):
    onnxrt = pytest.importorskip("polygraphy.backend.onnxrt",
                                 reason="polygraphy is not installed (pip install polygraphy)")
    runners = {}

    def run(graph, path, feeds):
        if path not in runners:
            runners[path] = onnxrt.OnnxrtRunner(onnxrt.SessionFromOnnx(path))
            runners[path].activate()
        return dict(runners[path].infer(dict(feeds)))

    try:
        rows = parity.check_parity(model, paths(exported[0]),
                                   [parity.random_case((2, 64, 80), seed=5)], run=run)
    finally:
        for r in runners.values():
            r.deactivate()
    assert_all_pass(rows)


def test_parity_failure_names_each_failing_output():
    ref = np.ones((1, 2, 3, 3), np.float32)
    rows = [parity.compare("flow", "flow", "random 1x48x48", ref, ref + 1e-3),
            parity.compare("task", "labels", "clip 1x48x48", np.zeros(100, np.uint8),
                           np.r_[np.ones(1), np.zeros(99)].astype(np.uint8)),
            parity.compare("task", "probs", "clip 1x48x48", ref, None)]
    assert [r.passed for r in rows] == [False, False, False]
    with pytest.raises(parity.ParityError, match=r"flow/flow on random.*task/labels.*--tol"):
        parity.require_pass(rows)
    assert "FAIL" in parity.format_table(rows)


# --- bad input and all-or-nothing -----------------------------------------------------------

def test_not_a_checkpoint_exits_1_with_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint\n")
    out = tmp_path / "engines"
    assert cli.main([str(bad), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dff-export: ") and str(bad) in err and "\n" not in err
    assert not out.exists()


def test_malformed_shape_string_exits_2_naming_the_format(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--opt-shape", "1x64"])
    assert e.value.code == 2
    assert "NxHxW" in capsys.readouterr().err


def test_shape_off_the_stride_exits_1_with_the_fix(checkpoint, tmp_path, capsys):
    assert cli.main([str(checkpoint), "-o", str(tmp_path / "e"), "--opt-shape", "1x72x96"]) == 1
    err = capsys.readouterr().err
    assert "--opt-shape 1x72x96" in err and "multiple of the stride 16" in err
    assert "use 64 or 80" in err


def test_failure_mid_export_leaves_the_output_folder_untouched(checkpoint, tmp_path,
                                                                monkeypatch, capsys):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    real = graphs.export_graph

    def export_then_fail_on_flow(model, spec, *args, **kw):
        if spec.name == "flow":
            raise graphs.ExportError("flow.onnx: simulated failure")
        return real(model, spec, *args, **kw)

    monkeypatch.setattr(graphs, "export_graph", export_then_fail_on_flow)
    assert cli.main([str(checkpoint), "-o", str(out)]) == 1
    assert "simulated failure" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert (out / "manifest.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]  # no temp folder left


def test_missing_demo_model_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "demo_checkpoint_path", lambda: tmp_path / "demo.pth")
    with pytest.raises(DffError, match="shipped demo model .*demo.pth is missing"):
        exporter.export_model(None, tmp_path / "engines")


def test_simplify_without_onnxsim_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(exporter.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DffError, match="--simplify needs onnxsim"):
        exporter.export_model(None, "unused", simplify=True)


def test_help_documents_the_demo_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--demo" in text and "shipped demo model" in text and "dff::FlowWarp" in text


# --- profile --------------------------------------------------------------------------------

def test_default_profile_spans_half_to_double_the_training_size():
    p = default_profile([128, 224])
    assert (p.min, p.opt, p.max) == ((1, 64, 64), (1, 128, 224), (4, 256, 448))
    assert p.example("N") == 2 and p.example("H") == 8  # never trace a dynamic axis at 1


@pytest.mark.parametrize("text", ["1x64", "ax64x64", "0x64x64", "1x64x64x3", ""])
def test_parse_shape_rejects_malformed_strings(text):
    with pytest.raises(ProfileError, match="NxHxW|zero"):
        parse_shape(text)


def test_profile_order_is_checked_per_axis():
    with pytest.raises(ProfileError, match="profile W: need min <= opt <= max"):
        Profile((1, 64, 128), (1, 64, 96), (2, 64, 192)).validate()


# --- load_manifest --------------------------------------------------------------------------

@pytest.fixture
def engines_copy(exported, tmp_path):
    return shutil.copytree(exported[0], tmp_path / "engines")


def edit_manifest(directory, **changes):
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_load_manifest_missing_dir(tmp_path):
    with pytest.raises(ManifestError, match=r"nowhere: no such directory.*dff-export"):
        load_manifest(tmp_path / "nowhere")


def test_load_manifest_missing_file(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest.json: missing.*re-export"):
        load_manifest(tmp_path)


def test_load_manifest_bad_json(engines_copy):
    (engines_copy / "manifest.json").write_text("{ nope")
    with pytest.raises(ManifestError, match=r"not valid JSON \(line 1"):
        load_manifest(engines_copy)


def test_load_manifest_other_format(engines_copy):
    edit_manifest(engines_copy, format="something-else")
    with pytest.raises(ManifestError, match="field 'format' is 'something-else'"):
        load_manifest(engines_copy)


def test_load_manifest_wrong_version(engines_copy):
    edit_manifest(engines_copy, version=2)
    with pytest.raises(ManifestError, match=r"field 'version' is 2, .* reads version 1; "
                                            r"re-export with `dff-export"):
        load_manifest(engines_copy)


def test_load_manifest_missing_field(engines_copy):
    edit_manifest(engines_copy, profile={"min": [1, 64, 64]})
    with pytest.raises(ManifestError, match="field 'profile.opt' is missing"):
        load_manifest(engines_copy)


def test_load_manifest_missing_graph_file(engines_copy):
    (engines_copy / "task.onnx").unlink()
    with pytest.raises(ManifestError, match=r"task.onnx: missing .*'graphs.task.file'"):
        load_manifest(engines_copy)


def test_load_manifest_sha256_mismatch(engines_copy):
    with open(engines_copy / "flow.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"flow.onnx: sha256 .* 'graphs.flow.sha256'"):
        load_manifest(engines_copy)
    assert load_manifest(engines_copy, verify_hashes=False)["version"] == 1


def test_manifest_reader_imports_without_torch():
    code = ("import sys; from dff.export.manifest import load_manifest; "
            "import dff.export; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
