"""Flow accuracy on real ground truth (issue 22): the shipped synthetic-trained flow net
against OpenCV's DIS on a real image pair with a known displacement.

The pair is scikit-image's Middlebury stereo pair (``skimage.data.stereo_motorcycle``: left,
right, and the left image's disparity, 7-60 px, inf where unknown). A point at x in the left
image is at x - d in the right one, so the disparity is horizontal flow from the left image
(current) to the right one (key): flow = (-d, 0), the direction DFF's flow takes (current ->
key: current(p) = key(p + flow(p)); models/flownet.py). DIS gets the same order,
``calc(current, key)``. The ground truth is averaged over each 16x16 cell's valid pixels. A
method's per-pixel flow is averaged over each whole cell; the flow net gives one vector per
cell (in cells: x16 for pixels). EPE in pixels, the mean over the scored cells, on the pair
cropped to multiples of 16 (its top-left 496x736). Two sets of cells are scored:

- ``EPE``: the cells whose every pixel has a disparity (592 of 1426; no occlusion edge);
- ``EPE 1/4``: the cells with at least a quarter of their pixels valid, dff-eval's rule for
  its flow EPE (models/evaluate.py): here every cell. It adds the occlusion edges, where no
  flow is right for the whole cell.

``DIS ultrafast x0.5``: DIS as ``--flow dis`` runs it by default (runtime/flows.py
DisFlow: grey frames shrunk to half size, the flow resized back, cost included): the
reference at the input scale of a net that sees half-size images.

``wrong sign``: the EPE against (+d, 0), the other direction; ``mean fx``: the method's mean
horizontal flow over the scored cells (the truth's is -38.5 px). A method run the other
way round shows up in both.

Cost: the median of repeated runs of each method alone (DIS: ``calc`` on grey frames; the net:
``DFF.flow`` in PyTorch, no grad), ``--threads`` (2) for OpenCV and PyTorch, at the pair's size
and at 128x224 and 576x1024 (the pair resized). Ratios are against the flow net at the same
size, from the same run.

``real flow net`` (issue 23): RealFlowNet at stride 16 with the shipped pretrained weights
(models/realflow.py, models/weights/realflow.pth; ``--realflow`` for others), EPE from
PyTorch; its cost is on ONNX Runtime's CPU provider (``--threads`` intra-op threads), the net
exported once with torch.onnx (dynamo, opset 20, dynamic height and width), both images
normalised on the host outside the timing. ``real flow net x0.5``: the same at input scale 0.5
(the images average-pooled 2x inside the net: dff-adapt's default from 512 px on the shorter
side).
``--adapted ENGINE_DIR``: a row for the net dff-adapt wrote into that export (the net its
ENGINE_DIR/adapt/checkpoint.pt chose, at the input scale it was trained at), at stride 16;
trained at another input scale than 1, a second row (``x1``) runs the same weights on the
whole images.

    pip install scikit-image          # benchmark-only (pyproject's `bench` extra)
    python benchmarks/flow_accuracy.py [--checkpoint MODEL.pth] [--repeats 15] [--threads 2]

On a machine whose cores are busy with other work, PyTorch's 2 threads stall now and then
(hundreds of ms a call); OpenCV's do not. ``--threads 1`` gives steadier numbers there.

About 30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import cv2
import numpy as np
import torch

STRIDE = 16
DIS_PRESETS = {"DIS ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
               "DIS fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "DIS medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
SIZES = ((128, 224), (576, 1024))


def stereo_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """left, right (RGB uint8), the ground-truth flow left -> right [2,H,W] in px and its
    validity [H,W], cropped to multiples of STRIDE."""
    try:
        from skimage.data import stereo_motorcycle
    except ImportError:
        raise SystemExit("flow_accuracy: scikit-image is needed: pip install scikit-image") \
            from None
    left, right, disp = stereo_motorcycle()
    h, w = (s - s % STRIDE for s in disp.shape)
    left, right, disp = left[:h, :w], right[:h, :w], disp[:h, :w]
    valid = np.isfinite(disp)
    flow = np.stack([np.where(valid, -disp, 0.0), np.zeros_like(disp)]).astype(np.float32)
    return left, right, flow, valid


def cell_mean(flow: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[2,H,W] px -> the mean over each STRIDE x STRIDE cell's valid pixels [2,h,w] (all pixels
    where `valid` is None), and each cell's count of them [h,w]."""
    _, h, w = flow.shape
    blocks = (h // STRIDE, STRIDE, w // STRIDE, STRIDE)
    v = np.ones((h, w), bool) if valid is None else valid
    count = v.reshape(blocks).sum((1, 3))
    return (flow * v).reshape((2,) + blocks).sum((2, 4)) / np.maximum(count, 1), count


def epe(pred_cells: np.ndarray, target_cells: np.ndarray, mask: np.ndarray) -> float:
    return float(np.linalg.norm(pred_cells - target_cells, axis=0)[mask].mean())


def grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def dis_flow(preset: int, current: np.ndarray, key: np.ndarray) -> np.ndarray:
    """DIS flow current -> key [2,H,W] in px on grey frames."""
    flow = cv2.DISOpticalFlow_create(preset).calc(grey(current), grey(key), None)
    return flow.transpose(2, 0, 1)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H,W,3] -> float [1,3,H,W] on the 0..255 scale, as DFF takes its images (it
    subtracts its mean inside: DFF.flow)."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None]


def net_flow(model, current: np.ndarray, key: np.ndarray) -> np.ndarray:
    """The flow net's flow current -> key [2,h,w] in px (cells x stride)."""
    with torch.no_grad():
        flow, _ = model.flow(to_tensor(current), to_tensor(key))
    return flow[0].numpy() * model.config.stride


class realflow_runner:
    """RealFlowNet at stride 16: ``run(current, key)`` -> flow [2,h,w] px from PyTorch for the
    EPE; ``inputs(current, key)`` the normalised arrays and ``run`` on arrays the ONNX Runtime
    session's flow (for the cost)."""

    def __init__(self, weights: str | None, threads: int, input_scale: float = 1.0,
                 state: dict | None = None):
        import tempfile

        import onnxruntime as ort
        from dff.models.realflow import load_realflow

        # a dff-adapt net's `state`: its own scale head does not matter here
        self.net = load_realflow(STRIDE, 1, state if state is not None else weights,
                                 input_scale=input_scale).eval()
        example = torch.zeros(1, 3, 128, 224)
        dims = {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
        with torch.no_grad():
            program = torch.onnx.export(self.net, (example, example), dynamo=True,
                                        opset_version=20, input_names=["image", "key"],
                                        output_names=["flow", "scale"],
                                        dynamic_shapes=(dims, dims), verbose=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/realflow.onnx"
            program.save(path)
            self.session = ort.InferenceSession(path, options,
                                                providers=["CPUExecutionProvider"])

    @staticmethod
    def inputs(current: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tuple((to_tensor(x) * (1.0 / 255.0) - 0.5).numpy() for x in (current, key))

    def __call__(self, current: np.ndarray, key: np.ndarray) -> np.ndarray:
        if current.dtype == np.uint8:  # the EPE: PyTorch on RGB frames
            return realflow_px(self.net, current, key)
        return self.session.run(["flow"], {"image": current, "key": key})[0][0] * STRIDE


def realflow_px(net, current: np.ndarray, key: np.ndarray) -> np.ndarray:
    """A RealFlowNet's flow current -> key [2,h,w] in px (cells x STRIDE), PyTorch on RGB uint8
    frames."""
    cur, k = (torch.from_numpy(x) for x in realflow_runner.inputs(current, key))
    with torch.no_grad():
        return net(cur, k)[0][0].numpy() * STRIDE


def scaled_dis_px(dis, current: np.ndarray, key: np.ndarray) -> np.ndarray:
    """`dis` (runtime/flows.py DisFlow) as ``--flow dis`` runs it: flow current -> key [2,H,W]
    in px of the RGB frames' size."""
    return dis.pixels(dis.prepare(current), dis.prepare(key), current.shape[:2]).transpose(2, 0, 1)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    from dff.export.exporter import demo_checkpoint
    from dff.models.checkpoint import load_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a DFF checkpoint (default: the shipped demo model)")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per method and size")
    p.add_argument("--threads", type=int, default=2, help="OpenCV's and PyTorch's threads")
    p.add_argument("--realflow", help="RealFlowNet weights (default: the shipped "
                   "models/weights/realflow.pth)")
    p.add_argument("--adapted", action="append", default=[], metavar="ENGINE_DIR",
                   help="add the flow net dff-adapt wrote into this export (repeatable)")
    args = p.parse_args(argv)
    cv2.setNumThreads(args.threads)
    torch.set_num_threads(args.threads)

    model = load_checkpoint(args.checkpoint or demo_checkpoint()).eval()
    assert model.config.stride == STRIDE, model.config.stride
    left, right, gt, valid = stereo_pair()
    target, count = cell_mean(gt, valid)
    mask = count == STRIDE * STRIDE
    quarter = count >= STRIDE * STRIDE / 4
    wrong = target * np.array([-1.0, 1.0], np.float32)[:, None, None]
    h, w = valid.shape
    print(f"stereo_motorcycle cropped to {h}x{w}: disparity {-gt[0][valid].max():.1f} to "
          f"{-gt[0][valid].min():.1f} px (flow left -> right); {int(mask.sum())} of "
          f"{mask.size} cells all valid (EPE), {int(quarter.sum())} at least 1/4 valid "
          f"(EPE 1/4); true mean fx {target[0][mask].mean():.1f} px")

    def pairs(size):
        if size is None:
            return left, right
        return tuple(cv2.resize(x, size[::-1], interpolation=cv2.INTER_AREA)
                     for x in (left, right))

    runners = {"real flow net": realflow_runner(args.realflow, args.threads),
               "real flow net x0.5": realflow_runner(args.realflow, args.threads, 0.5)}
    for folder in args.adapted:
        blob = torch.load(f"{folder}/adapt/checkpoint.pt", map_location="cpu",
                          weights_only=False)
        scale, state = float(blob.get("input_scale", 1.0)), blob.get("best_net") or blob["net"]
        runners[f"adapted ({folder})"] = realflow_runner(None, args.threads, scale, state)
        if scale != 1.0:  # the same weights on the whole images: the flow they learnt, apart
            # from what half-size images lose
            runners[f"adapted ({folder}) x1"] = realflow_runner(None, args.threads, 1.0, state)
    from dff.runtime.flows import DEFAULT_PRESET, DEFAULT_SCALE, DisFlow

    deployed = DisFlow()  # dff-dis's default: the preset on frames shrunk to DEFAULT_SCALE
    methods = {"zero flow": None, **DIS_PRESETS,
               f"DIS {DEFAULT_PRESET} x{DEFAULT_SCALE:g}": "dis-deployed",
               "flow net (shipped)": "net",
               **{name: "real" for name in runners}}
    resized = [pairs(size) for size in (None, *SIZES)]
    rows = []
    for name, how in methods.items():
        if how is None:
            pred = np.zeros_like(target)
            costs = [0.0] * len(resized)
        else:
            if how == "net":
                def run(cur, key):
                    return net_flow(model, cur, key)
            elif how == "real":
                run = real_run = runners[name]
            elif how == "dis-deployed":
                run = functools.partial(scaled_dis_px, deployed)
            else:
                def run(cur, key, preset=how):
                    return dis_flow(preset, cur, key)
            flow = run(left, right)
            pred = flow if how in ("net", "real") else cell_mean(flow)[0]
            if how == "real":
                costs = [median_ms(functools.partial(run, *real_run.inputs(*pair)), args.repeats)
                         for pair in resized]
            else:
                costs = [median_ms(functools.partial(run, *pair), args.repeats)
                         for pair in resized]
        rows.append((name, epe(pred, target, mask), epe(pred, target, quarter),
                     epe(pred, wrong, mask), float(pred[0][mask].mean()), costs))

    net_costs = next(r for r in rows if r[0] == "flow net (shipped)")[-1]
    size_names = [f"{h}x{w}", *(f"{a}x{b}" for a, b in SIZES)]
    wn = max(19, *(len(r[0]) for r in rows))
    print(f"\n{'method':<{wn}} {'EPE':>6} {'EPE 1/4':>7} {'wrong sign':>10} {'mean fx':>7}  "
          + "  ".join(f"{'ms ' + s:>11} {'/net':>5}" for s in size_names))
    for name, err, err_quarter, err_wrong, mean_fx, costs in rows:
        cells = "  ".join(f"{c:>11.2f} {c / n:>5.3f}" for c, n in zip(costs, net_costs))
        print(f"{name:<{wn}} {err:>6.2f} {err_quarter:>7.2f} {err_wrong:>10.2f} {mean_fx:>7.2f}  "
              f"{cells}")
    print(f"\n(EPE in px; cost: median of {args.repeats} runs, {args.threads} thread(s); /net: "
          "against the flow net at "
          "the same size, same run; torch " + torch.__version__ + ", OpenCV " + cv2.__version__
          + ")")


if __name__ == "__main__":
    main()
