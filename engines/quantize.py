"""feature.onnx -> feature.int8.onnx: int8 Q/DQ nodes calibrated on frames of a video.

TensorRT 10 deprecates implicit int8 calibration (IInt8Calibrator) in favour of explicit
quantization: QuantizeLinear/DequantizeLinear pairs in the ONNX graph carry the scales, and
TensorRT runs int8 kernels where they sit. So `dff-build --int8 --calib-video VIDEO` calibrates
here, on the CPU, with ONNX Runtime's static quantizer, in the form TensorRT reads: symmetric
int8 activations (scale = max |x| over the calibration frames / 127, zero point 0) on the
inputs of every convolution, and symmetric int8 weights per output channel; biases stay float
(TensorRT dequantizes only 8-bit tensors and folds the bias into the int8 convolution). The
same graph runs on ONNX Runtime (`dff-run --precision int8`), which is how its accuracy is
measured on a machine without a GPU.

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
DEFAULT_FRAMES = 32
CHECK_FRAMES = 8  # frames between the calibration frames, for the int8 vs fp32 check
METHOD = ("activations: symmetric int8 per tensor, max |x| over the calibration frames; "
          "weights: symmetric int8 per output channel; on the inputs of every Conv")


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


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def compare(float_graph: Path, int8_graph: Path, frames: list[np.ndarray]) -> dict[str, Any]:
    """How far the int8 graph's features are from the float graph's on `frames`: relative RMS
    error (RMS of the difference / RMS of the float features), max abs error and peak."""
    if not frames:
        return {"frames": 0}
    ref_s, q_s = _session(float_graph), _session(int8_graph)
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


def _quantize(source: Path, target: Path, frames: list[np.ndarray]) -> None:
    """ONNX Runtime's static quantizer, in TensorRT's Q/DQ form, from `source` to `target`."""
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
                     log: Log | None = None) -> dict[str, Any]:
    """Calibrate `directory`'s feature.onnx on `frames` frames of `video`, write
    feature.int8.onnx beside it (atomically) and record it in the manifest as
    `graphs.feature.int8`; return that entry."""
    from dff.export.manifest import graph_path, load_manifest, sha256_file

    log = log or (lambda _: None)
    d = Path(directory)
    manifest = load_manifest(d)
    source = graph_path(d, manifest, GRAPH)
    calib, check = read_frames(video, frames, manifest, resize)
    size = list(calib[0].shape[2:])
    log(f"calibrating {source} on {len(calib)} frames of {video} at {size[0]}x{size[1]} ...")
    target = d / (GRAPH + SUFFIX)
    with tempfile.TemporaryDirectory(prefix=".int8.", dir=d) as tmp:
        staged = Path(tmp) / target.name
        _quantize(source, staged, calib)
        report = compare(source, staged, check)
        data = staged.read_bytes()
    entries.write_atomic(target, data)
    entry = {
        "file": target.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
        "source_sha256": manifest["graphs"][GRAPH]["sha256"], "method": METHOD,
        "calibration": {"video": os.fspath(video), "video_sha256": sha256_file(video),
                        "frames": len(calib), "size": size},
        "check": report,
    }
    manifest["graphs"][GRAPH]["int8"] = entry
    entries.write_atomic(d / entries.MANIFEST, entries.manifest_bytes(manifest))
    log(f"  {target}: {len(data) / 2**20:.1f} MiB; {describe_check(report)}")
    return entry


def describe_check(report: dict[str, Any]) -> str:
    if not report.get("frames"):
        return "no frames left over to compare the int8 graph with the float one"
    return (f"int8 vs float features on {report['frames']} frames not used for calibration: "
            f"relative RMS error {100 * report['relative_rms_error']:.2f} %, max abs error "
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
