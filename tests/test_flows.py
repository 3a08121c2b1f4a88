"""Flow sources (runtime/flows.py, DESIGN.md §3): OpenCV DIS on the host, warped by warp.onnx;
which exports and backends have which source, the refusals, and DIS through every command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from dff.export.manifest import (
    DIS,
    LEARNED,
    ManifestError,
    default_flow,
    flow_sources,
    load_manifest,
    write_manifest,
)
from dff.models.warp import flow_warp
from dff.plugins import onnx_op
from dff.runtime.flows import DisFlow, FlowError, pick_flow
from dff.runtime.loop import Pipeline
from dff.runtime.scheduler import make_scheduler
from dff.runtime.step import Frame, Step, StreamState
from dff.runtime.video import write_synthetic_clip

from dff.commands import profile
from dff.commands import run as run_cli
from dff.files import new_file_mode

ort = pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2", reason="DIS is OpenCV's")

pytestmark = pytest.mark.usefixtures("one_thread")


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), np.uint8), (7, 7), 2)


def _shifted(n: int, dx: int, dy: int, h: int = 64, w: int = 96) -> list[np.ndarray]:
    """Frame i shows the texture moved by (-i*dx, -i*dy): a point at (x, y) in frame i is at
    (x + i*dx, y + i*dy) in frame 0."""
    base = _texture(h + n * abs(dy) + 1, w + n * abs(dx) + 1)
    return [np.ascontiguousarray(base[i * dy:i * dy + h, i * dx:i * dx + w]) for i in range(n)]


@pytest.fixture
def old_style(engines, tmp_path):
    """The tiny export as a manifest written before flow sources: no `flow`, no warp graph."""
    out = shutil.copytree(engines, tmp_path / "old")
    m = json.loads((out / "manifest.json").read_text())
    del m["flow"], m["graphs"]["warp"]
    (out / "warp.onnx").unlink()
    write_manifest(out / "manifest.json", m)
    return out


@pytest.fixture
def dis_only(engines, tmp_path):
    """The tiny export as an --onnx export is: no learned flow graph, DIS by default."""
    out = shutil.copytree(engines, tmp_path / "dis")
    m = json.loads((out / "manifest.json").read_text())
    del m["graphs"]["flow"]
    (out / "flow.onnx").unlink()
    m["flow"] = {"sources": [DIS], "default": DIS}
    write_manifest(out / "manifest.json", m)
    return out


def test_dis_flow_points_from_the_current_frame_to_the_key_frame_in_cells():
    frames = _shifted(4, dx=2, dy=1)
    for scale in (1.0, 0.5):
        dis = DisFlow(scale=scale)
        flow = dis.flow(dis.prepare(frames[3]), dis.prepare(frames[0]), (8, 12))  # stride 8
        assert flow.shape == (2, 8, 12) and flow.dtype == np.float32
        inner = flow[:, 2:-2, 2:-2]  # away from the borders, where content leaves the frame
        assert np.median(inner[0]) * 8 == pytest.approx(6, abs=0.5), scale  # 3 frames x 2 px
        assert np.median(inner[1]) * 8 == pytest.approx(3, abs=0.5), scale


def test_warp_graph_is_flow_warp_with_scale_one_in_standard_onnx():
    model = onnx_op.warp_graph(5)
    assert {n.domain for n in model.graph.node} == {""}  # no custom op: no plugin needed
    session = ort.InferenceSession(model.SerializeToString())
    rng = np.random.default_rng(0)
    feat = rng.standard_normal((2, 5, 7, 9), np.float32)
    flow = rng.standard_normal((2, 2, 7, 9), np.float32) * 3
    got = session.run(None, {"key_feat": feat, "flow": flow})[0]
    want = flow_warp(torch.from_numpy(feat), torch.from_numpy(flow)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_exports_list_their_flow_sources_and_older_manifests_still_load(engines, old_style,
                                                                        dis_only):
    m = load_manifest(engines)
    assert flow_sources(m) == [LEARNED, DIS] and default_flow(m) == LEARNED
    assert m["graphs"]["warp"]["file"] == onnx_op.WARP_FILE
    old = load_manifest(old_style)
    assert flow_sources(old) == [LEARNED] and default_flow(old) == LEARNED
    m = load_manifest(dis_only)
    assert flow_sources(m) == [DIS] and default_flow(m) == DIS


def test_manifest_refuses_flow_sources_without_their_graph(dis_only):
    m = json.loads((dis_only / "manifest.json").read_text())
    m["flow"] = {"sources": [LEARNED, DIS], "default": DIS}
    write_manifest(dis_only / "manifest.json", m)
    with pytest.raises(ManifestError, match=r"'graphs.flow' is missing, but the flow source "
                                            r"'learned' needs it"):
        load_manifest(dis_only)
    m["flow"] = {"sources": ["farneback"], "default": "farneback"}
    write_manifest(dis_only / "manifest.json", m)
    with pytest.raises(ManifestError, match=r"'flow.sources' is \['farneback'\], expected a "
                                            r"list of some of learned, dis"):
        load_manifest(dis_only)


def test_pick_flow_refuses_what_the_export_lacks_naming_the_fix(engines, old_style, dis_only):
    assert pick_flow(None, load_manifest(engines), "e") is None  # its default: learned
    assert isinstance(pick_flow(DIS, load_manifest(engines), "e"), DisFlow)
    assert isinstance(pick_flow(None, load_manifest(dis_only), "d"), DisFlow)
    with pytest.raises(FlowError, match="predates --flow dis; re-export it"):
        pick_flow(DIS, load_manifest(old_style), "old")
    with pytest.raises(FlowError, match="has no learned flow graph.*run it with --flow dis"):
        pick_flow(LEARNED, load_manifest(dis_only), "d")
    with pytest.raises(FlowError, match="--dis-scale 0: expected a fraction"):
        pick_flow(DIS, load_manifest(engines), "e", scale=0)


def test_dis_step_on_onnxruntime_matches_the_torch_reference(tiny_export):
    from dff.models.checkpoint import load_checkpoint
    from dff.runtime.ort_backend import OrtBackend
    from dff.runtime.torch_backend import TorchBackend

    checkpoint, engine_dir = tiny_export
    frames = _shifted(6, dx=1, dy=1)
    feats = {}
    for name, backend in (("ort", OrtBackend(engine_dir)),
                          ("torch", TorchBackend(load_checkpoint(checkpoint)))):
        assert DIS in backend.flow_sources
        stream, step = StreamState(make_scheduler("fixed", 10)), Step(backend, flow=DisFlow(),
                                                                      features=True)
        feats[name] = []
        for i, frame in enumerate(frames):
            f = Frame(stream, i, frame)
            step([f])
            feats[name].append(f.features)
        assert stream.key_frames == 1 and stream.key_grey is not None
    for a, b in zip(feats["ort"], feats["torch"]):
        np.testing.assert_allclose(a, b, atol=2e-4 * max(1.0, float(np.abs(b).max())))
    assert not np.allclose(feats["ort"][5], feats["ort"][0])  # warped, not copied


def test_backend_without_a_warp_graph_and_the_learned_schedule_are_refused(old_style, engines):
    from dff.runtime.ort_backend import OrtBackend

    backend = OrtBackend(old_style)
    assert backend.flow_sources == (LEARNED,) and "warp" not in backend.sessions
    with pytest.raises(Exception, match="has no warp graph.*drop --flow dis"):
        Pipeline(backend, make_scheduler("fixed", 5), flow=DisFlow())
    with pytest.raises(Exception, match="--schedule learned reads the learned flow graph's "
                                        "quality output, which --flow dis has not"):
        Pipeline(OrtBackend(engines), make_scheduler("learned", 10, key_budget=0.1),
                 flow=DisFlow())


def test_dff_run_flow_dis_on_an_export_without_a_learned_flow(dis_only, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    write_synthetic_clip(clip, seed=3, num_frames=12, height=64, width=96)
    out = tmp_path / "out.mp4"
    assert run_cli.main([str(clip), "-e", str(dis_only), "-b", "onnxruntime-cpu", "-o",
                         str(out), "--summary", str(tmp_path / "s.json"), "-k", "5"]) == 0
    printed = capsys.readouterr().out
    assert "flow dis (ultrafast, scale 0.5)" in printed and out.is_file()
    assert out.stat().st_mode & 0o777 == new_file_mode()  # not the temp file's private 0600
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["flow"] == {"source": DIS, "preset": "ultrafast", "scale": 0.5}
    assert summary["key_frames"] == 3 and summary["stages"]["flow"]["count"] == 9
    rc = run_cli.main([str(clip), "-e", str(dis_only), "-b", "onnxruntime-cpu", "-o",
                       str(tmp_path / "x.mp4"), "--flow", "learned"])
    err = capsys.readouterr().err
    assert rc == 1 and "has no learned flow graph" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.mp4").exists()


def test_dff_profile_times_dis_and_the_warp_as_stages(engines, tmp_path, capsys):
    path = tmp_path / "p.json"
    assert profile.main(["-e", str(engines), "-b", "onnxruntime-cpu", "--flow", "dis",
                         "--iterations", "3", "--warmUp", "0", "--key-intervals", "1,5",
                         "--frames", "8", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "flow (DIS+warp)" in printed and "DIS (host)" in printed
    res = json.loads(path.read_text())
    assert res["flow"]["source"] == DIS
    assert {"dis", "warp"} <= set(res["stages"]) and res["stages"]["dis"]["iterations"] == 3
    assert [r["key_frames"] for r in res["end_to_end"]] == [8, 2]
    assert profile.main(["-e", str(engines), "-b", "onnxruntime-cpu", "--flow", "dis",
                         "--iterations", "2", "--warmUp", "0", "--key-intervals", "1",
                         "--frames", "4", "--shape", "2x64x96", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["stages"]["warp"]["iterations"] == 2  # batch 2


def test_dff_export_flow_dis_records_the_default_that_dff_run_takes(tiny_export, tmp_path,
                                                                    capsys):
    from dff.commands import export as export_cmd

    out = tmp_path / "e"
    assert export_cmd.main([str(tiny_export[0]), "-o", str(out), "--flow", "dis",
                            "--dis-scale", "1", "--opt-shape", "1x64x96",
                            "--max-shape", "1x64x96"]) == 0
    m = load_manifest(out)
    assert m["flow"] == {"sources": [LEARNED, DIS], "default": DIS,
                         "dis": {"preset": "ultrafast", "scale": 1.0}}
    clip = tmp_path / "clip.mp4"
    write_synthetic_clip(clip, seed=2, num_frames=6, height=64, width=96)
    assert run_cli.main([str(clip), "-e", str(out), "-b", "onnxruntime-cpu", "-o",
                         str(tmp_path / "o.mp4"), "-k", "3"]) == 0
    assert "flow dis (ultrafast, scale 1)" in capsys.readouterr().out  # the recorded settings
    assert run_cli.main([str(clip), "-e", str(out), "-b", "onnxruntime-cpu", "-o",
                         str(tmp_path / "o.mp4"), "-k", "3", "--dis-scale", "0.5"]) == 0
    assert "flow dis (ultrafast, scale 0.5)" in capsys.readouterr().out  # the option wins
    with pytest.raises(SystemExit) as info:  # an --onnx export has no learned flow to pick
        export_cmd.main(["--onnx", "m.onnx", "--feature-output", "t", "--flow", "learned",
                         "-o", str(tmp_path / "x")])
    assert info.value.code == 2
    assert "an --onnx export has no learned flow graph" in capsys.readouterr().err


def test_triton_refuses_an_export_without_a_learned_flow_before_writing(dis_only, tmp_path):
    from dff.serve.repository import RepositoryError, write_repository

    with pytest.raises(RepositoryError, match="no learned flow graph .*runs the learned flow "
                                              "only.*dff-run --flow dis"):
        write_repository(dis_only, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_dff_run_refuses_a_flow_source_with_server(capsys):
    with pytest.raises(SystemExit) as info:  # the Triton dff model runs its learned flow
        run_cli.main(["clip.mp4", "--server", "127.0.0.1:8001", "--flow", "dis"])
    assert info.value.code == 2
    assert "--server runs the server's model; drop --flow" in capsys.readouterr().err
