"""dff-adapt's library (DESIGN.md §20): train a flow net N_flow (flow and scale field) for an
existing export on the user's own unlabelled video, and write it into the export as its learned
flow (flow.onnx).

The frozen feature graph (the export's feature.onnx, run by ONNX Runtime) is the teacher, so an
export with no PyTorch modules behind it (dff-export --onnx) can be adapted too. Training runs
on the CPU in PyTorch, on pairs (key frame t, current frame t + d), d uniform in 1..k_max:

- stage "dis": the flow net's flow against OpenCV DIS (medium) on the pair, cell-averaged to
  the feature grid (runtime/flows.py DisFlow): mean end-point error in cells;
- stage "distil": ‖scale · warp(feat(key), flow) − feat(current)‖² / ‖feat(current)‖², the
  warp being the torch FlowWarp (models/warp.py) and feat the teacher's features.

In both, `motion_weight` times the end-point error on training frames moved along known
random motions (`known_motions`) keeps the net a flow for motions the footage lacks. Below input
scale 1, `full_motion_weight` times the same error with the net on the whole frames
(`full_size`) keeps the weights a flow at full size too: trained on shrunk frames alone, they
lose it within a few hundred iterations (docs/MEASUREMENTS.md, issue 23).

With both stages the first DIS_SHARE of the run fits DIS and the rest distils. A held-out part
of the footage is scored as training goes (the feature error above and the DIS EPE). The state
(net, optimizer, iteration, elapsed time) is kept in ENGINE_DIR/adapt/checkpoint.pt so a run
can resume. `write_learned_flow` exports the net with graphs.FlowGraph/export_graph (the
FlowWarp node with its function body), checks it against PyTorch (parity) and TensorRT's op
list, and updates the manifest atomically (flow.prev.onnx keeps the previous flow.onnx; a net
that caches its key frame, RealFlowNet, also writes flow_key.onnx, DESIGN.md §3).

The flow net is a parameter (`init`, a factory (stride, channels, input_scale) -> nn.Module):
forward(x, key_x) on normalised images returns (flow [N,2,h,w] in feature cells current -> key,
scale [N,C,h,w]); attributes flow_mean / flow_std (0..255 scale) say its normalisation.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dff.export import manifest as manifest_mod
from dff.models.warp import flow_warp
from torch import nn

from dff.errors import DffError

STAGES = ("dis", "distil")
DIS_SHARE = 0.3  # with both stages: the share of the run (iterations or time) that fits DIS
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
CHECKPOINT = "checkpoint.pt"
ADAPT_DIR = "adapt"
PREV_FLOW = "flow.prev.onnx"
# the previous learned flow's graphs, kept beside the new ones (flow_key where it had one)
PREV_FILES = {"flow.onnx": PREV_FLOW, "flow_key.onnx": "flow_key.prev.onnx"}
DIS_PRESET = "medium"
EVAL_PAIRS = 32  # held-out pairs scored each evaluation
EVAL_MOTIONS = 8  # held-out frames moved along known motions, scored each evaluation
EVAL_SEED = 1234
MIN_BOXES = 10  # detection: fewer teacher boxes on the held-out pairs score no task error
INPUT_SCALES = (1.0, 0.5, 0.25)

Log = Callable[[str], None]
Init = Callable[[int, int, float], nn.Module]


class AdaptError(DffError):
    """A video, export or checkpoint dff-adapt cannot use."""


# ----------------------------------------------------------------------------- the flow net

class SmallFlowNet(nn.Module):
    """A small stride-agnostic flow net of the dff-adapt interface, the init when
    dff.models.realflow is not there: stride-2 convs down to the feature grid on the pair,
    dilated convs there for context, then flow (zero at start) and scale (one at start)
    heads."""

    def __init__(self, stride: int, channels: int, input_scale: float = 1.0, width: int = 16):
        super().__init__()
        steps = math.log2(stride * input_scale)
        if steps < 1 or steps != int(steps):
            raise AdaptError(f"stride {stride} at input scale {input_scale:g}: the small flow "
                             "net needs a power of two of at least 2")
        layers: list[nn.Module] = [nn.AvgPool2d(round(1 / input_scale))] \
            if input_scale != 1 else []
        cin = 6
        for i in range(int(steps)):
            cout = min(width * 2 ** i, 64)
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.1)]
            cin = cout
        for dilation in (1, 2, 4, 8):  # context at the grid: a receptive field of ~30 cells
            layers += [nn.Conv2d(cin, cin, 3, 1, dilation, dilation=dilation),
                       nn.LeakyReLU(0.1)]
        self.body = nn.Sequential(*layers)
        self.flow_head = nn.Conv2d(cin, 2, 3, 1, 1)
        self.scale_head = nn.Conv2d(cin, channels, 1)
        nn.init.zeros_(self.flow_head.weight)
        nn.init.zeros_(self.flow_head.bias)
        nn.init.zeros_(self.scale_head.weight)
        nn.init.ones_(self.scale_head.bias)
        self.flow_mean = (127.5, 127.5, 127.5)
        self.flow_std = (127.5, 127.5, 127.5)

    def forward(self, x: torch.Tensor, key_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cat = self.body(torch.cat((x, key_x), 1))
        return self.flow_head(cat), self.scale_head(cat)


def default_init() -> tuple[str, Init]:
    """(name, factory) of the flow net to start from: dff.models.realflow.load_realflow where
    it is installed, else SmallFlowNet from scratch. The name carries RealFlowNet's version, so
    `--resume` refuses a checkpoint of another version with adapt's one-line error."""
    try:
        from dff.models.realflow import VERSION, load_realflow
    except ImportError:
        return "scratch:SmallFlowNet", SmallFlowNet

    def realflow(stride: int, channels: int, input_scale: float) -> nn.Module:
        return load_realflow(stride, channels, input_scale=input_scale)

    return f"dff.models.realflow.load_realflow version {VERSION}", realflow


def net_norm(net: nn.Module) -> tuple[list[float], list[float]]:
    mean = [float(v) for v in getattr(net, "flow_mean", (0.0, 0.0, 0.0))]
    std = [float(v) for v in getattr(net, "flow_std", (1.0, 1.0, 1.0))]
    return mean, std


# ---------------------------------------------------------------------------- the footage

@dataclass
class Clip:
    path: Path
    sha256: str
    frames: np.ndarray  # [T,H,W,3] uint8 RGB at the export's opt size
    start: int = 0  # index of frames[0] in the file (held-out tail of one clip)

    @property
    def name(self) -> str:
        return self.path.name + (f"[{self.start}:]" if self.start else "")


def video_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; folders as the videos directly in them (sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES
                           and f.is_file())
            if not found:
                raise AdaptError(f"{p}: a folder with no videos ({', '.join(VIDEO_SUFFIXES)})")
            out += found
        else:
            out.append(p)
    return out


def read_clip(path: Path, size: tuple[int, int], k_max: int, max_frames: int) -> Clip:
    """The first `max_frames` frames of `path`, resized to `size` (H, W); refuses a video
    that cannot be read or has fewer than k_max + 2 frames."""
    import cv2
    from dff.runtime.video import open_video

    h, w = size
    frames = []
    with open_video(path) as video:
        for frame in video:
            if frame.shape[:2] != (h, w):
                frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
            frames.append(frame)
            if len(frames) >= max_frames:
                break
    if len(frames) < k_max + 2:
        raise AdaptError(f"{path}: {len(frames)} frames, too few for --k-max {k_max} (need at "
                         f"least {k_max + 2}); give a longer video or a smaller --k-max")
    return Clip(path, manifest_mod.sha256_file(path), np.stack(frames))


def split_held_out(clips: list[Clip], fraction: float, k_max: int) -> tuple[list[Clip],
                                                                             list[Clip]]:
    """(train, held out): with several clips, whole clips from the end (about `fraction` of
    the frames, at least one, never all); with one, its last `fraction` of frames (each part
    at least k_max + 2 frames). fraction 0: nothing held out."""
    if fraction <= 0:
        return clips, []
    need = k_max + 2
    if len(clips) > 1:
        total = sum(len(c.frames) for c in clips)
        held: list[Clip] = []
        while len(held) < len(clips) - 1 and (not held or sum(len(c.frames) for c in held)
                                              < fraction * total):
            held.insert(0, clips[-1 - len(held)])
        return clips[:len(clips) - len(held)], held
    clip = clips[0]
    n = max(need, round(fraction * len(clip.frames)))
    if len(clip.frames) - n < need:
        raise AdaptError(f"{clip.path}: {len(clip.frames)} frames, too few to hold out "
                         f"{fraction:g} of them and train on the rest with --k-max {k_max} "
                         f"(each part needs {need}); give more footage, or --held-out 0")
    cut = len(clip.frames) - n
    return ([Clip(clip.path, clip.sha256, clip.frames[:cut])],
            [Clip(clip.path, clip.sha256, clip.frames[cut:], start=cut)])


# ------------------------------------------------------------------------ teacher and DIS

def cpu_session(engine_dir: Path, manifest: dict, graph: str, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session on one of the export's graphs (`threads` 0: PyTorch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or max(1, torch.get_num_threads())
    options.log_severity_level = 3
    path = manifest_mod.graph_path(engine_dir, manifest, graph)
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


class Teacher:
    """The export's feature.onnx on ONNX Runtime; features cached per (clip, frame)."""

    def __init__(self, engine_dir: Path, manifest: dict, threads: int = 0):
        self.session = cpu_session(engine_dir, manifest, "feature", threads)
        self.input = self.session.get_inputs()[0].name
        lo, hi = int(manifest["profile"]["min"][0]), int(manifest["profile"]["max"][0])
        self.batch = max(1, min(hi, 8))
        self.fixed = lo == hi  # a graph of fixed N: the last chunk is padded to it
        self.cache: dict[tuple[int, int], np.ndarray] = {}

    def run(self, images: np.ndarray) -> np.ndarray:
        """[N,3,H,W] uint8 -> [N,C,h,w] float32."""
        outs = []
        for i in range(0, len(images), self.batch):
            chunk = images[i:i + self.batch]
            n = len(chunk)
            if self.fixed and n < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, 0)])
            outs.append(self.session.run(None, {self.input: chunk})[0][:n])
        return np.concatenate(outs)

    def features(self, clips: list[Clip], keys: list[tuple[int, int]]) -> np.ndarray:
        missing = [k for k in dict.fromkeys(keys) if k not in self.cache]
        if missing:
            images = np.stack([clips[c].frames[t].transpose(2, 0, 1) for c, t in missing])
            for k, f in zip(missing, self.run(np.ascontiguousarray(images))):
                self.cache[k] = f
        return np.stack([self.cache[k] for k in keys])


class DisTargets:
    """DIS (medium) flows of frame pairs in feature cells, cached per (clip, current, key)."""

    def __init__(self, grid: tuple[int, int], scale: float):
        from dff.runtime.flows import DisFlow

        self.dis = DisFlow(DIS_PRESET, scale)
        self.grid = grid
        self.grey: dict[tuple[int, int], np.ndarray] = {}
        self.cache: dict[tuple[int, int, int], np.ndarray] = {}

    def _prepared(self, clips: list[Clip], c: int, t: int) -> np.ndarray:
        if (c, t) not in self.grey:
            self.grey[(c, t)] = self.dis.prepare(clips[c].frames[t])
        return self.grey[(c, t)]

    def flows(self, clips: list[Clip], pairs: list[tuple[int, int, int]]) -> np.ndarray:
        out = []
        for c, cur, key in pairs:
            if (c, cur, key) not in self.cache:
                self.cache[(c, cur, key)] = self.dis.flow(self._prepared(clips, c, cur),
                                                          self._prepared(clips, c, key),
                                                          self.grid)
            out.append(self.cache[(c, cur, key)])
        return np.stack(out)


class TaskScorer:
    """The export's task.onnx on ONNX Runtime: the task-output error of propagated features
    against the teacher's, scored as dff-eval --video scores a mode (models/agreement.py):
    1 − AP@[.5:.95] (detection), 1 − mIoU (segmentation) or the outputs' relative error (raw);
    lower is better, None where there is too little to score (fewer than MIN_BOXES detections
    in the teacher's output on the held-out pairs: an AP of a handful of boxes is noise)."""

    def __init__(self, engine_dir: Path, manifest: dict, threads: int = 0):
        self.session = cpu_session(engine_dir, manifest, "task", threads)
        self.input = self.session.get_inputs()[0].name
        self.names = [o.name for o in self.session.get_outputs()]
        self.manifest = manifest

    def outputs(self, feat: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per frame, the task's outputs by name (frames run one at a time, as a fixed-N
        graph needs)."""
        from dff.runtime.step import frame_outputs

        out = []
        for f in feat:
            values = self.session.run(None, {self.input: np.ascontiguousarray(f[None])})
            out.append(frame_outputs(dict(zip(self.names, values))))
        return out

    def error(self, feat: np.ndarray, reference: list[dict[str, np.ndarray]]) -> float | None:
        from dff.models.agreement import tally_for

        from dff.tasks import DETECTION, SEGMENTATION

        tally = tally_for(self.manifest)
        kind = tally.kind
        if kind == DETECTION and sum(len(r.get("boxes", ())) for r in reference) < MIN_BOXES:
            return None
        for out, ref in zip(self.outputs(feat), reference):
            tally.add(out, ref, None, None)
        res = tally.result()
        if kind in (DETECTION, SEGMENTATION):
            return None if res["agreement"] is None else 1.0 - float(res["agreement"])
        return res["output_error"]


# ----------------------------------------------------------------------------- training

@dataclass
class AdaptOptions:
    iters: int | None = None  # iterations this run (None: until `minutes`)
    minutes: float | None = None  # wall-clock minutes this run
    k_max: int = 10
    held_out: float = 0.2
    stages: tuple[str, ...] = STAGES
    batch: int = 4
    lr: float | None = None  # None: 1e-3 from scratch, 1e-4 from a trained init
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    max_frames: int = 600
    resume: bool = False
    default_learned: bool = False
    threads: int = 0
    input_scale: float | None = None  # the flow net sees the images shrunk by this (None:
    # realflow.auto_input_scale of the export's opt size)
    train_scale: bool = False  # train the scale field (features-only distillation shrinks it)
    dis_weight: float = 0.1  # the DIS end-point error's weight in the distil stage
    motion_weight: float = 0.5  # the exact-flow end-point error's weight on known motions of
    # the training frames (pretrain_flow.layered_sample): keeps the net a flow for motions the
    # footage lacks
    full_motion_weight: float = 3.0  # below input scale 1: the same error's weight with the
    # net on the whole frames (`full_size`)


@dataclass
class AdaptState:
    iteration: int = 0
    seconds: float = 0.0
    stage: str = ""  # the last stage trained: a resumed run that reached distil stays there
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {iteration, task_err, feat} of the best held-out net
    best_net: dict[str, torch.Tensor] | None = None


def sample_pairs(clips: list[Clip], count: int, k_max: int,
                 rng: random.Random) -> list[tuple[int, int, int]]:
    """`count` (clip, current, key) with current - key uniform in 1..k_max; clips weighted by
    their number of pairs."""
    weights = [max(0, len(c.frames) - 1) for c in clips]
    out = []
    for _ in range(count):
        c = rng.choices(range(len(clips)), weights)[0]
        n = len(clips[c].frames)
        d = rng.randint(1, min(k_max, n - 1))
        key = rng.randint(0, n - 1 - d)
        out.append((c, key + d, key))
    return out


def eval_pairs(clips: list[Clip], k_max: int, count: int = EVAL_PAIRS) -> list[tuple[int, int,
                                                                                        int]]:
    """A fixed spread of held-out pairs: offsets 1..k_max in turn, keys spread over clips."""
    pairs = []
    for i in range(count):
        c = i % len(clips)
        n = len(clips[c].frames)
        d = 1 + (i * 7) % min(k_max, n - 1)
        key = (i * 13) % (n - d)
        pairs.append((c, key + d, key))
    return pairs


def _images(clips: list[Clip], idx: list[tuple[int, int]], mean: torch.Tensor,
            std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(np.stack([clips[c].frames[t] for c, t in idx])).permute(0, 3, 1, 2)
    return (x.float() - mean) / std


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖pred − target‖² / ‖target‖² per frame, averaged over the batch."""
    num = (pred - target).pow(2).flatten(1).sum(1)
    den = target.pow(2).flatten(1).sum(1).clamp_min(1e-8)
    return (num / den).mean()


def epe(flow: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (flow - target).pow(2).sum(1).add(1e-12).sqrt().mean()


def shrinks(net: nn.Module) -> bool:
    """Whether the net sees shrunk frames and can be run on the whole ones (`full_size`): a
    float attribute `input_scale` below 1 that its forward reads (RealFlowNet). SmallFlowNet
    shrinks in a layer and has no such attribute."""
    scale = getattr(net, "input_scale", None)
    return isinstance(scale, float) and scale < 1


@contextmanager
def full_size(net: nn.Module) -> Iterator[None]:
    """The net on the whole frames (input scale 1) inside the block."""
    scale = net.input_scale
    net.input_scale = 1.0
    try:
        yield
    finally:
        net.input_scale = scale


def known_motions(clips: list[Clip], count: int, stride: int, mean: torch.Tensor,
                  std: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """`count` frames of `clips` each moved along a random layered motion with its exact flow
    (models/pretrain_flow.layered_sample, at the frames' size): the normalised images "x",
    "key_x" and the flow in feature cells "flow" (averaged over each cell)."""
    from dff.models.pretrain_flow import layered_sample

    samples = []
    for _ in range(count):
        frames = clips[int(rng.integers(len(clips)))].frames
        frame = frames[int(rng.integers(len(frames)))]
        samples.append(layered_sample(frame, rng, crop=frame.shape[:2], large_share=0.5))

    def tensor(i: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([x[i] for x in samples])).permute(0, 3, 1, 2).float()

    flow = torch.nn.functional.avg_pool2d(tensor(2), stride, stride) * (1.0 / stride)
    return {"x": (tensor(0) - mean) / std, "key_x": (tensor(1) - mean) / std, "flow": flow}


class Trainer:
    """The flow net, its optimizer and the data of one dff-adapt run."""

    def __init__(self, net: nn.Module, teacher: Teacher, train: list[Clip], held: list[Clip],
                 grid: tuple[int, int], dis_scale: float, options: AdaptOptions,
                 task: TaskScorer | None = None):
        self.net, self.teacher, self.train_clips, self.held = net, teacher, train, held
        self.task = task
        self.task_ref: list[dict[str, np.ndarray]] | None = None
        self.options = options
        self.dis = DisTargets(grid, dis_scale)
        self.held_dis = DisTargets(grid, dis_scale)
        self.held_teacher_cache: dict[tuple[int, int], np.ndarray] = {}
        mean, std = net_norm(net)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.lr = options.lr or 1e-4
        self.optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad],
                                          lr=self.lr)
        self.rng = random.Random(options.seed)
        self.state = AdaptState()
        self.eval_set = eval_pairs(held, options.k_max) if held else []
        # the whole-frame known-motion term's weight: 0 where the net cannot run on them
        self.full_motion_weight = options.full_motion_weight if shrinks(net) else 0.0
        self.stride = int(train[0].frames.shape[1]) // grid[0]
        # known motions of held-out frames, fixed: is the net still a flow?
        self.eval_motions = known_motions(held, EVAL_MOTIONS, self.stride, self.mean, self.std,
                                          np.random.default_rng(EVAL_SEED)) if held else None

    def stage(self, progress: float) -> str:
        stages = self.options.stages
        if len(stages) == 1:
            return stages[0]
        if self.state.stage == "distil":
            return "distil"
        return "dis" if progress < DIS_SHARE else "distil"

    def _batch(self, clips: list[Clip], pairs: list[tuple[int, int, int]], teacher_cache: Any,
               dis: DisTargets, need_feat: bool, need_dis: bool) -> dict[str, torch.Tensor]:
        cur = [(c, t) for c, t, _ in pairs]
        key = [(c, k) for c, _, k in pairs]
        out = {"x": _images(clips, cur, self.mean, self.std),
               "key_x": _images(clips, key, self.mean, self.std)}
        if need_feat:
            saved = self.teacher.cache
            self.teacher.cache = teacher_cache
            try:
                out["cur_feat"] = torch.from_numpy(self.teacher.features(clips, cur))
                out["key_feat"] = torch.from_numpy(self.teacher.features(clips, key))
            finally:
                self.teacher.cache = saved
        if need_dis:
            out["dis"] = torch.from_numpy(dis.flows(clips, pairs))
        return out

    def step(self, stage: str) -> float:
        self.net.train()
        pairs = sample_pairs(self.train_clips, self.options.batch, self.options.k_max, self.rng)
        b = self._batch(self.train_clips, pairs, self.teacher.cache, self.dis,
                        need_feat=stage == "distil",
                        need_dis=stage == "dis" or self.options.dis_weight > 0)
        flow, scale = self.forward(b)
        if stage == "dis":
            loss = epe(flow, b["dis"])
        else:
            loss = relative_error(flow_warp(b["key_feat"], flow, scale), b["cur_feat"])
            if self.options.dis_weight > 0:
                loss = loss + self.options.dis_weight * epe(flow, b["dis"])
        full = self.full_motion_weight
        if self.options.motion_weight > 0 or full > 0:
            m = known_motions(self.train_clips, max(1, self.options.batch // 2), self.stride,
                              self.mean, self.std,
                              np.random.default_rng(self.rng.getrandbits(32)))
            if self.options.motion_weight > 0:
                loss = loss + self.options.motion_weight * self.motion_error(m)
            if full > 0:
                with full_size(self.net):
                    loss = loss + full * self.motion_error(m)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.state.iteration += 1
        self.state.stage = stage
        return float(loss.detach())

    def motion_error(self, m: dict[str, torch.Tensor]) -> torch.Tensor:
        """The net's end-point error (cells) on known motions (`known_motions`)."""
        return epe(self.net(m["x"], m["key_x"])[0], m["flow"])

    def forward(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(flow, scale) on a batch; the scale is a constant unless options.train_scale."""
        flow, scale = self.net(b["x"], b["key_x"])[:2]
        return flow, scale if self.options.train_scale else scale.detach()

    def _task_error(self, feat: torch.Tensor, cur_feat: torch.Tensor) -> float | None:
        if self.task is None:
            return None
        if self.task_ref is None:
            self.task_ref = self.task.outputs(cur_feat.numpy())
        return self.task.error(feat.numpy(), self.task_ref)

    @torch.no_grad()
    def evaluate(self, baselines: bool = False) -> dict[str, Any]:
        """On the held-out pairs: the net's task-output error (`task_err`, TaskScorer; None
        where nothing is scored), feature error (`feat`) and DIS EPE (`dis_epe`); with
        `baselines` also the copy's and DIS's task-output and feature errors."""
        if not self.eval_set:
            return {}
        self.net.eval()
        b = self._batch(self.held, self.eval_set, self.held_teacher_cache, self.held_dis,
                        need_feat=True, need_dis=True)
        flow, scale = self.forward(b)
        warped = flow_warp(b["key_feat"], flow, scale)
        out: dict[str, Any] = {"task_err": self._task_error(warped, b["cur_feat"]),
                               "feat": float(relative_error(warped, b["cur_feat"])),
                               "dis_epe": float(epe(flow, b["dis"]))}
        if self.eval_motions is not None:
            m = self.eval_motions
            out["motion_epe"] = float(self.motion_error(m))
            if shrinks(self.net):
                with full_size(self.net):
                    out["motion_epe_full"] = float(self.motion_error(m))
        if baselines:
            dis = flow_warp(b["key_feat"], b["dis"])
            out.update(copy_task_err=self._task_error(b["key_feat"], b["cur_feat"]),
                       copy_feat=float(relative_error(b["key_feat"], b["cur_feat"])),
                       dis_task_err=self._task_error(dis, b["cur_feat"]),
                       dis_feat=float(relative_error(dis, b["cur_feat"])))
        return out

    def keep_if_best(self, scores: dict[str, Any]) -> bool:
        """Keep the net if its held-out scores beat the best so far: the lower task-output
        error, the lower feature error where neither has one (or they tie)."""
        def key(s: dict[str, Any]) -> tuple[float, float]:
            task = s.get("task_err")
            return (math.inf if task is None else task, s["feat"])

        if not scores:
            return False
        best = self.state.best
        if best is not None and key(best) <= key(scores):
            return False
        self.state.best = {"iteration": self.state.iteration, "task_err": scores["task_err"],
                           "feat": scores["feat"], "dis_epe": scores["dis_epe"],
                           "motion_epe": scores.get("motion_epe"),
                           "motion_epe_full": scores.get("motion_epe_full")}
        self.state.best_net = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        return True

    # ---- checkpoint
    def save(self, path: Path, init: str, extra: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "iteration": self.state.iteration, "seconds": self.state.seconds,
                "history": self.state.history, "stage": self.state.stage,
                "best": self.state.best, "best_net": self.state.best_net,
                "rng": self.rng.getstate(), "init": init,
                **extra}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            torch.save(blob, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, blob: dict[str, Any]) -> None:
        self.net.load_state_dict(blob["net"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.state = AdaptState(iteration=int(blob["iteration"]), seconds=float(blob["seconds"]),
                                stage=str(blob.get("stage", "")),
                                history=list(blob.get("history", [])),
                                best=blob.get("best"), best_net=blob.get("best_net"))
        if "rng" in blob:
            self.rng.setstate(blob["rng"])


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise AdaptError(f"{path}: cannot read the adaptation checkpoint ({type(e).__name__}: "
                         f"{e}); delete it and run without --resume") from e
    if not isinstance(blob, dict) or "net" not in blob or "iteration" not in blob:
        raise AdaptError(f"{path}: not a dff-adapt checkpoint; delete it and run without "
                         "--resume")
    return blob


def read_export(engine_dir: str | os.PathLike[str]) -> dict:
    """The export's checked manifest (its graph hashes verified)."""
    try:
        return manifest_mod.load_manifest(engine_dir)
    except manifest_mod.ManifestError as e:
        raise AdaptError(str(e)) from None


def clips_for(manifest: dict, videos: Sequence[str | os.PathLike[str]],
              options: AdaptOptions) -> tuple[list[Clip], list[Clip], list[Clip]]:
    """(all clips, training clips, held-out clips) at the export's opt size."""
    size = (int(manifest["profile"]["opt"][1]), int(manifest["profile"]["opt"][2]))
    files = video_files(videos)
    if not files:
        raise AdaptError("no videos given; pass --video FILE_OR_FOLDER")
    clips = [read_clip(f, size, options.k_max, options.max_frames) for f in files]
    train, held = split_held_out(clips, options.held_out, options.k_max)
    return clips, train, held


def adapt(engine_dir: str | os.PathLike[str], videos: Sequence[str | os.PathLike[str]],
          options: AdaptOptions, *, init: tuple[str, Init] | None = None,
          log: Log | None = None,
          progress: Callable[[Iterator[int], int | None], Iterator[int]] | None = None,
          watch: Callable[[int, nn.Module, dict[str, Any]], None] | None = None,
          ) -> dict[str, Any]:
    """Train (or resume training) a flow net for the export in `engine_dir` on `videos`, then
    write it into the export (`write_learned_flow`). Returns the manifest's adapt record.
    `progress`: wraps the iteration counter (a tqdm) and gets `set_postfix` calls when it has
    them. `watch(iteration, net, scores)`: called after each held-out evaluation, the start's
    included, with the net in eval mode (benchmarks/adapt_stereo.py scores it). Raises a
    DffError (AdaptError, parity, export) and then changes nothing in the export except its
    adapt/ checkpoint."""
    log = log or (lambda _: None)
    engine_dir = Path(engine_dir)
    if options.iters is None and options.minutes is None:
        raise AdaptError("give --iters N or --minutes M")
    bad = [s for s in options.stages if s not in STAGES]
    if bad or not options.stages:
        raise AdaptError(f"--stages {','.join(options.stages)}: choose from {', '.join(STAGES)}")
    if options.input_scale is not None and options.input_scale not in INPUT_SCALES:
        raise AdaptError(f"--input-scale {options.input_scale:g}: choose from "
                         f"{', '.join(f'{v:g}' for v in INPUT_SCALES)}")
    manifest = read_export(engine_dir)
    ckpt_path = engine_dir / ADAPT_DIR / CHECKPOINT
    blob = read_checkpoint(ckpt_path) if options.resume and ckpt_path.is_file() else None
    if options.resume and blob is None:
        log(f"--resume: no checkpoint at {ckpt_path}; starting from the init")
    elif not options.resume and ckpt_path.is_file():
        log(f"starting over from the init ({ckpt_path} is replaced; --resume continues it)")
    stride, channels = int(manifest["stride"]), int(manifest["feat_channels"])
    all_clips, train, held = clips_for(manifest, videos, options)
    init_name, factory = init or default_init()
    if blob is not None and blob.get("init") != init_name:
        raise AdaptError(f"{ckpt_path}: started from {blob.get('init')!r}, but this run's "
                         f"init is {init_name!r}; run without --resume to start over")
    if options.input_scale is None:  # a resumed run's own, else by the export's size
        from dff.models.realflow import auto_input_scale

        h, w = (int(v) for v in manifest["profile"]["opt"][1:])
        options = replace(options, input_scale=float(blob.get("input_scale", 1.0))
                          if blob is not None else auto_input_scale(h, w))
    if blob is not None and float(blob.get("input_scale", 1.0)) != options.input_scale:
        raise AdaptError(f"{ckpt_path}: trained at --input-scale {blob.get('input_scale', 1.0):g}"
                         f", not {options.input_scale:g}; give that, or run without --resume "
                         "to start over")
    if options.lr is None:
        options = replace(options, lr=1e-3 if init_name.startswith("scratch") else 1e-4)
    torch.manual_seed(options.seed)
    assert options.input_scale is not None  # resolved above
    net = factory(stride, channels, options.input_scale)
    grid = (int(manifest["profile"]["opt"][1]) // stride,
            int(manifest["profile"]["opt"][2]) // stride)
    from dff.runtime.flows import DEFAULT_SCALE

    dis_scale = float(manifest_mod.dis_settings(manifest).get("scale", DEFAULT_SCALE))
    teacher = Teacher(engine_dir, manifest, options.threads)
    trainer = Trainer(net, teacher, train, held, grid, dis_scale, options,
                      TaskScorer(engine_dir, manifest, options.threads) if held else None)
    if blob is not None:
        trainer.load(blob)
        log(f"resuming at iteration {trainer.state.iteration} ({ckpt_path})")
    base = trainer.evaluate(baselines=True)
    trainer.keep_if_best(base)
    if watch and base:
        watch(trainer.state.iteration, net, base)
    if base:
        log(f"held out ({', '.join(c.name for c in held)}; {len(trainer.eval_set)} pairs): "
            f"{_scores(base)}")
        if base["copy_task_err"] is None:
            log(f"held out: too little for a task-output error (a detector needs {MIN_BOXES} "
                "boxes on the held-out pairs); the feature error chooses the net written")
    start_iter, start_sec = trainer.state.iteration, trainer.state.seconds
    total_iters = start_iter + options.iters if options.iters is not None else None
    budget_s = options.minutes * 60 if options.minutes is not None else None
    deadline = time.monotonic() + budget_s if budget_s is not None else None
    t0 = time.monotonic()

    def counter() -> Iterator[int]:
        while True:
            if total_iters is not None and trainer.state.iteration >= total_iters:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            yield trainer.state.iteration

    bar = progress(counter(), options.iters) if progress else counter()
    extra = {"stages": list(options.stages), "k_max": options.k_max,
             "input_scale": options.input_scale}
    last = dict(base)
    loss = math.nan
    for _ in bar:
        run_share = ((trainer.state.iteration - start_iter) / options.iters
                     if options.iters else (time.monotonic() - t0) / (budget_s or 1.0))
        stage = trainer.stage(run_share)
        loss = trainer.step(stage)
        it = trainer.state.iteration
        if held and it % options.eval_every == 0:
            last = trainer.evaluate()
            trainer.keep_if_best(last)
            trainer.state.history.append({"iteration": it, "loss": loss, "stage": stage,
                                          **last})
            if watch:
                watch(it, net, last)
        if hasattr(bar, "set_postfix"):
            post = {"stage": stage, "loss": f"{loss:.4f}"}
            if last:
                post.update(held_task_err=_num(last["task_err"]), held_feat=f"{last['feat']:.4f}",
                            dis_epe=f"{last['dis_epe']:.3f}",
                            motion_epe=f"{last.get('motion_epe', math.nan):.3f}")
                if "motion_epe_full" in last:
                    post.update(motion_epe_full=f"{last['motion_epe_full']:.3f}")
            bar.set_postfix(post, refresh=False)
        if it % options.save_every == 0:
            trainer.state.seconds = start_sec + time.monotonic() - t0
            trainer.save(ckpt_path, init_name, extra)
    trainer.state.seconds = start_sec + time.monotonic() - t0
    final = trainer.evaluate(baselines=True)
    trainer.keep_if_best(final)
    if watch and final and trainer.state.iteration % options.eval_every \
            and trainer.state.iteration != start_iter:
        watch(trainer.state.iteration, net, final)
    trainer.save(ckpt_path, init_name, extra)
    log(f"trained {trainer.state.iteration - start_iter} iterations "
        f"({trainer.state.iteration} in all) in {time.monotonic() - t0:.1f} s"
        + (f"; held out: {_scores(final)}" if final else ""))
    best = trainer.state.best
    if best is not None and trainer.state.best_net is not None \
            and best["iteration"] != trainer.state.iteration:
        net.load_state_dict(trainer.state.best_net)
        log(f"writing the net of iteration {best['iteration']}, the best on the held-out "
            f"footage (task-output error {_num(best['task_err'])}, feature error "
            f"{best['feat']:.4f}), not the last")
    verdict = held_out_verdict(best, final)
    if verdict:
        log(verdict["says"])
    import dff

    record = {
        "videos": [{"file": str(c.path.resolve()), "sha256": c.sha256,
                    "frames": len(c.frames)} for c in all_clips],
        "held_out": [{"file": str(c.path.resolve()), "from_frame": c.start,
                      "frames": len(c.frames)} for c in held],
        "iterations": trainer.state.iteration, "seconds": round(trainer.state.seconds, 1),
        "minutes": options.minutes, "stages": list(options.stages), "k_max": options.k_max,
        "batch": options.batch, "lr": options.lr, "dis": {"preset": DIS_PRESET,
                                                          "scale": dis_scale},
        "input_scale": options.input_scale, "train_scale": options.train_scale,
        "dis_weight": options.dis_weight, "motion_weight": options.motion_weight,
        "full_motion_weight": trainer.full_motion_weight,
        "held_out_loss": final, "chosen": best, "verdict": verdict, "init": init_name,
        "tool": "dff-adapt",
        "tool_version": dff.__version__, "last_loss": loss,
    }
    write_learned_flow(engine_dir, manifest, net, record, default_learned=options.default_learned,
                       clips=all_clips, log=log)
    return record


def held_out_verdict(best: dict[str, Any] | None, final: dict[str, Any]) -> dict[str, Any]:
    """How the net written compares with copy and DIS on the held-out footage: by the
    task-output error where all three have one, else by the feature error. {} without a
    held-out part."""
    if not best or not final:
        return {}
    on = "task_err" if None not in (best["task_err"], final["copy_task_err"],
                                     final["dis_task_err"]) else "feat"
    mine, copy, dis = best[on], final[f"copy_{on}"], final[f"dis_{on}"]
    what = "task-output error" if on == "task_err" else "feature error"
    beats = {"copy": mine < copy, "dis": mine < dis}
    losers = [m for m in ("copy", "DIS") if not beats[m.lower()]]
    says = (f"held out: the learned flow's {what} {mine:.4f} against copy's {copy:.4f} and "
            f"DIS's {dis:.4f}: ")
    if not losers:
        says += "it beats both on this footage"
    else:
        says += (f"it does not beat {' or '.join(losers)} on this footage; measure it on yours "
                 "with dff-eval --video before you deploy it"
                 + (" (the export's DIS flow: --flow dis)" if not beats["dis"] else ""))
    return {"on": on, "beats_copy": beats["copy"], "beats_dis": beats["dis"], "says": says}


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _scores(s: dict[str, Any]) -> str:
    """The held-out scores of an evaluation with baselines, as one log phrase."""
    return (f"task-output error this net {_num(s['task_err'])}, copy {_num(s['copy_task_err'])}, "
            f"DIS {_num(s['dis_task_err'])}; feature error {s['feat']:.4f}, copy "
            f"{s['copy_feat']:.4f}, DIS {s['dis_feat']:.4f}; DIS EPE {s['dis_epe']:.3f} cells"
            + (f", known-motion EPE {s['motion_epe']:.3f} cells" if "motion_epe" in s else "")
            + (f" ({s['motion_epe_full']:.3f} on the whole frames)" if "motion_epe_full" in s
               else ""))


# ------------------------------------------------------------------------------ the export

def _flow_specs(manifest: dict, net: nn.Module) -> dict[str, Any]:
    """The GraphSpecs of `net`'s learned flow from the feature graph's image and feat tensors:
    flow.onnx, and flow_key.onnx before it where the net caches its key frame (key_cache)."""
    from dff.export.graphs import GraphSpec, TensorSpec, key_cache

    feat_graph = manifest["graphs"]["feature"]
    image, feat = feat_graph["inputs"][0], feat_graph["outputs"][0]

    def t(name: str, like: dict, channels: Any = None) -> TensorSpec:
        shape = list(like["shape"])
        if channels is not None:
            shape[1] = channels
        return TensorSpec(name, like["dtype"], tuple(shape))

    outputs = (t("flow", feat, 2), t("scale", feat), t("feat", feat))
    cache = key_cache(net)
    if cache is None:
        return {"flow": GraphSpec("flow", (t("image", image), t("key_image", image),
                                           t("key_feat", feat)), outputs)}
    n, _, h, w = image["shape"]
    side = [d if isinstance(d, str) else manifest_mod.key_side(d, cache) for d in (h, w)]
    code = TensorSpec("key_code", "float32", (n, cache["channels"],
                                              *(f"{d.lower()}k" if isinstance(d, str) else d
                                                for d in side)))
    return {"flow_key": GraphSpec("flow_key", (t("key_image", image),), (code,)),
            "flow": GraphSpec("flow", (t("image", image), code, t("key_feat", feat)), outputs)}


def _modules(manifest: dict, net: nn.Module) -> tuple[Any, Any]:
    """DFFModules around `net` (feature and task are placeholders: only FlowGraph reads them)
    and their Facts, so graphs.FlowGraph and export_graph take it as they take an export's."""
    from dff.export.modules import DFFModules, Facts

    mean, std = net_norm(net)
    mods = DFFModules(feature=nn.Identity(), flow=net, task=nn.Identity(),
                      class_names=tuple(manifest["class_names"]) or ("x",),
                      input_size=tuple(manifest["profile"]["opt"][1:]),
                      stride=int(manifest["stride"]), flow_mean=tuple(mean),
                      flow_std=tuple(std))
    return mods, Facts(int(manifest["feat_channels"]), True)


def write_learned_flow(engine_dir: Path, manifest: dict, net: nn.Module, record: dict[str, Any],
                       *, default_learned: bool = False, clips: list[Clip] | None = None,
                       log: Log | None = None) -> dict:
    """Export `net` as flow.onnx into `engine_dir`: FlowGraph through export_graph, parity
    against PyTorch on ONNX Runtime (the key features from the export's feature.onnx), the
    TensorRT op check, then the files moved in (flow.onnx and, for a net that caches its key
    frame, flow_key.onnx; the previous ones as flow.prev.onnx, flow_key.prev.onnx) and the manifest
    rewritten, last. Returns the new manifest."""
    import onnx
    from dff.engines import onnx_ops
    from dff.export import parity as parity_mod
    from dff.export.exporter import graph_entry
    from dff.export.graphs import FlowGraph, KeyGraph, export_graph
    from dff.export.profile import Profile

    log = log or (lambda _: None)
    net = net.eval()
    specs = _flow_specs(manifest, net)
    spec = specs["flow"]
    p = manifest["profile"]
    profile = Profile(tuple(p["min"]), tuple(p["opt"]), tuple(p["max"]),
                      int(manifest["stride"]))
    mods, facts = _modules(manifest, net)
    tmp = Path(tempfile.mkdtemp(prefix=".dff-adapt-", dir=engine_dir))
    try:
        protos = {}
        for name, one in specs.items():
            log(f"exporting {one.file} ...")
            protos[name] = export_graph(mods, one, profile, tmp / one.file, facts=facts)
            found = onnx_ops.problems(protos[name])
            if found:
                raise AdaptError(f"{one.file}: TensorRT's parser would refuse it: "
                                 f"{'; '.join(found)}")
        # parity: PyTorch's FlowGraph against ONNX Runtime, key features from feature.onnx
        shape = tuple(profile.opt)
        cases = parity_mod.default_cases(shape)
        if clips:
            n = shape[0]
            frames = clips[0].frames
            d = min(2, len(frames) - 1)
            idx = [i % (len(frames) - d) for i in range(n)]
            cases.append(parity_mod.Case(
                f"footage {'x'.join(map(str, shape))}",
                np.ascontiguousarray(frames[[i + d for i in idx]].transpose(0, 3, 1, 2)),
                np.ascontiguousarray(frames[idx].transpose(0, 3, 1, 2))))
        run = parity_mod.onnxruntime_runner()
        feature_path = os.fspath(manifest_mod.graph_path(engine_dir, manifest, "feature"))
        graph = FlowGraph(mods, facts).eval()
        rows = []
        for case in cases:  # each graph on PyTorch's inputs (export/parity.py's rule)
            key_feat = run("feature", feature_path, {"image": case.key_image})["feat"]
            key = torch.from_numpy(case.key_image)
            feeds = {"image": case.image, "key_image": case.key_image, "key_feat": key_feat}
            with torch.no_grad():
                if graph.keyed:
                    key = KeyGraph(mods, facts).eval()(key)
                    got = run("flow_key", os.fspath(tmp / specs["flow_key"].file),
                              {"key_image": case.key_image})
                    rows.append(parity_mod.compare("flow_key", "key_code", case.name,
                                                   key.numpy(), got.get("key_code")))
                    del feeds["key_image"]
                    feeds["key_code"] = key.numpy()
                ref = graph(torch.from_numpy(case.image), key, torch.from_numpy(key_feat))
            got = run("flow", os.fspath(tmp / spec.file), feeds)
            rows += [parity_mod.compare("flow", name, case.name, r.numpy(), got.get(name))
                     for name, r in zip(("flow", "scale", "feat"), ref)]
        log(parity_mod.format_table(rows))
        parity_mod.require_pass(rows)
        for proto in protos.values():
            onnx.checker.check_model(proto)
        new = dict(manifest)
        new["graphs"] = {g: e for g, e in manifest["graphs"].items() if g != "flow_key"}
        takes = "key_code" if graph.keyed else "key_image"
        docs = {"flow": "N_flow learned by dff-adapt on the user's footage, plus the warp: flow "
                        f"and scale from (image, {takes}), then feat = dff::FlowWarp(key_feat, "
                        "flow, scale) in the same graph",
                "flow_key": "the key-frame part of dff-adapt's N_flow, once per key frame: key "
                            "image -> key_code, which flow.onnx takes"}
        for name, one in specs.items():
            new["graphs"][name] = graph_entry(tmp, one, docs[name], net)
        mean, std = net_norm(net)
        new["normalisation"] = {**manifest["normalisation"], "flow": {"mean": mean, "std": std}}
        flow = dict(manifest.get("flow") or {"sources": [manifest_mod.LEARNED],
                                             "default": manifest_mod.LEARNED})
        sources = set(manifest_mod.flow_sources(manifest)) | {manifest_mod.LEARNED}
        flow["sources"] = [s for s in manifest_mod.FLOW_SOURCES if s in sources]
        flow["default"] = (manifest_mod.LEARNED if default_learned
                           else manifest_mod.default_flow(manifest))
        new["flow"] = flow
        new["plugin"] = {**manifest["plugin"], "graph": "flow",
                         "function": "model-local FunctionProto (GridSample body) attached, so "
                                     "ONNX Runtime runs it; TensorRT may use its registered "
                                     "plugin"}
        dropped = [k for k, e in manifest["engines"].items()
                   if isinstance(e, dict) and e.get("graph") in ("flow_key", "flow")]
        new["engines"] = {k: e for k, e in manifest["engines"].items() if k not in dropped}
        worst = max((r.value for r in rows), default=0.0)
        new["export"] = {**manifest["export"],
                         "adapt": {**record, "parity": {
                             "backend": "onnxruntime CPUExecutionProvider",
                             "tolerance_rule": parity_mod.TOLERANCE_RULE,
                             "passed": True, "cases": [c.name for c in cases],
                             "worst_max_abs_error": worst},
                             "engines_dropped": dropped}}
        manifest_mod.write_manifest(tmp / manifest_mod.FILENAME, new)
        for file, prev in PREV_FILES.items():  # the previous flow graphs, kept beside
            if (engine_dir / file).is_file():
                shutil.copy2(engine_dir / file, tmp / prev)
                os.replace(tmp / prev, engine_dir / prev)
        for one in specs.values():
            os.replace(tmp / one.file, engine_dir / one.file)
        os.replace(tmp / manifest_mod.FILENAME, engine_dir / manifest_mod.FILENAME)
        if not graph.keyed:  # a flow_key.onnx of the previous flow no longer belongs
            (engine_dir / "flow_key.onnx").unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {engine_dir / spec.file} (flow sources {', '.join(new['flow']['sources'])}; "
        f"default {new['flow']['default']})"
        + (f"; dropped engines built from the old flow graph: {', '.join(dropped)}"
           if dropped else ""))
    return new
