"""Parity of the exported graphs with PyTorch: same inputs through both, compare each output.

Float outputs are compared by max absolute error against `tolerance · max(1, peak)`, peak
being the largest |value| of PyTorch's output: fp32 rounding grows with the magnitude, and
features of a ResNet reach the hundreds, where 1e-4 absolute is below fp32's resolution.
`labels` are compared by the fraction of equal pixels (an arg-max may flip where two classes
tie to rounding). Detections are compared frame by frame (`compare_detections`): a frame
matches when `num` is equal and, in its first `num` rows, `classes` are equal and `boxes` and
`scores` are within the float tolerance; the graph passes when at least MIN_EQUAL of the frames
match (TopK may swap two candidates whose scores tie to rounding). Each graph gets PyTorch's
own inputs
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
from dff.export.graphs import FeatureGraph, FlowGraph, KeyGraph, TaskGraph
from dff.export.manifest import GRAPHS
from dff.export.modules import DFFModules, Facts, exportable
from dff.models.dff import DFF

from dff import tasks
from dff.errors import DffError

TOLERANCE = 1e-4  # max abs error, for outputs whose peak |value| is at most 1
MIN_EQUAL = 0.999  # labels: fraction of pixels that must agree; detections: of frames
DETECTIONS = "detections"  # the one row per case for detection's four outputs
DETECTION_FRAMES = 1000  # detection: feature maps for task.onnx alone (feature_case)
SOURCE_FRAMES = 8  # real frames whose features those maps are made from
TOLERANCE_RULE = "max abs error <= tolerance * max(1, peak |output|)"
DETECTION_RULE = ("per frame: num equal, and in its first num rows scores within the tolerance "
                  "rule and classes equal and boxes within it, row by row, except that rows "
                  "whose scores tie within the tolerance may come in either order (and, when "
                  "all K rows are used, those tied with the last may be other candidates); "
                  "passes when >= min_equal of the frames of each case do")

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
    metric: str  # "max|err|", "equal" (fraction of pixels) or "frames" (fraction of frames)
    value: float
    tolerance: float  # the effective one: scaled by the peak for "max|err|"
    passed: bool
    peak: float = 1.0  # largest |value| of PyTorch's output (floats; detections: boxes)
    detail: str = ""  # detections: the worst box and score errors and the frame count


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
def torch_outputs(model: DFF | DFFModules, case: Case,
                  facts: Facts | None = None) -> tuple[dict, dict]:
    """Per graph, the feeds and PyTorch's outputs for one case (task: the contract's outputs,
    and for segmentation `probs` too)."""
    mods, facts = exportable(model, facts)
    image, key = torch.from_numpy(case.image), torch.from_numpy(case.key_image)
    feature, flow = FeatureGraph(mods, facts).eval(), FlowGraph(mods, facts).eval()
    probs = tasks.OPTIONAL[mods.kind] == ("probs",)
    task = TaskGraph(mods, facts, probs=probs).eval()
    feat = feature(image)
    key_feat = feature(key)
    feeds: dict[str, dict[str, np.ndarray]] = {}
    refs: dict[str, dict[str, np.ndarray]] = {}
    if flow.keyed:  # flow_key.onnx, then flow.onnx on PyTorch's key_code
        code = KeyGraph(mods, facts).eval()(key)
        feeds["flow_key"], refs["flow_key"] = ({"key_image": case.key_image},
                                               {"key_code": code.numpy()})
        flow_out = flow(image, code, key_feat)
        key_feeds = {"key_code": code.numpy()}
    else:
        flow_out = flow(image, key, key_feat)
        key_feeds = {"key_image": case.key_image}
    names = tasks.output_names(mods.kind) + ["probs"] * probs
    feeds |= {"feature": {"image": case.image},
              "flow": {"image": case.image, **key_feeds, "key_feat": key_feat.numpy()},
              "task": {"feat": feat.numpy()}}
    refs |= {"feature": {"feat": feat.numpy()},
             "flow": {k: v.numpy() for k, v in zip(("flow", "scale", "feat", "quality"),
                                                    flow_out)},
             "task": {k: v.numpy() for k, v in zip(names, task(feat))}}
    return feeds, refs


def compare(graph: str, output: str, case: str, ref: np.ndarray, got: np.ndarray | None,
            tolerance: float = TOLERANCE, min_equal: float = MIN_EQUAL) -> Row:
    if ref.dtype == np.uint8:
        if got is None or got.shape != ref.shape or got.dtype != ref.dtype:
            return Row(graph, output, case, "equal", math.nan, min_equal, False)
        value = float(np.mean(got == ref)) if ref.size else 1.0
        return Row(graph, output, case, "equal", value, min_equal, value >= min_equal)
    peak = _peak(ref)
    allowed = tolerance * max(1.0, peak)
    if got is None or got.shape != ref.shape or got.dtype != ref.dtype:
        return Row(graph, output, case, "max|err|", math.nan, allowed, False, peak)
    value = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    return Row(graph, output, case, "max|err|", value, allowed, value <= allowed, peak)


def _peak(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


def compare_detections(case: str, ref: Mapping[str, np.ndarray],
                       got: Mapping[str, np.ndarray], tolerance: float = TOLERANCE,
                       min_equal: float = MIN_EQUAL) -> Row:
    """One row for detection's four outputs on one case: the fraction of frames that match
    (DETECTION_RULE), boxes and scores each within `tolerance * max(1, peak)`."""
    names = tasks.output_names(tasks.DETECTION)
    box_peak = _peak(ref["boxes"])
    if any(got.get(n) is None or got[n].shape != ref[n].shape or got[n].dtype != ref[n].dtype
           for n in names):
        return Row("task", DETECTIONS, case, "frames", math.nan, min_equal, False, box_peak,
                   "an output is missing or has another shape or dtype")
    allowed = (tolerance * max(1.0, box_peak), tolerance * max(1.0, _peak(ref["scores"])))
    frames, matched, rows, worst = len(ref["num"]), 0, 0, [0.0, 0.0]
    for i in range(frames):
        errors = _frame_errors({n: ref[n][i] for n in names}, {n: got[n][i] for n in names},
                               allowed)
        if errors is not None:
            matched, rows = matched + 1, rows + int(ref["num"][i])
            worst = [max(w, e) for w, e in zip(worst, errors)]
    value = matched / frames if frames else 1.0
    detail = (f"{matched}/{frames} frames, {rows} rows; boxes {worst[0]:.1e} <= "
              f"{allowed[0]:.1e}, scores {worst[1]:.1e} <= {allowed[1]:.1e}")
    return Row("task", DETECTIONS, case, "frames", value, min_equal, value >= min_equal,
               box_peak, detail)


def _frame_errors(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                  allowed: tuple[float, float]) -> tuple[float, float] | None:
    """(worst box error, worst score error) of one frame's first `num` rows when they match,
    else None. Scores are compared row by row (sorted, they do not depend on the order of
    ties); classes and boxes row by row too, except that rows whose scores tie within the
    tolerance may come in either order, and when all K rows are used, the rows tied with the
    last one need not be the same candidates (TopK's pick among them is arbitrary)."""
    k = int(ref["num"])
    if int(got["num"]) != k:
        return None
    box_tol, score_tol = allowed
    rs, gs = ref["scores"][:k].astype(np.float64), got["scores"][:k].astype(np.float64)
    score_err = float(np.max(np.abs(rs - gs), initial=0.0))
    if score_err > score_tol:
        return None
    rb, gb = ref["boxes"][:k].astype(np.float64), got["boxes"][:k].astype(np.float64)
    rc, gc = ref["classes"][:k], got["classes"][:k]
    diagonal = np.max(np.abs(rb - gb), axis=1, initial=0.0)
    if np.array_equal(rc, gc) and np.all(diagonal <= box_tol):
        return float(np.max(diagonal, initial=0.0)), score_err
    cut = len(ref["scores"]) == k and k > 0  # all K rows used: the last tie group is a free pick
    must = rs > rs[-1] + score_tol if cut else np.ones(k, bool)
    box = np.max(np.abs(rb[:, None] - gb[None, :]), axis=2)
    fits = (rc[:, None] == gc[None, :]) & (box <= box_tol) & (
        np.abs(rs[:, None] - gs[None, :]) <= score_tol)
    used, box_err = np.zeros(k, bool), 0.0
    for i in np.flatnonzero(must):
        free = np.flatnonzero(fits[i] & ~used)
        if not free.size:
            return None
        used[free[0]] = True
        box_err = max(box_err, float(box[i, free[0]]))
    return box_err, score_err


def check_parity(model: DFF | DFFModules, paths: Mapping[str, str | os.PathLike[str]],
                 cases: list[Case], tolerance: float = TOLERANCE, min_equal: float = MIN_EQUAL,
                 run: Runner | None = None, facts: Facts | None = None) -> list[Row]:
    """Every output of every graph in `paths` against PyTorch on every case (ORT by default)."""
    run = run or onnxruntime_runner()
    mods, facts = exportable(model, facts)
    detection = mods.kind == tasks.DETECTION
    rows = []
    for case in cases:
        feeds, refs = torch_outputs(mods, case, facts)
        for graph in GRAPHS:
            if graph not in paths or graph not in feeds:  # (flow_key: a keyed flow's only)
                continue
            got = run(graph, os.fspath(paths[graph]), feeds[graph])
            if graph == "task" and detection:
                rows.append(compare_detections(case.name, refs[graph], got, tolerance,
                                               min_equal))
                continue
            rows += [compare(graph, name, case.name, ref, got.get(name), tolerance, min_equal)
                     for name, ref in refs[graph].items()
                     if name in got or name not in OPTIONAL]
    return rows


def feature_case(model: DFF | DFFModules, shape: tuple[int, int, int],
                 frames: int = DETECTION_FRAMES, seed: int = 0) -> Case:
    """`frames` feature maps [F,C,h,w] for the task graph alone (in `Case.image`; no key
    image), so that detection's 99.9 % of frames allows a miss: PyTorch's features of
    SOURCE_FRAMES synthetic-clip frames at HxW, blended two by two with random weights and
    shifted cyclically by whole cells. Many plausible heat maps for the cost of eight trunk
    runs."""
    from dff.data.synthetic import make_clip

    _, h, w = shape
    clip = make_clip(seed + 1, SOURCE_FRAMES, h, w).frames.transpose(0, 3, 1, 2)
    with torch.no_grad():
        source = FeatureGraph(model).eval()(torch.from_numpy(np.ascontiguousarray(clip)))
    feats = source.numpy()
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, SOURCE_FRAMES, (2, frames))
    t = rng.uniform(0, 1, (frames, 1, 1, 1)).astype(np.float32)
    mixed = (1 - t) * feats[a] + t * feats[b]
    dy, dx = rng.integers(0, feats.shape[2], frames), rng.integers(0, feats.shape[3], frames)
    out = np.stack([np.roll(m, (y, x), axis=(1, 2)) for m, y, x in zip(mixed, dy, dx)])
    name = f"features {frames}x{feats.shape[2]}x{feats.shape[3]}"
    return Case(name, np.ascontiguousarray(out, dtype=np.float32), np.empty(0, np.uint8))


def check_task_frames(model: DFF | DFFModules, path: str | os.PathLike[str], case: Case,
                      tolerance: float = TOLERANCE, min_equal: float = MIN_EQUAL,
                      run: Runner | None = None, batch: int = 100,
                      facts: Facts | None = None) -> Row:
    """Detection's task graph against PyTorch on `feature_case`'s maps, `batch` at a time (the
    graph's N when that is fixed)."""
    run = run or onnxruntime_runner()
    mods, facts = exportable(model, facts)
    task = TaskGraph(mods, facts).eval()
    names = tasks.output_names(mods.kind)
    refs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    gots: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(case.image), batch):
        feat = case.image[start:start + batch]
        with torch.no_grad():
            ref = dict(zip(names, (v.numpy() for v in task(torch.from_numpy(feat)))))
        got = run("task", os.fspath(path), {"feat": feat})
        for n in names:
            refs[n].append(ref[n])
            if n in got:
                gots[n].append(got[n])
    joined = {n: np.concatenate(v) for n, v in gots.items() if v}
    return compare_detections(case.name, {n: np.concatenate(v) for n, v in refs.items()},
                              joined, tolerance, min_equal)


def format_table(rows: list[Row]) -> str:
    """The parity table dff-export prints; a `detail` column only when a row has one."""
    head = ("graph", "output", "frames", "max abs error", "peak |ref|", "tolerance", "result",
            "detail")
    share = {"equal": "equal", "frames": "of frames match"}
    body = [(r.graph, r.output, r.case,
             f"{100 * r.value:.3f}% {share[r.metric]}" if r.metric in share else f"{r.value:.2e}",
             "-" if r.metric == "equal" else f"{r.peak:.3g}",
             f">= {100 * r.tolerance:g}%" if r.metric in share else f"<= {r.tolerance:.2e}",
             "pass" if r.passed else "FAIL", r.detail) for r in rows]
    if not any(r.detail for r in rows):
        head, body = head[:-1], [line[:-1] for line in body]
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
