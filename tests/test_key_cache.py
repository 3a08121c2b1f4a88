"""The learned flow's key-frame cache (DESIGN.md §3, flow_key.onnx): RealFlowNet's key_code path
gives forward's flow, an export of the real-footage net writes flow_key.onnx and a flow.onnx
that takes key_code, and every consumer of the export takes it: ONNX Runtime (plain and
IOBinding), the step (one key_code per key frame), dff-profile, the manifest's checks,
TensorRT's profile shapes and engine choice, Triton's repository and its real server."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from dff.data.synthetic import make_clip
from dff.engines.compat import EngineError, select_engines
from dff.engines.profile import profile_shapes
from dff.export.exporter import export_modules
from dff.export.graphs import key_cache
from dff.export.manifest import (
    ManifestError,
    key_grid,
    keyed,
    load_manifest,
    stage_graphs,
    write_manifest,
)
from dff.models.realflow import INPUT_SCALES, STRIDES, WEIGHTS, RealFlowNet, load_realflow
from dff.runtime.loop import Pipeline
from dff.runtime.scheduler import make_scheduler
from test_modules import Head, Trunk

pytest.importorskip("onnxruntime")
H, W = 64, 96


@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("input_scale", INPUT_SCALES)
def test_the_key_code_path_is_forward_and_its_grid_the_rule(stride, input_scale):
    net = RealFlowNet(stride, 3, input_scale=input_scale).eval()
    torch.nn.init.normal_(net.predict_scale.weight, std=0.05,  # a scale field, not the 1s
                          generator=torch.Generator().manual_seed(0))
    cache = key_cache(net)
    assert cache == {"channels": 24, "shrink": round(1 / input_scale), "cell": 8}
    for h, w in ((3 * stride, 5 * stride), (7 * stride, 9 * stride)):
        x, k = torch.randn(2, 2, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            code = net.encode_key(k)
            flow, scale = net.forward_code(x, code)
            want_flow, want_scale = net(x, k)
        side = [-(-(s // cache["shrink"]) // cache["cell"]) for s in (h, w)]
        assert code.shape == (2, 24, *side)
        torch.testing.assert_close(flow, want_flow, atol=1e-5, rtol=0)
        torch.testing.assert_close(scale, want_scale, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def keyed_export(tmp_path_factory):
    """A segmentation model of one's own with no flow net: the real-footage net, cached."""
    if not WEIGHTS.exists():
        pytest.skip(f"no shipped {WEIGHTS.name}")
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("keyed") / "engines"
    export_modules(out, feature=Trunk(8).eval(), flow=None, task=Head().eval(),
                   class_names=("background", "thing"), input_size=(H, W), stride=8,
                   max_shape=(2, 128, 192))
    return out


def frames(n: int = 7, seed: int = 3) -> np.ndarray:
    return make_clip(seed, n, H, W).frames


def nchw(frame: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(frame.transpose(2, 0, 1)[None])


def test_the_export_writes_flow_key_and_a_flow_that_takes_its_code(keyed_export):
    import onnx

    m = load_manifest(keyed_export)
    assert keyed(m) and stage_graphs(m) == ["feature", "flow_key", "flow", "task"]
    assert m["graphs"]["flow_key"]["grid"] == {"shrink": 1, "cell": 8}
    assert [t["name"] for t in m["graphs"]["flow"]["inputs"]] == ["image", "key_code",
                                                                  "key_feat"]
    assert m["graphs"]["flow_key"]["outputs"][0]["shape"] == ["N", 24, "hk", "wk"]
    assert {"hk", "wk"} <= set(m["dims"]) and key_grid(m, 72, 104) == (9, 13)
    assert {r.split("/")[0] for r in m["export"]["parity"]["worst"]} == {
        "feature", "flow_key", "flow", "task"}
    key = onnx.load(keyed_export / "flow_key.onnx")
    assert not key.functions and [o.name for o in key.graph.output] == ["key_code"]


def test_onnxruntime_runs_the_code_as_pytorch_runs_the_net(keyed_export):
    from dff.export.modules import normalise
    from dff.runtime.ort_backend import OrtBackend

    clip = frames()
    image, key = nchw(clip[3]), nchw(clip[0])
    net = load_realflow(8, 8).eval()
    with torch.no_grad():
        want = net(*(normalise(torch.from_numpy(a).float(), net.flow_mean, net.flow_std)
                     for a in (image, key)))[0].numpy()
    plain, bound = OrtBackend(keyed_export), OrtBackend(keyed_export, io_binding=True)
    try:
        assert plain.keyed and bound.keyed
        code = plain.key(key)
        assert code.shape == (1, 24, 8, 12) and code.dtype == np.float32
        flow = plain.flow(image, code, plain.feature(key))[0]
        np.testing.assert_allclose(flow, want, atol=1e-4)
        # IOBinding: key_code's buffer from the manifest's grid, the same values
        code_b = bound.key(bound.upload(key))
        np.testing.assert_allclose(bound.to_host(code_b), code, atol=1e-6)
        out = bound.flow(bound.upload(image), code_b, bound.feature(bound.upload(key)))
        np.testing.assert_allclose(bound.to_host(out[0]), flow, atol=1e-5)
    finally:
        plain.close()
        bound.close()


def test_the_step_makes_one_code_per_key_frame_and_runs_as_the_graphs_do(keyed_export):
    from dff.runtime.ort_backend import OrtBackend

    clip = frames()
    backend = OrtBackend(keyed_export)
    try:
        pipe = Pipeline(backend, make_scheduler("fixed", 3))
        got = [r.labels for r in pipe.run(iter(clip))]
        stages = pipe.summary()["stages"]
        assert stages["key"]["count"] == stages["feature"]["count"] == 3  # frames 0, 3, 6
        assert stages["flow"]["count"] == 4
        for t, labels in enumerate(got):  # the graphs by hand: key frame t - t % 3
            k = t - t % 3
            feat = backend.feature(nchw(clip[k]))
            if t != k:
                feat = backend.flow(nchw(clip[t]), backend.key(nchw(clip[k])), feat)[2]
            np.testing.assert_array_equal(labels, backend.task(feat)["labels"][0])
        copy = Pipeline(backend, make_scheduler("fixed", 3), copy=True)  # takes no key_code
        list(copy.run(iter(clip)))
        assert copy.summary()["stages"]["key"]["count"] == 0
    finally:
        backend.close()


def test_dff_profile_times_the_key_code_and_counts_it_in_the_prediction(keyed_export, tmp_path,
                                                                        capsys):
    from dff.commands import profile

    path = tmp_path / "p.json"
    assert profile.main(["-e", str(keyed_export), "-b", "onnxruntime-cpu", "--iterations",
                         "3", "--warmUp", "0", "--key-intervals", "1,5", "--frames", "10",
                         "--json", str(path)]) == 0
    assert "key (flow's)" in capsys.readouterr().out
    res = json.loads(path.read_text())
    med = {s: res["stages"][s]["latency_ms"]["median"] for s in ("feature", "key", "task")}
    share = med["key"] / (med["feature"] + med["task"])
    row = res["end_to_end"][1]
    assert row["stage_counts"]["key"] == row["key_frames"] == 2
    assert row["predicted_speedup"] == pytest.approx(5 / (1 + share + 4 * res["r"]))


def manifest_edit(src, dst, edit):
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    write_manifest(dst / "manifest.json", m)
    return dst


def test_a_manifest_whose_flow_and_key_graph_disagree_is_refused(keyed_export, tmp_path):
    lone = manifest_edit(keyed_export, tmp_path / "a",
                         lambda m: m["graphs"].pop("flow_key"))
    with pytest.raises(ManifestError, match="flow.onnx takes key_code, but it has no "
                                            "graphs.flow_key; re-export"):
        load_manifest(lone)
    bad = manifest_edit(keyed_export, tmp_path / "b",
                        lambda m: m["graphs"]["flow_key"].update(grid={"shrink": 0}))
    with pytest.raises(ManifestError, match="'graphs.flow_key.grid' is"):
        load_manifest(bad)


def test_tensorrt_profiles_and_engine_sets_include_the_key_graph(keyed_export):
    m = load_manifest(keyed_export)
    shapes = profile_shapes(m, "flow")
    p = m["profile"]
    assert shapes["key_code"] == tuple((p[k][0], 24, *key_grid(m, *p[k][1:]))
                                       for k in ("min", "opt", "max"))
    assert shapes["key_code"][1:] == ((1, 24, 8, 12), (2, 24, 16, 24))  # opt 64x96, max
    assert profile_shapes(m, "flow_key")["key_image"][2] == (2, 3, 128, 192)

    def entry(graph: str) -> dict:
        return {"file": f"{graph}.plan", "graph": graph, "precision": "fp16", "gpu": "G",
                "compute_capability": "8.9", "tensorrt": "10.9",
                "onnx_sha256": m["graphs"][graph]["sha256"]}

    m["engines"] = {g: entry(g) for g in ("feature", "flow", "task")}
    with pytest.raises(EngineError, match="no engine for the flow_key graph"):
        select_engines(m, "G", "8.9", "10.9")
    m["engines"]["flow_key"] = entry("flow_key")
    assert sorted(select_engines(m, "G", "8.9", "10.9")) == ["feature", "flow", "flow_key",
                                                              "task"]
    m["engines"] = {g: entry(g) for g in ("feature", "warp", "task")}  # DIS alone built
    assert sorted(select_engines(m, "G", "8.9", "10.9")) == ["feature", "task", "warp"]


def test_triton_serves_the_cached_flow_as_the_process_runs_it(keyed_export, tmp_path):
    import triton_fixture
    from dff.runtime.ort_backend import OrtBackend
    from dff.serve.repository import write_repository

    repo = tmp_path / "repo"
    summary = write_repository(keyed_export, repo, key_interval=3)
    assert summary["models"] == ["feature", "flow_key", "flow", "task", "dff"]
    config = (repo / "dff" / "config.pbtxt").read_text()
    assert '"flow_key_model"' in config
    assert 'name: "key_code"' in (repo / "flow_key" / "config.pbtxt").read_text()
    write_repository(keyed_export, repo, stages="inline", name="dff_inline", key_interval=3)
    clips = [frames(6, seed) for seed in (1, 2)]
    backend = OrtBackend(keyed_export)
    want = [[r.labels for r in Pipeline(backend, make_scheduler("fixed", 3)).run(iter(c))]
            for c in clips]
    backend.close()
    server = triton_fixture.start_server(repo)
    g = triton_fixture.grpc_client_module()
    try:
        client = g.InferenceServerClient(server.grpc_url)
        for model in ("dff", "dff_inline"):
            for t in range(6):  # the two streams in turns
                for i, c in enumerate(clips):
                    image = g.InferInput("image", [1, H, W, 3], "UINT8")
                    image.set_data_from_numpy(c[t][None])
                    r = client.infer(model, [image], sequence_id=300 + i, sequence_start=t == 0,
                                     sequence_end=t == 5, client_timeout=60)
                    assert bool(r.as_numpy("is_key")[0, 0]) == (t % 3 == 0)
                    np.testing.assert_array_equal(r.as_numpy("labels")[0], want[i][t],
                                                  err_msg=f"{model} stream {i} frame {t}")
        key_runs = client.get_inference_statistics("flow_key", as_json=True)["model_stats"][0]
        assert int(key_runs.get("inference_count", 0)) == 2 * 2  # key frames 0, 3 of each
    finally:
        server.stop()


def test_dff_adapt_writes_the_pair_over_a_two_image_flow_and_back(engines, tmp_path):
    """write_learned_flow (dff-adapt's output) of RealFlowNet onto the shipped tiny export's
    two-image flow, then of a net without a cache back over it: each time both graphs of the
    previous flow are kept beside, and the export runs."""
    from dff.models import adapt
    from dff.runtime.ort_backend import OrtBackend

    if not WEIGHTS.exists():
        pytest.skip(f"no shipped {WEIGHTS.name}")
    export = shutil.copytree(engines, tmp_path / "engines")
    two_images = (export / "flow.onnx").read_bytes()
    m = load_manifest(export)
    stride, channels = int(m["stride"]), int(m["feat_channels"])
    m = adapt.write_learned_flow(export, m, load_realflow(stride, channels), {})
    assert keyed(m) and m == load_manifest(export)
    assert (export / "flow.prev.onnx").read_bytes() == two_images
    assert not (export / "flow_key.prev.onnx").exists()
    code = (export / "flow_key.onnx").read_bytes()

    def run() -> dict:
        backend = OrtBackend(export)
        try:
            pipe = Pipeline(backend, make_scheduler("fixed", 3))
            list(pipe.run(iter(frames(4))))
            return pipe.summary()["stages"]
        finally:
            backend.close()

    assert run()["key"]["count"] == 2
    m = adapt.write_learned_flow(export, m, adapt.SmallFlowNet(stride, channels), {})
    assert not keyed(m) and not (export / "flow_key.onnx").exists()
    assert (export / "flow_key.prev.onnx").read_bytes() == code
    assert [t["name"] for t in load_manifest(export)["graphs"]["flow"]["inputs"]] == [
        "image", "key_image", "key_feat"]
    assert run()["key"]["count"] == 0
