"""TensorRT readiness without TensorRT (docs/DESIGN.md §7): every operator of every exported
graph of both tasks (FlowWarp's function body included) is on the list of operators TensorRT
10's ONNX parser imports (engines/tensorrt_onnx_ops.json), FlowWarp is the listed plugin, and
detection's TopK takes a constant K within TensorRT's limit."""

from __future__ import annotations

import json

import onnx
import pytest
from dff.engines import onnx_ops
from dff.export.manifest import graphs_of, load_manifest

from dff import tasks

pytest.importorskip("onnxruntime")

OPS = onnx_ops.load_ops()


@pytest.fixture(scope="module", params=["segmentation", "detection"])
def exported(request):
    """(task, engine folder): the session's tiny export of each task."""
    fixture = "engines" if request.param == "segmentation" else "detection_engines"
    return request.param, request.getfixturevalue(fixture)


def load(folder, graph):
    return onnx.load(folder / f"{graph}.onnx", load_external_data=False)


def test_op_list_names_its_source_version_and_the_topk_limit():
    source = OPS["source"]
    assert source["repository"] == "onnx/onnx-tensorrt" and source["path"] == "docs/operators.md"
    assert len(source["commit"]) == 40 and OPS["tensorrt"].startswith("10.")
    assert OPS["restrictions"]["TopK"]["k_max"] == tasks.TOPK_LIMIT == 3840
    assert {"Conv", "TopK", "GatherElements", "GridSample", "NonMaxSuppression"} <= set(
        OPS["operators"])
    assert not set(OPS["operators"]) & set(OPS["not_imported"])
    assert list(OPS["plugins"]) == ["dff::FlowWarp"]


def test_every_op_of_every_graph_is_one_tensorrt_imports(exported):
    task, folder = exported
    listed = set(OPS["operators"])
    graphs = graphs_of(load_manifest(folder))
    assert graphs == ["feature", "flow", "warp", "task"]  # warp.onnx: the host flow's warp
    for graph in graphs:
        model = load(folder, graph)
        assert onnx_ops.problems(model, OPS) == [], (task, graph)
        ops = onnx_ops.graph_ops(model)
        custom = {op for op in ops if "::" in op}
        assert ops - custom <= listed, (task, graph, sorted(ops - custom - listed))
        assert custom == ({"dff::FlowWarp"} if graph == "flow" else set()), (task, graph)


def test_the_flowwarp_function_body_is_checked_too(engines):
    model = load(engines, "flow")
    body = {onnx_ops.op_name(n) for f in model.functions for n in f.node}
    assert "GridSample" in body and body <= set(OPS["operators"])
    assert body - {onnx_ops.op_name(n) for n in model.graph.node}  # ops only the body has
    assert body <= onnx_ops.graph_ops(model)


def test_detection_topk_takes_a_constant_k_within_tensorrts_limit(detection_engines):
    manifest = load_manifest(detection_engines)
    k = manifest["task"]["max_detections"]
    model = load(detection_engines, "task")
    assert onnx_ops.topk_ks(model) == [k] and k <= OPS["restrictions"]["TopK"]["k_max"]
    (topk,) = [n for n in model.graph.node if n.op_type == "TopK"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in topk.attribute}
    assert attrs.get("sorted", 1) == 1 and attrs.get("largest", 1) == 1


def test_detection_graph_needs_no_nms_and_no_plugin(detection_engines):
    ops = onnx_ops.graph_ops(load(detection_engines, "task"))
    assert not ops & {"NonMaxSuppression", "RoiAlign", "MaxRoiPool"}
    assert {"TopK", "MaxPool", "GatherElements", "Sigmoid"} <= ops


def test_problems_name_an_unlisted_op_a_big_k_and_a_stray_custom_op(detection_engines, tmp_path):
    model = load(detection_engines, "task")
    k_name = next(n for n in model.graph.node if n.op_type == "TopK").input[1]
    (k_init,) = [t for t in model.graph.initializer if t.name == k_name] or [None]
    if k_init is None:
        pytest.skip("TopK's K is a Constant node in this export")
    k_init.CopyFrom(onnx.numpy_helper.from_array(
        onnx.numpy_helper.to_array(k_init) * 0 + 5000, k_name))
    model.graph.node.append(onnx.helper.make_node("Unique", ["boxes"], ["u"]))
    model.graph.node.append(onnx.helper.make_node("Foo", ["boxes"], ["f"], domain="acme"))
    found = onnx_ops.problems(model, OPS)
    assert any(p.startswith("Unique: not imported by TensorRT 10.") for p in found)
    assert any(p.startswith("acme::Foo: a custom op") for p in found)
    assert "TopK: K 5000; TensorRT takes a constant K <= 3840" in found


def nms_graph(boxes_shape, scores_shape) -> onnx.ModelProto:
    h = onnx.helper
    f = onnx.TensorProto.FLOAT
    node = h.make_node("NonMaxSuppression", ["boxes", "scores"], ["keep"], name="nms")
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("boxes", f, boxes_shape),
                                       h.make_tensor_value_info("scores", f, scores_shape)],
                         [h.make_tensor_value_info("keep", onnx.TensorProto.INT64, None)])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_nms_takes_3d_boxes_and_scores_and_at_most_5000_boxes_an_image():
    assert onnx_ops.problems(nms_graph(["B", 1000, 4], ["B", 1, 1000]), OPS) == []
    found = onnx_ops.problems(nms_graph([1000, 4], ["B", 1, 1000]), OPS)
    assert found == [("NonMaxSuppression nms: boxes 'boxes' is 2-D; TensorRT takes 3-D boxes and "
                     "scores")]
    found = onnx_ops.problems(nms_graph([1, 6000, 4], [1, 1, 6000]), OPS)
    assert found == ["NonMaxSuppression nms: 6000 boxes an image; TensorRT takes at most 5000"]
    found = onnx_ops.problems(nms_graph(["B", 1000, 4], None), OPS)
    assert found == [("NonMaxSuppression nms: scores 'scores' is of a rank shape inference "
                     "cannot tell; TensorRT takes 3-D boxes and scores")]


def test_op_list_is_valid_json_with_sorted_unique_names():
    data = json.loads(onnx_ops.OPS_FILE.read_text())
    assert data["operators"] == sorted(set(data["operators"]))
