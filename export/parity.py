"""Parity of the exported graphs with PyTorch: same inputs through both, compare each output.

Float outputs are compared by max absolute error against `tolerance · max(1, peak)`, peak
being the largest |value| of PyTorch's output: fp32 rounding grows with the magnitude, and
features of a ResNet reach the hundreds, where 1e-4 absolute is below fp32's resolution.
`labels` are compared by the fraction of equal pixels (an arg-max may flip where two classes
tie to rounding). Each graph gets PyTorch's own inputs
(the flow graph PyTorch's key features, the task graph PyTorch's features), so errors do not
compound from graph to graph and each row measures one graph.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from dff.export.graphs import FeatureGraph, FlowGraph, TaskGraph
from dff.export.manifest import GRAPHS
from dff.models.dff import DFF

from dff.errors import DffError

TOLERANCE = 1e-4  # max abs error, for outputs whose peak |value| is at most 1
MIN_EQUAL = 0.999  # labels: fraction of pixels that must agree

# run(graph name, path, feeds) -> outputs by name
Runner = Callable[[str, str, Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class ParityError(DffError):
    """An exported graph disagrees with PyTorch beyond the tolerance."""


@dataclass(frozen=True)
class Case:
    """One set of frames: image and key_image uint8 [N,3,H,W]."""
    name: str
    image: np.ndarray
    key_image: np.ndarray


@dataclass(frozen=True)
class Row:
    graph: str
    output: str
    case: str
    metric: str  # "max|err|" or "equal"
    value: float
    tolerance: float  # the effective one: scaled by the peak for "max|err|"
    passed: bool
    peak: float = 1.0  # largest |value| of PyTorch's output (floats)


def random_case(shape: tuple[int, int, int], seed: int = 0) -> Case:
    n, h, w = shape
    rng = np.random.default_rng(seed)
    image, key = (rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8) for _ in range(2))
    return Case(f"random {n}x{h}x{w}", image, key)


def clip_case(shape: tuple[int, int, int], seed: int = 0, gap: int = 2) -> Case:
    """Real frames: key frame t and current frame t+gap of a synthetic clip, N pairs."""
    from dff.data.synthetic import make_clip

    n, h, w = shape
    frames = make_clip(seed, n + gap, h, w).frames.transpose(0, 3, 1, 2)  # [T,3,H,W]
    image = np.ascontiguousarray(frames[gap:gap + n])
    key = np.ascontiguousarray(frames[:n])
    return Case(f"clip {n}x{h}x{w}", image, key)


def default_cases(shape: tuple[int, int, int], seed: int = 0) -> list[Case]:
    return [random_case(shape, seed), clip_case(shape, seed)]


def onnxruntime_runner(threads: int | None = None) -> Runner:
    """A Runner on ONNX Runtime's CPU provider, one cached session per file."""
    import onnxruntime as ort

    sessions: dict[str, ort.InferenceSession] = {}

    def run(graph: str, path: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if path not in sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.log_severity_level = 3
            sessions[path] = ort.InferenceSession(path, options,
                                                  providers=["CPUExecutionProvider"])
        session = sessions[path]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, dict(feeds))))

    return run


OPTIONAL = {"probs"}  # outputs a graph may leave out (dff-export --probs)


@torch.no_grad()
def torch_outputs(model: DFF, case: Case) -> tuple[dict, dict]:
    """Per graph, the feeds and PyTorch's outputs for one case."""
    image, key = torch.from_numpy(case.image), torch.from_numpy(case.key_image)
    feature, flow = FeatureGraph(model).eval(), FlowGraph(model).eval()
    task = TaskGraph(model, probs=True)
    feat = feature(image)
    key_feat = feature(key)
    flow_out = flow(image, key, key_feat)
    labels, probs = task.eval()(feat)
    feeds = {"feature": {"image": case.image},
             "flow": {"image": case.image, "key_image": case.key_image,
                      "key_feat": key_feat.numpy()},
             "task": {"feat": feat.numpy()}}
    refs = {"feature": {"feat": feat.numpy()},
            "flow": {k: v.numpy() for k, v in zip(("flow", "scale", "feat"), flow_out)},
            "task": {"labels": labels.numpy(), "probs": probs.numpy()}}
    return feeds, refs


def compare(graph: str, output: str, case: str, ref: np.ndarray, got: np.ndarray | None,
            tolerance: float = TOLERANCE, min_equal: float = MIN_EQUAL) -> Row:
    if ref.dtype == np.uint8:
        if got is None or got.shape != ref.shape or got.dtype != ref.dtype:
            return Row(graph, output, case, "equal", math.nan, min_equal, False)
        value = float(np.mean(got == ref)) if ref.size else 1.0
        return Row(graph, output, case, "equal", value, min_equal, value >= min_equal)
    peak = float(np.max(np.abs(ref))) if ref.size else 0.0
    allowed = tolerance * max(1.0, peak)
    if got is None or got.shape != ref.shape or got.dtype != ref.dtype:
        return Row(graph, output, case, "max|err|", math.nan, allowed, False, peak)
    value = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    return Row(graph, output, case, "max|err|", value, allowed, value <= allowed, peak)


def check_parity(model: DFF, paths: Mapping[str, str | os.PathLike[str]], cases: list[Case],
                 tolerance: float = TOLERANCE, min_equal: float = MIN_EQUAL,
                 run: Runner | None = None) -> list[Row]:
    """Every output of every graph in `paths` against PyTorch on every case (ORT by default)."""
    run = run or onnxruntime_runner()
    rows = []
    for case in cases:
        feeds, refs = torch_outputs(model, case)
        for graph in GRAPHS:
            if graph not in paths:
                continue
            got = run(graph, os.fspath(paths[graph]), feeds[graph])
            rows += [compare(graph, name, case.name, ref, got.get(name), tolerance, min_equal)
                     for name, ref in refs[graph].items()
                     if name in got or name not in OPTIONAL]
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("graph", "output", "frames", "max abs error", "peak |ref|", "tolerance", "result")
    body = [(r.graph, r.output, r.case,
             f"{100 * r.value:.3f}% equal" if r.metric == "equal" else f"{r.value:.2e}",
             "-" if r.metric == "equal" else f"{r.peak:.3g}",
             f">= {100 * r.tolerance:g}%" if r.metric == "equal" else f"<= {r.tolerance:.2e}",
             "pass" if r.passed else "FAIL") for r in rows]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in (head, *body))


def require_pass(rows: list[Row]) -> None:
    """Raise ParityError naming every failing output."""
    failed = [r for r in rows if not r.passed]
    if failed:
        what = "; ".join(f"{r.graph}/{r.output} on {r.case}: {r.metric} {r.value:.3g}, "
                         f"allowed {r.tolerance:.3g}" for r in failed[:4])
        more = f" (+{len(failed) - 4} more)" if len(failed) > 4 else ""
        raise ParityError(f"parity check failed: {what}{more}; if the model is just large, "
                          "loosen it with --tolerance")
