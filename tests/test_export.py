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
from dff.export import exporter, graphs, parity
from dff.export.manifest import FORMAT, ManifestError, load_manifest, sha256_file, stage_graphs
from dff.export.profile import Profile, ProfileError, default_profile, parse_shape
from dff.models.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from dff.models.dff import DFF

from dff.commands import export as cli
from dff.errors import DffError

pytest.importorskip("onnxruntime")
FILES = ["feature.onnx", "flow.onnx", "task.onnx", "warp.onnx", "manifest.json"]


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
    """The learned-flow export's graphs as its manifest lists them (flow_key where it has one)."""
    return {name: out / f"{name}.onnx" for name in stage_graphs(load_manifest(out))}


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
    assert (m["format"], m["version"]) == (FORMAT, 2)
    assert m["task"] == {"kind": "segmentation", "outputs": ["labels"]}
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
    assert exp["parity"]["frames"] == {"random 1x64x96": 1, "clip 1x64x96": 1}
    assert exp["tool_version"] == "0.3.0" and "detection_rule" not in exp["parity"]
    # a checkpoint goes through export_modules too: the fields of 0.3.0's manifest, plus the
    # modules' record and the flow graph's own normalisation (FlowNet-S takes raw pixels)
    assert sorted(m) == ["class_names", "dims", "engines", "export", "feat_channels", "flow",
                         "format", "graphs", "key_interval", "normalisation", "num_classes",
                         "plugin", "profile", "stride", "task", "version"]
    assert m["flow"] == {"sources": ["learned", "dis"], "default": "learned"}
    warp = m["graphs"]["warp"]  # the host flow's warp: standard ONNX, no custom op
    assert [(t["name"], t["shape"]) for t in warp["inputs"]] == [
        ("key_feat", ["N", 16, "h", "w"]), ("flow", ["N", 2, "h", "w"])]
    assert warp["custom_ops"] == []
    assert sorted(exp) == ["checkpoint", "checkpoint_sha256", "modules", "onnx", "onnxruntime",
                           "opset", "parity", "simplified", "tool", "tool_version", "torch"]
    assert m["normalisation"]["flow"] == {"mean": [0.0] * 3, "std": [1.0] * 3}
    assert exp["modules"]["feature"].startswith("dff.models.trunk.ResNetTrunk (")
    assert exp["modules"]["scale_field"] is True and len(exp["modules"]["weights_sha256"]) == 64


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
        if r.metric in ("equal", "frames"):
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
    monkeypatch.setattr(exporter, "demo_checkpoint_path",
                        lambda task="segmentation": tmp_path / "demo.pth")
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
    edit_manifest(engines_copy, version=3)
    with pytest.raises(ManifestError, match=r"field 'version' is 3, .* reads version 2; "
                                            r"re-export with `dff-export"):
        load_manifest(engines_copy)


def test_a_version_1_manifest_is_refused_with_the_reexport_command(engines_copy):
    edit_manifest(engines_copy, version=1, task="segmentation")  # as dff-trt 0.2 wrote it
    with pytest.raises(ManifestError) as e:
        load_manifest(engines_copy)
    message = str(e.value)
    assert "field 'version' is 1" in message and "reads version 2" in message
    assert f"dff-export MODEL.pth -o {engines_copy}" in message and "\n" not in message


def test_load_manifest_task_as_a_string_names_the_field(engines_copy):
    edit_manifest(engines_copy, task="segmentation")
    with pytest.raises(ManifestError, match=r"manifest.json: field 'task' is str, expected "
                                            r"dict; re-export"):
        load_manifest(engines_copy)


@pytest.mark.parametrize("task, field", [
    ({"kind": "segmentation", "outputs": ["boxes", "scores", "classes", "num"]}, "task.outputs"),
    ({"kind": "tracking", "outputs": ["labels"]}, "task.kind"),
    ({"kind": "segmentation", "outputs": ["labels", "probs"]}, "task.outputs"),
])
def test_load_manifest_refuses_outputs_that_do_not_match_the_task(engines_copy, task, field):
    edit_manifest(engines_copy, task=task)
    with pytest.raises(ManifestError) as e:
        load_manifest(engines_copy)
    message = str(e.value)
    assert message.startswith(str(engines_copy / "manifest.json")) and "\n" not in message
    assert f"'{field}'" in message and message.endswith(f"re-export with `dff-export MODEL.pth "
                                                        f"-o {engines_copy}`")


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
    assert load_manifest(engines_copy, verify_hashes=False)["version"] == 2


def test_manifest_reader_imports_without_torch():
    code = ("import sys; from dff.export.manifest import load_manifest; "
            "import dff.export; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- detection ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detection_model(detection_export):
    return load_checkpoint(detection_export[0])


def test_detection_manifest_records_the_task_object_and_the_fixed_size_outputs(
        detection_engines):
    m = load_manifest(detection_engines)
    assert m["version"] == 2 and m["task"] == {
        "kind": "detection", "outputs": ["boxes", "scores", "classes", "num"],
        "max_detections": 100, "score_threshold": 0.05}
    assert m["class_names"] == ["disc", "box", "triangle", "cross"] and m["num_classes"] == 4
    task = m["graphs"]["task"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in task["outputs"]] == [
        ("boxes", "float32", ["N", 100, 4]), ("scores", "float32", ["N", 100]),
        ("classes", "int32", ["N", 100]), ("num", "int32", ["N"])]
    assert [t["shape"] for t in task["inputs"]] == [["N", 16, "h", "w"]]
    assert "boxes, scores, classes, num" in task["doc"]
    parity_record = m["export"]["parity"]
    assert parity_record["passed"] and parity_record["worst"]["task/detections"] >= 0.999
    assert parity_record["frames"] == {"random 1x64x96": 1, "clip 1x64x96": 1,
                                       "features 1000x4x6": 1000}
    assert "num equal" in parity_record["detection_rule"]
    model = onnx.load(detection_engines / "task.onnx")
    got = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
           for v in model.graph.output]
    assert got == [t["shape"] for t in task["outputs"]]


@pytest.mark.parametrize("shape", [(2, 80, 128), (1, 128, 192), (2, 32, 48)])
def test_detection_graphs_match_torch_frame_by_frame_at_dynamic_shapes(
        detection_engines, detection_model, shape):
    rows = parity.check_parity(detection_model, paths(detection_engines),
                               parity.default_cases(shape, seed=4))
    detections = [r for r in rows if r.graph == "task"]
    assert [(r.output, r.metric) for r in detections] == [("detections", "frames")] * 2
    assert all(r.value == 1.0 for r in detections), parity.format_table(rows)
    assert_all_pass(rows)


def test_detection_feature_case_runs_many_frames_in_batches(detection_engines, detection_model):
    case = parity.feature_case(detection_model, (1, 64, 96), frames=250, seed=1)
    assert case.image.shape == (250, 16, 4, 6) and case.name == "features 250x4x6"
    row = parity.check_task_frames(detection_model, detection_engines / "task.onnx", case,
                                   batch=64)
    assert row.passed and row.value == 1.0 and row.detail.startswith("250/250 frames")
    ref = detection_model.outputs(detection_model.task(torch.from_numpy(case.image[:8])))
    assert int(ref["num"].sum()) > 0  # the maps give detections to compare


def detections(scores, classes, boxes):
    """One frame's outputs (batch 1) with K = len(scores) rows; num from the scores."""
    scores = np.asarray(scores, np.float32)
    return {"boxes": np.asarray(boxes, np.float32)[None], "scores": scores[None],
            "classes": np.asarray(classes, np.int32)[None],
            "num": np.array([(scores > 0.05).sum()], np.int32)}


BOXES = [[0, 0, 10, 10], [5, 5, 20, 20], [1, 2, 3, 4], [0, 0, 0, 0]]


def test_detections_match_row_by_row_within_the_tolerance():
    ref = detections([0.9, 0.5, 0.3, 0.0], [1, 2, 0, -1], BOXES)
    near = {k: v.copy() for k, v in ref.items()}
    near["boxes"][0, 1, 2] += 1e-3  # 20 px peak: allowed 2e-3
    row = parity.compare_detections("clip", ref, near)
    assert row.passed and row.value == 1.0 and row.metric == "frames"
    assert row.detail.startswith("1/1 frames, 3 rows; boxes 1.0e-03")
    for name, edit in [("num", lambda d: d["num"].__setitem__(0, 2)),
                       ("classes", lambda d: d["classes"].__setitem__((0, 1), 3)),
                       ("boxes", lambda d: d["boxes"].__setitem__((0, 0, 0), 0.01)),
                       ("scores", lambda d: d["scores"].__setitem__((0, 2), 0.3002))]:
        bad = {k: v.copy() for k, v in ref.items()}
        edit(bad)
        assert parity.compare_detections("clip", ref, bad).value == 0.0, name


def test_padding_rows_after_num_are_not_compared():
    ref = detections([0.9, 0.5, 0.0, 0.0], [1, 2, -1, -1], BOXES)
    got = {k: v.copy() for k, v in ref.items()}
    got["boxes"][0, 3] = 7  # padding: not the contract's zeros, but past num
    assert parity.compare_detections("clip", ref, got).passed


def test_rows_whose_scores_tie_may_come_in_either_order():
    ref = detections([0.9, 0.5, 0.5, 0.0], [1, 2, 3, -1], BOXES)
    swapped = {k: v.copy() for k, v in ref.items()}
    swapped["classes"][0, [1, 2]] = [3, 2]
    swapped["boxes"][0, [1, 2]] = swapped["boxes"][0, [2, 1]]
    assert parity.compare_detections("clip", ref, swapped).passed
    untied = detections([0.9, 0.6, 0.5, 0.0], [1, 2, 3, -1], BOXES)
    swapped_untied = {k: v.copy() for k, v in untied.items()}
    swapped_untied["classes"][0, [1, 2]] = [3, 2]
    assert not parity.compare_detections("clip", untied, swapped_untied).passed


def test_with_all_k_rows_used_the_candidates_tied_with_the_last_may_differ():
    ref = detections([0.9, 0.4, 0.4, 0.4], [1, 2, 3, 0], BOXES)
    other = {k: v.copy() for k, v in ref.items()}
    other["classes"][0, 3], other["boxes"][0, 3] = 2, [50, 50, 60, 60]  # another tied pick
    assert parity.compare_detections("clip", ref, other).passed
    first = {k: v.copy() for k, v in ref.items()}
    first["classes"][0, 0] = 0  # the untied top row must still be the same
    assert not parity.compare_detections("clip", ref, first).passed


def test_detection_parity_passes_at_99_9_percent_of_frames_and_fails_below():
    frame = detections([0.9, 0.5, 0.3, 0.0], [1, 2, 0, -1], BOXES)
    ref = {k: np.repeat(v, 1000, axis=0) for k, v in frame.items()}
    got = {k: v.copy() for k, v in ref.items()}
    got["num"][0] = 2
    assert parity.compare_detections("features", ref, got).passed
    got["num"][1] = 2
    row = parity.compare_detections("features", ref, got)
    assert not row.passed and row.value == 0.998
    missing = parity.compare_detections("features", ref, {**got, "classes": None})
    assert not missing.passed and "missing" in missing.detail


def test_parity_table_and_summary_show_detection_frames(capsys):
    frame = detections([0.9, 0.0], [1, -1], BOXES[:2])
    rows = [parity.compare("feature", "feat", "clip 1x64x96", np.ones(3, np.float32),
                           np.ones(3, np.float32)),
            parity.compare_detections("clip 1x64x96", frame, frame)]
    table = parity.format_table(rows)
    assert "100.000% of frames match" in table and ">= 99.9%" in table
    assert table.splitlines()[0].split()[-1] == "detail" and "1/1 frames" in table
    assert "detail" not in parity.format_table(rows[:1])
    summary = cli.parity_summary(rows)
    assert summary.endswith("detections 100.00% of frames match)") and "labels" not in summary


def test_probs_on_a_detection_model_exits_1_naming_the_option_and_the_task(
        detection_export, tmp_path, capsys):
    out = tmp_path / "engines"
    assert cli.main([str(detection_export[0]), "-o", str(out), "--probs"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dff-export: --probs: ") and "detection" in err and "\n" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_demo_detection_without_its_shipped_weights_says_so_in_one_line(tmp_path, monkeypatch,
                                                                       capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setattr(exporter, "demo_checkpoint_path",
                        lambda task="segmentation": weights / f"{task}.pth")
    out = tmp_path / "engines"
    assert cli.main(["--demo", "detection", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"dff-export: --demo detection: the shipped detection weights "
                   f"{weights / 'detection.pth'} are missing from this install; pass a "
                   "detection MODEL.pth written by dff-train")
    assert not out.exists()


def test_demo_checkpoint_is_the_shipped_weights_of_the_task(tmp_path, monkeypatch):
    for name in ("segmentation.pth", "detection.pth", "rfcn.pth"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(exporter, "demo_checkpoint_path",
                        lambda task="segmentation": tmp_path / f"{task}.pth")
    assert exporter.demo_checkpoint() == tmp_path / "segmentation.pth"
    assert exporter.demo_checkpoint("detection") == tmp_path / "detection.pth"
    assert exporter.demo_checkpoint("rfcn") == tmp_path / "rfcn.pth"
    monkeypatch.undo()  # the real lookup refuses an unknown name, naming the demos
    with pytest.raises(DffError, match="demo 'tracking' is not shipped; the demos are "
                                       "segmentation, detection, rfcn"):
        exporter.demo_checkpoint("tracking")


def test_plain_demo_stays_segmentation():
    args = cli.build_parser().parse_args(["--demo"])
    assert args.demo == "segmentation"
    assert cli.build_parser().parse_args([]).demo is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--demo", "tracking"])
