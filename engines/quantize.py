"""feature.onnx -> feature.int8.onnx: int8 Q/DQ nodes calibrated on frames of a video.

TensorRT 10 deprecates implicit int8 calibration (IInt8Calibrator) in favour of explicit
quantization: QuantizeLinear/DequantizeLinear pairs in the ONNX graph carry the scales, and
TensorRT runs int8 kernels where they sit. So `dff-build --int8 --calib-video VIDEO` calibrates
here, on the CPU, with ONNX Runtime's static quantizer, in the form TensorRT reads: symmetric
int8 activations (scale = max |x| over the calibration frames / 127, zero point 0) on the
inputs of every convolution, and symmetric int8 weights per output channel; biases stay float
(TensorRT dequantizes only 8-bit tensors and folds the bias into the int8 convolution).

The manifest records the graph's own error: Q/DQ simulated in float (ONNX Runtime with graph
optimizations off, the arithmetic TensorRT's int8 path models), the same on every CPU. ONNX
Runtime's fused x86 int8 kernels (`dff-run --precision int8`) match it only on CPUs with VNNI:
without it their u8s8 products saturate. So the check frames are kept beside the graph, and an
int8 backend measures its own kernels on them (`kernel_check`) and says when they lose more;
`--reduce-range` (7-bit weights, ONNX Runtime's remedy) is for such CPUs, not for TensorRT.

Only the feature graph is quantized: it is nearly all of a key frame's cost. The flow net
regresses sub-cell motion and the head is cheap, so an int8 engine set keeps both in fp16.
Needs onnxruntime and OpenCV (to decode the video), not TensorRT.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dff.errors import DffError

from . import entries

Log = Callable[[str], None]

GRAPH = "feature"  # the one graph an int8 set quantizes
SUFFIX = ".int8.onnx"
CHECK_SUFFIX = ".int8.check.npy"  # the check frames, uint8 [n,3,H,W], kept for kernel_check
DEFAULT_FRAMES = 32
CHECK_FRAMES = 8  # frames between the calibration frames, for the int8 vs fp32 check
METHOD = ("activations: symmetric int8 per tensor, max |x| over the calibration frames; "
          "weights: symmetric int8 per output channel; on the inputs of every Conv")
REDUCED = "; weights in 7 bits (--reduce-range, for ONNX Runtime on x86 CPUs without VNNI)"
ARITHMETIC = ("Q/DQ simulated in float (ONNX Runtime, graph optimizations off): the graph's own "
              "error, the same on every CPU")
# kernel_check: a backend's int8 kernels may add this much relative RMS error to the graph's
# own before it says so (VNNI CPUs add ~1e-4; AVX2-only ones 5 points on the test graph)
KERNEL_SLACK = (1.25, 0.005)  # allowed = max(factor * graph's, graph's + points)


class QuantizeError(DffError):
    """A calibration video or graph that cannot give an int8 graph."""


def calibration_command(directory: str | os.PathLike[str]) -> str:
    """The dff-build line that (re)makes the int8 graph of `directory`."""
    return f"dff-build {os.fspath(directory).rstrip('/')}/ --int8 --calib-video VIDEO.mp4"


def read_frames(video: str | os.PathLike[str], count: int, manifest: dict[str, Any],
                resize: tuple[int, int] | None = None) -> tuple[list[np.ndarray],
                                                                 list[np.ndarray]]:
    """(calibration frames, check frames) as uint8 [1,3,H,W], spread evenly over the video:
    `count` frames to calibrate on, and up to CHECK_FRAMES taken between them. Frames are
    decoded and resized as dff-run does (`resize` HxW), and must fit the manifest's profile."""
    from dff.runtime.video import check_size, fit_frame, open_video

    if count < 1:
        raise QuantizeError(f"--calib-frames {count}: need at least 1 frame")
    reader = open_video(video)
    height, width = resize or reader.size
    profile = manifest["profile"]
    what = "--resize" if resize else f"{video} (the calibration video)"
    check_size(height, width, profile["min"], profile["max"], int(manifest["stride"]), what=what)
    total = reader.frame_count or count * 2
    # indices 0, step, 2*step ... for calibration; the midpoints between them for the check
    step = max(total / count, 1.0)
    calib_at = {int(i * step) for i in range(count)}
    check_at = {int((i + 0.5) * step) for i in range(count)} - calib_at
    check_at = set(sorted(check_at)[:: max(1, len(check_at) // CHECK_FRAMES)][:CHECK_FRAMES])
    calib: list[np.ndarray] = []
    check: list[np.ndarray] = []
    last = max(calib_at | check_at)
    with reader, _progress(last + 1) as bar:  # a long video is decoded up to `last`
        for i, frame in enumerate(reader):
            bar.update(1)
            if i in calib_at or i in check_at:
                nchw = np.ascontiguousarray(fit_frame(frame, (height, width)).transpose(2, 0, 1))
                (calib if i in calib_at else check).append(nchw[None])
            if i >= last:
                break
    if not calib:
        raise QuantizeError(f"{video}: no frame could be decoded for calibration")
    return calib, check


def _progress(total: int) -> Any:
    """tqdm's bar over the decoded frames on a terminal, else a silent stand-in."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    quiet = tqdm is None or total < 300 or not sys.stderr.isatty()
    if quiet:
        return contextlib.nullcontext(types.SimpleNamespace(update=lambda n: None))
    return tqdm(total=total, unit="frame", desc="decoding", leave=False)


def _session(path: str | os.PathLike[str], simulate: bool = False, threads: int = 0) -> Any:
    """A CPU session; `simulate` turns ONNX Runtime's graph optimizations off, so Q and DQ run
    as separate float ops instead of fused (CPU-dependent) int8 kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(0, threads)
    if simulate:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def compare(float_graph: Path, int8_graph: Path | Any, frames: list[np.ndarray],
            threads: int = 0) -> dict[str, Any]:
    """How far the int8 graph's features are from the float graph's on `frames`: relative RMS
    error (RMS of the difference / RMS of the float features), max abs error and peak. A path
    runs Q/DQ simulated in float (ARITHMETIC); a session runs that session's own kernels."""
    if not frames:
        return {"frames": 0}
    ref_s = _session(float_graph, threads=threads)
    q_s = _session(int8_graph, simulate=True, threads=threads) \
        if isinstance(int8_graph, (str, os.PathLike)) else int8_graph
    name = ref_s.get_inputs()[0].name
    sq_err = sq_ref = 0.0
    max_err = peak = 0.0
    for frame in frames:
        ref = ref_s.run(None, {name: frame})[0].astype(np.float64)
        got = q_s.run(None, {name: frame})[0].astype(np.float64)
        sq_err += float(np.square(got - ref).sum())
        sq_ref += float(np.square(ref).sum())
        max_err = max(max_err, float(np.abs(got - ref).max()))
        peak = max(peak, float(np.abs(ref).max()))
    return {"frames": len(frames), "relative_rms_error": round((sq_err / max(sq_ref, 1e-30))
                                                               ** 0.5, 5),
            "max_abs_error": round(max_err, 5), "peak": round(peak, 5)}


def _quantize(source: Path, target: Path, frames: list[np.ndarray],
              reduce_range: bool = False) -> None:
    """ONNX Runtime's static quantizer, in TensorRT's Q/DQ form, from `source` to `target`
    (with `reduce_range`, weights in 7 bits)."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise QuantizeError(f"int8 calibration needs onnxruntime's quantizer ({e}); "
                            "pip install \"onnxruntime>=1.20\"") from None

    class Frames(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(frames)

        def get_next(self) -> dict[str, np.ndarray] | None:
            frame = next(self._it, None)
            return None if frame is None else {"image": frame}

    # the quantizer's recommended first step: shape inference and ONNX Runtime's basic
    # (standard-op) graph optimizations, such as folding constants
    prepared = target.with_name("prepared." + target.name)
    quant_pre_process(os.fspath(source), os.fspath(prepared), skip_symbolic_shape=True)
    quantize_static(
        os.fspath(prepared), os.fspath(target), Frames(), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"], per_channel=True, activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        reduce_range=reduce_range,
        # TensorRT's parser refuses DequantizeLinear on int32, so biases stay float (TensorRT
        # folds them into the int8 convolution)
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                       "QuantizeBias": False})
    _drop_unused_opsets(target)


def _drop_unused_opsets(path: Path) -> None:
    """Keep only the opset imports the graph's nodes use: ONNX Runtime's optimizer declares its
    own domains (com.microsoft, ...), which a graph for TensorRT should not carry."""
    import onnx

    model = onnx.load(os.fspath(path))
    used = {node.domain for node in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.save(model, os.fspath(path))


def quantize_feature(directory: str | os.PathLike[str], video: str | os.PathLike[str], *,
                     frames: int = DEFAULT_FRAMES, resize: tuple[int, int] | None = None,
                     reduce_range: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Calibrate `directory`'s feature.onnx on `frames` frames of `video`, write
    feature.int8.onnx and its check frames beside it (atomically) and record them in the
    manifest as `graphs.feature.int8`; return that entry."""
    from dff.export.manifest import graph_path, load_manifest, sha256_file

    log = log or (lambda _: None)
    d = Path(directory)
    manifest = load_manifest(d)
    source = graph_path(d, manifest, GRAPH)
    calib, check = read_frames(video, frames, manifest, resize)
    size = list(calib[0].shape[2:])
    log(f"calibrating {source} on {len(calib)} frames of {video} at {size[0]}x{size[1]} ...")
    target, check_file = d / (GRAPH + SUFFIX), d / (GRAPH + CHECK_SUFFIX)
    with tempfile.TemporaryDirectory(prefix=".int8.", dir=d) as tmp:
        staged = Path(tmp) / target.name
        _quantize(source, staged, calib, reduce_range)
        report = compare(source, staged, check)
        data = staged.read_bytes()
    report["arithmetic"] = ARITHMETIC
    entries.write_atomic(target, data)
    if check:
        frames_bytes = _npy_bytes(np.concatenate(check))
        entries.write_atomic(check_file, frames_bytes)
        report["frames_file"] = {"file": check_file.name, "bytes": len(frames_bytes),
                                 "sha256": hashlib.sha256(frames_bytes).hexdigest()}
    elif check_file.exists():  # an earlier calibration's frames: not this graph's
        check_file.unlink()
    entry = {
        "file": target.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
        "source_sha256": manifest["graphs"][GRAPH]["sha256"],
        "method": METHOD + (REDUCED if reduce_range else ""), "reduce_range": reduce_range,
        "calibration": {"video": os.fspath(video), "video_sha256": sha256_file(video),
                        "frames": len(calib), "size": size},
        "check": report,
    }
    manifest["graphs"][GRAPH]["int8"] = entry
    entries.write_atomic(d / entries.MANIFEST, entries.manifest_bytes(manifest))
    log(f"  {target}: {len(data) / 2**20:.1f} MiB; {describe_check(report)}")
    return entry


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def describe_check(report: dict[str, Any]) -> str:
    if not report.get("frames"):
        return "no frames left over to compare the int8 graph with the float one"
    return (f"int8 vs float features on {report['frames']} frames not used for calibration "
            f"(Q/DQ simulated in float, as on every CPU): relative RMS error "
            f"{100 * report['relative_rms_error']:.2f} %, max abs error "
            f"{report['max_abs_error']:.3g} (peak {report['peak']:.3g})")


def int8_graph(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """The calibrated feature graph of a loaded manifest; QuantizeError with the command that
    makes it when there is none, or when it was made from another feature.onnx."""
    d = os.fspath(directory).rstrip("/") or "."
    info = manifest["graphs"][GRAPH]
    entry = info.get("int8")
    if not isinstance(entry, dict):
        raise QuantizeError(f"{d}/manifest.json has no int8 feature graph; make one with "
                            f"`{calibration_command(d)}`")
    if entry.get("source_sha256") != info.get("sha256"):
        raise QuantizeError(f"{d}/{entry.get('file')} was calibrated from another "
                            f"{info.get('file')}; calibrate again with `{calibration_command(d)}`")
    return Path(d) / str(entry["file"])


def kernel_check(directory: str | os.PathLike[str], manifest: dict[str, Any], session: Any,
                 threads: int = 0) -> dict[str, Any]:
    """How far `session` (a backend's int8 feature graph on this machine's ONNX Runtime
    kernels) puts the features from the float graph's, on the calibration's check frames,
    against the graph's own error recorded there; `ok` is False when the kernels lose more."""
    entry = manifest["graphs"][GRAPH]["int8"]
    recorded = entry.get("check", {})
    frames_file = recorded.get("frames_file")
    report: dict[str, Any] = {"cpu": cpu_description(), "measured": False}
    if recorded.get("arithmetic") != ARITHMETIC or not isinstance(frames_file, dict):
        report["reason"] = ("it was calibrated by an older dff-trt, which kept no check frames "
                            "and measured on its own CPU's kernels")
        return report
    from dff.export.manifest import graph_path

    d = Path(directory)
    frames = np.load(d / frames_file["file"], allow_pickle=False)
    got = compare(graph_path(d, manifest, GRAPH), session, list(frames[:, None]), threads)
    graph_error = float(recorded["relative_rms_error"])
    factor, points = KERNEL_SLACK
    allowed = max(factor * graph_error, graph_error + points)
    report.update(measured=True, frames=got["frames"],
                  relative_rms_error=got["relative_rms_error"],
                  graph_relative_rms_error=graph_error, allowed=round(allowed, 5),
                  ok=got["relative_rms_error"] <= allowed)
    return report


def describe_kernel_check(report: dict[str, Any], directory: str | os.PathLike[str]) -> str:
    """The one line dff-run and dff-profile print about an int8 backend's kernel_check."""
    if not report["measured"]:
        return (f"int8: ONNX Runtime's int8 kernels on this CPU ({report['cpu']}) not checked: "
                f"{report['reason']}; calibrate again with `{calibration_command(directory)}` "
                "to measure them")
    figures = (f"{100 * report['relative_rms_error']:.2f} % relative RMS error from the float "
               f"features, the int8 graph's own {100 * report['graph_relative_rms_error']:.2f} %")
    if report["ok"]:
        return f"int8: ONNX Runtime's int8 kernels on this CPU ({report['cpu']}): {figures}"
    return (f"warning: ONNX Runtime's int8 kernels on this CPU ({report['cpu']}) lose accuracy: "
            f"{figures} (x86 int8 products saturate without VNNI); run --precision fp32 here, "
            f"calibrate for this CPU with `{calibration_command(directory)} --reduce-range`, "
            "or run the int8 graph on TensorRT")


def cpu_description() -> str:
    """'Intel(R) Xeon(R) ..., AVX-512 VNNI' / '..., AVX2 without VNNI': the CPU and the x86
    features that decide ONNX Runtime's int8 kernels (from /proc/cpuinfo; else the platform)."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        return model
    if "avx512_vnni" in flags:
        features = "AVX-512 VNNI"
    elif "avx_vnni" in flags:
        features = "AVX-VNNI"
    elif "avx2" in flags:
        features = "AVX2 without VNNI"
    else:
        features = "no AVX2" if flags else ""
    return f"{model}, {features}" if features else model
