"""dff::FlowWarp in ONNX: export with torch, one custom node, its function body run by ONNX
Runtime and by onnx's reference evaluator, against the PyTorch reference warp."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from dff.models.warp import flow_warp
from dff.plugins import onnx_op
from onnx import helper
from onnx.reference import ReferenceEvaluator

ort = pytest.importorskip("onnxruntime")

# (N, C, h, w) at run time; the model was exported at (2, 4, 5, 7).
RUN_SHAPES = [(1, 4, 5, 7), (3, 4, 1, 1), (1, 4, 1, 9), (2, 1, 8, 1), (2, 6, 11, 13),
              (4, 16, 17, 6)]


@pytest.fixture(scope="module")
def warp_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "flow_warp.onnx"
    onnx_op.export_warp_model(path)
    return path


@pytest.fixture(scope="module")
def warp_model(warp_model_path):
    return onnx.load(warp_model_path)


def make_inputs(shape, seed=0):
    """feat, flow up to twice the map size (so many samples fall off it), scale."""
    rng = np.random.default_rng(seed)
    n, _, h, w = shape
    extent = np.array([w, h], dtype=np.float64).reshape(1, 2, 1, 1)
    return {
        "feat": rng.uniform(-1, 1, shape).astype(np.float32),
        "flow": (rng.uniform(-2, 2, (n, 2, h, w)) * extent).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, shape).astype(np.float32),
    }


def torch_reference(inputs):
    return flow_warp(*(torch.from_numpy(inputs[k]) for k in ("feat", "flow", "scale"))).numpy()


def test_exported_model_passes_full_check(warp_model):
    onnx.checker.check_model(warp_model, full_check=True)


def test_exported_graph_is_one_flowwarp_node_with_its_function(warp_model):
    nodes = [(n.op_type, n.domain) for n in warp_model.graph.node]
    assert nodes == [("FlowWarp", "dff")]
    assert [(f.domain, f.name) for f in warp_model.functions] == [("dff", "FlowWarp")]
    opsets = {o.domain: o.version for o in warp_model.opset_import}
    assert opsets["dff"] == 1
    assert opsets[""] == onnx_op.DEFAULT_OPSET
    assert [(o.domain, o.version) for o in warp_model.functions[0].opset_import] == [
        ("", opsets[""])]
    assert [i.name for i in warp_model.graph.input] == ["feat", "flow", "scale"]
    assert [o.name for o in warp_model.graph.output] == ["out"]


def test_exported_batch_and_grid_are_dynamic(warp_model):
    for value in (*warp_model.graph.input, *warp_model.graph.output):
        dims = value.type.tensor_type.shape.dim
        assert all(dims[i].dim_param for i in (0, 2, 3)), value.name


@pytest.mark.parametrize("shape", RUN_SHAPES)
def test_onnxruntime_runs_flowwarp_like_torch(warp_model_path, shape):
    session = ort.InferenceSession(str(warp_model_path), providers=["CPUExecutionProvider"])
    inputs = make_inputs(shape)
    (out,) = session.run(["out"], inputs)
    assert out.shape == shape
    np.testing.assert_allclose(out, torch_reference(inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", RUN_SHAPES)
def test_reference_evaluator_runs_flowwarp_like_torch(warp_model, shape):
    inputs = make_inputs(shape, seed=1)
    (out,) = ReferenceEvaluator(warp_model).run(None, inputs)
    assert out.shape == shape
    np.testing.assert_allclose(out, torch_reference(inputs), rtol=0, atol=1e-5)


def test_export_with_fixed_channels_keeps_batch_and_grid_dynamic():
    model = onnx_op.export_warp_model(channels=3, dynamic_channels=False)
    feat = model.graph.input[0].type.tensor_type.shape.dim
    assert feat[1].dim_value == 3
    assert all(feat[i].dim_param for i in (0, 2, 3))
    inputs = make_inputs((2, 3, 6, 4))
    (out,) = ReferenceEvaluator(model).run(None, inputs)
    np.testing.assert_allclose(out, torch_reference(inputs), rtol=0, atol=1e-5)


def one_node_model(opset):
    """A hand-made graph holding only the FlowWarp node, before attach_function."""
    def value(name, c):
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", c, "h", "w"])

    graph = helper.make_graph(
        [helper.make_node("FlowWarp", ["feat", "flow", "scale"], ["out"], domain="dff")],
        "flow_warp", [value("feat", "C"), value("flow", 2), value("scale", "C")],
        [value("out", "C")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=10)


@pytest.mark.parametrize("opset", [16, 18, 20])
def test_function_body_runs_at_each_gridsample_opset(opset):
    model = onnx_op.attach_function(one_node_model(opset))
    onnx.checker.check_model(model, full_check=True)
    inputs = make_inputs((2, 3, 9, 5), seed=2)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = torch_reference(inputs)
    np.testing.assert_allclose(session.run(None, inputs)[0], expected, rtol=0, atol=1e-5)
    if opset >= 20:  # onnx.reference knows only GridSample-20's mode names ("linear")
        np.testing.assert_allclose(ReferenceEvaluator(model).run(None, inputs)[0], expected,
                                   rtol=0, atol=1e-5)


def test_function_body_refuses_an_opset_without_gridsample():
    with pytest.raises(ValueError, match="opset >= 16"):
        onnx_op.function_proto(15)


def test_attach_function_twice_keeps_one_function():
    model = onnx_op.attach_function(onnx_op.attach_function(one_node_model(20)))
    assert len(model.functions) == 1
    assert [o.domain for o in model.opset_import].count("dff") == 1
    assert len(model.graph.node[0].attribute) == 1


def test_flowwarp_node_names_its_tensorrt_plugin_namespace(warp_model):
    # TensorRT's parser takes a node with a local function as a plugin only when the node's
    # `plugin_namespace` attribute names the plugin's namespace (the domain is not enough)
    (node,) = warp_model.graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"plugin_namespace": b"dff"}
    assert list(warp_model.functions[0].attribute) == ["plugin_namespace"]


def test_register_schema_twice_is_harmless():
    onnx_op.register_schema()
    onnx_op.register_schema()
    schema = onnx.defs.get_schema("FlowWarp", 1, "dff")
    assert [p.name for p in schema.inputs] == ["feat", "flow", "scale"]
    assert [p.name for p in schema.outputs] == ["out"]


def test_torch_op_runs_the_reference_warp_eagerly():
    inputs = make_inputs((2, 3, 6, 7))
    args = [torch.from_numpy(inputs[k]) for k in ("feat", "flow", "scale")]
    torch.testing.assert_close(onnx_op.torch_op()(*args), flow_warp(*args), rtol=0, atol=0)


def test_plugins_import_without_torch():
    code = ("import sys; import dff.plugins, dff.plugins.reference, dff.plugins.onnx_op; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
