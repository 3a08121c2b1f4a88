"""dff-build --int8's calibration: feature.onnx -> feature.int8.onnx (Q/DQ) on frames of a video,
recorded in the manifest, run by ONNX Runtime, refused when missing, stale or damaged."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from dff.engines import quantize
from dff.engines.builder import tensorrt_available
from dff.engines.compat import select_engines
from dff.export.manifest import ManifestError, load_manifest, sha256_file
from dff.runtime.backends import BackendError
from dff.runtime.loaders import open_backend
from dff.runtime.ort_backend import OrtBackend
from dff.runtime.video import write_synthetic_clip

from dff.commands import build as build_cli

pytest.importorskip("onnxruntime")
pytest.importorskip("cv2", reason="video I/O needs opencv-python-headless")

H, W, T = 64, 96, 24
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "clip.mp4"
    return path, write_synthetic_clip(path, seed=3, num_frames=T, height=H, width=W)


@pytest.fixture(scope="module")
def calibrated(engines, clip, tmp_path_factory):
    """A copy of the tiny export with feature.int8.onnx calibrated on 8 frames of `clip`."""
    out = tmp_path_factory.mktemp("int8") / "engines"
    shutil.copytree(engines, out)
    lines: list[str] = []
    entry = quantize.quantize_feature(out, clip[0], frames=8, log=lines.append)
    return out, entry, lines


def fresh_copy(calibrated, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(calibrated[0], out)
    return out


def test_read_frames_spreads_calibration_and_check_frames_over_the_video(engines, clip):
    manifest = load_manifest(engines)
    calib, check = quantize.read_frames(clip[0], 6, manifest)
    assert len(calib) == 6 and 1 <= len(check) <= quantize.CHECK_FRAMES
    assert all(f.shape == (1, 3, H, W) and f.dtype == np.uint8 for f in calib + check)
    # frames 0, 4, 8, ... 20 calibrate; the check frames lie between them, none reused
    assert not any(np.array_equal(a, b) for a in calib for b in check)
    resized, _ = quantize.read_frames(clip[0], 2, manifest, resize=(32, 48))
    assert resized[0].shape == (1, 3, 32, 48)


def test_a_frame_size_outside_the_profile_is_refused_with_a_resize_that_fits(engines, clip):
    with pytest.raises(quantize.DffError, match=r"--resize 128x192 .*--max-shape"):
        quantize.read_frames(clip[0], 2, load_manifest(engines), resize=(256, 384))


def test_int8_graph_is_symmetric_qdq_on_every_conv_and_recorded_in_the_manifest(
        calibrated, engines, clip):
    out, entry, lines = calibrated
    model = onnx.load(str(out / "feature.int8.onnx"))
    # standard ONNX only, for TensorRT's parser: no ONNX Runtime domains left by its optimizer
    assert {n.domain for n in model.graph.node} == {""}
    assert [o.domain for o in model.opset_import] == [""]
    onnx.checker.check_model(model, full_check=True)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    produced_by = {o: n for n in model.graph.node for o in n.output}
    for conv in convs:  # activation and weight both come through DequantizeLinear
        assert all(produced_by[x].op_type == "DequantizeLinear" for x in conv.input[:2]), conv.name
    zero_points = [consts[n.input[2]] for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    dequantized = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    int32 = [x for x in dequantized if x in consts and consts[x].dtype != np.int8]
    assert not int32, f"TensorRT dequantizes only 8-bit tensors: {int32}"
    assert all(len(conv.input) < 3 or conv.input[2] in consts for conv in convs)  # float bias
    manifest = load_manifest(out)  # checks the new file's sha256 too
    assert manifest["graphs"]["feature"]["int8"] == entry
    assert entry["sha256"] == sha256_file(out / entry["file"])
    assert entry["source_sha256"] == load_manifest(engines)["graphs"]["feature"]["sha256"]
    assert entry["calibration"] == {"video": str(clip[0]), "video_sha256": sha256_file(clip[0]),
                                    "frames": 8, "size": [H, W]}
    assert entry["check"]["frames"] >= 1 and 0 < entry["check"]["relative_rms_error"] < 0.1
    assert entry["check"]["arithmetic"] == quantize.ARITHMETIC and entry["reduce_range"] is False
    frames = np.load(out / entry["check"]["frames_file"]["file"])
    assert frames.shape == (entry["check"]["frames"], 3, H, W) and frames.dtype == np.uint8
    weights = [consts[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"
               and n.input[0] in consts and consts[n.input[0]].ndim == 4]
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == 127  # full 8 bits
    assert "relative RMS error" in lines[-1] and "simulated" in lines[-1]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left"


def test_the_recorded_error_is_the_graphs_own_the_same_on_every_cpu(calibrated):
    """The manifest's figure is Q/DQ arithmetic in float, not ONNX Runtime's fused int8 kernels
    (which saturate on x86 CPUs without VNNI): onnx's NumPy reference evaluator, which has no
    CPU-specific kernels, gives the same figure from the kept check frames."""
    from onnx.reference import ReferenceEvaluator

    out, entry, _ = calibrated
    frames = np.load(out / entry["check"]["frames_file"]["file"])
    ref = ReferenceEvaluator(str(out / "feature.onnx"))
    q = ReferenceEvaluator(str(out / "feature.int8.onnx"))
    sq_err = sq_ref = 0.0
    for frame in frames:
        a = ref.run(None, {"image": frame[None]})[0].astype(np.float64)
        b = q.run(None, {"image": frame[None]})[0].astype(np.float64)
        sq_err, sq_ref = sq_err + np.square(b - a).sum(), sq_ref + np.square(a).sum()
    assert abs(np.sqrt(sq_err / sq_ref) - entry["check"]["relative_rms_error"]) < 1e-3


def test_an_int8_backend_measures_its_own_kernels_against_the_graphs_error(calibrated):
    """Depends on the CPU: ONNX Runtime's fused x86 int8 kernels match the graph's Q/DQ
    arithmetic with VNNI (AVX-512 VNNI, AVX-VNNI) and saturate without it (AVX2 only, e.g. AMD
    EPYC Rome: 13 % against the graph's 8 % here). Either way the backend measures its own
    kernels on the check frames, and the verdict follows from that figure."""
    out, entry, _ = calibrated
    fp32 = OrtBackend(out)
    int8 = open_backend("onnxruntime-cpu", out, precision="int8")
    assert int8.precision == "int8" and fp32.precision == "fp32" and fp32.int8_check is None
    frames = np.load(out / entry["check"]["frames_file"]["file"])
    ref = np.concatenate([fp32.feature(f[None]) for f in frames]).astype(np.float64)
    got = np.concatenate([int8.feature(f[None]) for f in frames]).astype(np.float64)
    assert not np.array_equal(ref, got)  # really another graph
    rel = np.sqrt(np.square(got - ref).sum() / np.square(ref).sum())
    report, graph = int8.int8_check, entry["check"]["relative_rms_error"]
    assert report["measured"] and report["frames"] == len(frames)
    assert report["relative_rms_error"] == pytest.approx(rel, abs=1e-5)
    assert report["graph_relative_rms_error"] == graph
    assert report["ok"] == (rel <= max(1.25 * graph, graph + 0.005))
    line = quantize.describe_kernel_check(report, out)
    assert report["cpu"] in line and f"{100 * rel:.2f} %" in line
    if report["ok"]:  # an untrained model's logits are near ties, so labels flip more
        assert (fp32.task(ref[:1].astype(np.float32))["labels"] ==
                int8.task(got[:1].astype(np.float32))["labels"]).mean() > 0.9
    else:
        assert line.startswith("warning:") and "--reduce-range" in line


def test_kernels_that_lose_more_than_the_graph_are_said_in_one_line(calibrated, clip,
                                                                      tmp_path, capsys):
    from dff.commands import run as cli

    out = fresh_copy(calibrated, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["feature"]["int8"]["check"]["relative_rms_error"] = 1e-4  # as if exact
    (out / "manifest.json").write_text(json.dumps(manifest))
    code = cli.main([str(clip[0]), "--engine-dir", str(out), "--backend", "onnxruntime",
                     "--precision", "int8", "--json", str(tmp_path / "x.jsonl"), "--summary",
                     str(tmp_path / "s.json"), "--threads", "1", "--quiet", "--max-frames", "2"])
    assert code == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ONNX Runtime's int8 kernels on this CPU")
    assert "the int8 graph's own 0.01 %" in err[0] and "--precision fp32" in err[0]
    assert f"`dff-build {out}/ --int8 --calib-video VIDEO.mp4 --reduce-range`" in err[0]
    check = json.loads((tmp_path / "s.json").read_text())["int8_check"]
    assert check["measured"] and not check["ok"] and check["graph_relative_rms_error"] == 1e-4


def test_an_int8_graph_without_check_frames_runs_and_says_it_is_not_checked(calibrated,
                                                                            tmp_path):
    out = fresh_copy(calibrated, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    check = manifest["graphs"]["feature"]["int8"]["check"]
    del check["arithmetic"], check["frames_file"]  # as dff-trt 0.2.0 wrote it
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = open_backend("onnxruntime-cpu", out, precision="int8").int8_check
    assert not report["measured"]
    line = quantize.describe_kernel_check(report, out)
    assert "not checked" in line and f"`dff-build {out}/ --int8 --calib-video" in line


def test_reduce_range_gives_7_bit_weights_that_onnxruntime_runs_as_simulated(engines, clip,
                                                                              tmp_path):
    """7-bit weights keep x86 u8s8 products from saturating: ONNX Runtime's kernels then give
    the graph's own error on every CPU, VNNI or not (checked on AVX2 under emulation too)."""
    out = tmp_path / "engines"
    shutil.copytree(engines, out)
    entry = quantize.quantize_feature(out, clip[0], frames=8, reduce_range=True)
    assert entry["reduce_range"] is True and entry["method"].endswith(quantize.REDUCED)
    model = onnx.load(str(out / "feature.int8.onnx"))
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [consts[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"
               and n.input[0] in consts and consts[n.input[0]].ndim == 4]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64
    report = open_backend("onnxruntime-cpu", out, precision="int8").int8_check
    assert report["ok"]
    assert abs(report["relative_rms_error"] - report["graph_relative_rms_error"]) < 2e-3


def test_int8_without_calibration_names_the_command_that_makes_it(engines, tmp_path, capsys):
    out = tmp_path / "engines"
    shutil.copytree(engines, out)
    with pytest.raises(quantize.QuantizeError, match="has no int8 feature graph.*--calib-video"):
        open_backend("onnxruntime-cpu", out, precision="int8")
    assert build_cli.main([str(out), "--int8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"`dff-build {out}/ --int8 --calib-video VIDEO.mp4`" in err[0]


def test_a_stale_or_damaged_int8_graph_is_refused(calibrated, tmp_path):
    out = fresh_copy(calibrated, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["feature"]["int8"]["source_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(quantize.QuantizeError, match="calibrated from another feature.onnx"):
        quantize.int8_graph(out, load_manifest(out))
    (out / "feature.int8.onnx").write_bytes(b"damaged")
    with pytest.raises(ManifestError, match=r"feature.int8.onnx: sha256 .*calibrate again"):
        load_manifest(out)
    out = fresh_copy(calibrated, tmp_path / "frames")
    (out / "feature.int8.check.npy").write_bytes(b"damaged")
    with pytest.raises(ManifestError, match=r"feature.int8.check.npy: sha256 .*calibrate again"):
        load_manifest(out)


def test_an_int8_graph_onnxruntime_cannot_load_names_the_calibration_fix(calibrated, tmp_path):
    out = fresh_copy(calibrated, tmp_path)
    (out / "feature.int8.onnx").write_bytes(b"not onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["feature"]["int8"]["sha256"] = sha256_file(out / "feature.int8.onnx")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match=r"feature.int8.onnx: onnxruntime cannot load it "
                                           r".*calibrate again with `dff-build .* --int8"):
        open_backend("onnxruntime-cpu", out, precision="int8")


@pytest.mark.parametrize("kind, precision", [("torch-cpu", "int8"), ("onnxruntime-cpu", "fp16")])
def test_a_precision_the_backend_does_not_run_is_refused(engines, kind, precision):
    with pytest.raises(BackendError, match=f"--precision {precision}: the {kind} backend runs"):
        open_backend(kind, engines, precision=precision)


def test_calibration_flags_need_int8(engines, capsys):
    with pytest.raises(SystemExit) as e:
        build_cli.main([str(engines), "--calib-video", "clip.mp4"])
    assert e.value.code == 2 and "add --int8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        build_cli.main([str(engines), "--int8", "--reduce-range"])
    assert e.value.code == 2 and "add --int8 --calib-video VIDEO" in capsys.readouterr().err


def test_int8_engines_are_a_set_whose_feature_engine_comes_from_the_int8_graph(calibrated):
    out, entry, _ = calibrated
    manifest = load_manifest(out)
    gpu, trt = "NVIDIA H100 80GB HBM3", "10.13.0.35"
    engines = {}
    for graph in ("feature", "flow", "task"):
        sha = entry["sha256"] if graph == "feature" else manifest["graphs"][graph]["sha256"]
        engines[f"{graph}.int8"] = {
            "file": f"{graph}.int8.plan", "graph": graph, "precision": "int8", "gpu": gpu,
            "compute_capability": "9.0", "tensorrt": trt, "onnx_sha256": sha,
            "onnx_file": entry["file"] if graph == "feature" else f"{graph}.onnx"}
    manifest["engines"] = engines
    chosen = select_engines(manifest, gpu, "9.0", trt, directory=out)
    assert chosen["feature"]["onnx_file"] == "feature.int8.onnx"
    engines["feature.int8"]["onnx_sha256"] = manifest["graphs"]["feature"]["sha256"]
    with pytest.raises(quantize.DffError, match="built from another feature.onnx"):
        select_engines(manifest, gpu, "9.0", trt, directory=out)


def test_dff_run_precision_int8_runs_the_int8_graph_and_says_so(calibrated, clip, tmp_path):
    import contextlib
    import io

    from dff.commands import run as cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([str(clip[0]), "--engine-dir", str(calibrated[0]), "--backend",
                         "onnxruntime", "--precision", "int8", "--json",
                         str(tmp_path / "x.jsonl"), "--summary", str(tmp_path / "s.json"),
                         "--threads", "1", "--quiet", "--max-frames", "4"])
    assert code == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["backend"], summary["precision"], summary["frames"]) == (
        "onnxruntime-cpu", "int8", 4)
    assert summary["int8_check"]["measured"]
    assert "on onnxruntime-cpu (int8)" in out.getvalue()


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
@pytest.mark.parametrize("calibrate", [True, False])
def test_dff_export_int8_calibrates_after_exporting_and_says_what_it_wrote(
        tiny_export, clip, tmp_path, capsys, calibrate):
    from dff.commands import export as export_cli

    out = tmp_path / "engines"
    calib = ["--calib-video", str(clip[0]), "--calib-frames", "4"] if calibrate else []
    code = export_cli.main([str(tiny_export[0]), "-o", str(out), "--int8", *calib])
    stdout = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    wrote, then = (("the ONNX graphs and feature.int8.onnx", "--int8") if calibrate else
                   ("the ONNX graphs", "--int8 --calib-video VIDEO.mp4"))
    assert stdout[-1] == (f"TensorRT is not installed: wrote {wrote} only; build engines later "
                          f"with dff-build {out} {then} on a machine with TensorRT")
    int8 = load_manifest(out)["graphs"]["feature"].get("int8")
    assert (int8["calibration"]["frames"] == 4) if calibrate else int8 is None
