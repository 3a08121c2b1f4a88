"""Speed at the paper's scale (issue 13): DFF's architecture at about 600×1000, random weights.

The model is the paper's (Zhu et al., "Deep Feature Flow for Video Recognition", 2017):
ResNet-101 v1 with res5 dilated 2 (output stride 16) and feat_conv (3×3, dilation 6, C = 1024),
FlowNet-S at half width ("FlowNet Half") on the half-resolution frame pair with DFF's flow and
scale heads, and a task head: for segmentation (19 classes, as Cityscapes) the paper's, a 1×1
score convolution and bilinear upsampling (DeepLab v1, `ScoreHead`; `--seg-head aspp`: dff-trt's
ASPP head instead), for detection dff-trt's CenterNet head (30 classes, as ImageNet VID; the
paper's R-FCN is issue 14). That is `DFFConfig`'s "resnet101" preset. Its weights are random:
the figures are speed only, nothing is said about accuracy.

It is exported with dff-export's code (`export.modules.from_dff` → `exporter.export_dff_modules`)
and timed with dff-profile's (`runtime/profile.py`: `profile_stages`, `profile_end_to_end`) on ONNX
Runtime CPU: the stage medians, r = (flow + warp + task) / (feature + task), DFF's speedup at each
key interval K measured end to end (fps at K / fps per frame, same frames, same backend) beside
the speedup model s = K / (1 + (K − 1) r) and the paper's 5× at K = 10, and the runtime
efficiency of DESIGN.md §5 (Σ stage medians × frames that ran them / wall time). The end-to-end
runs are repeated (--repeats) and each K shows its median run; the share of the CPUs that other
processes took meanwhile is printed, since a shared machine skews every figure.

dff-export checks parity at the profile's opt shape. The graphs are exported with H and W
dynamic from --parity-size (opt, default 64×128) up to --size, so parity stays cheap:
at 576×1024 detection's task check alone (1000 feature maps) would hold 9.4 GB per copy.
`--parity-size 576x1024` checks at full size and exports static graphs.

    python benchmarks/paper_scale.py                                    # segmentation, 576x1024
    python benchmarks/paper_scale.py --task both --threads 1 --json paper_scale.json
    python benchmarks/paper_scale.py --flow dis      # DIS beside the learned flow (issue 22)

A benchmark, not a test: minutes on a 2-core CPU (the feature graph alone takes seconds a call).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from dff.data.synthetic import EVAL_SEEDS, make_clip
from dff.export.exporter import export_dff_modules
from dff.export.modules import Facts, from_dff
from dff.export.profile import format_shape
from dff.models.config import PRESETS, DFFConfig
from dff.models.dff import DFF
from dff.models.flownet import FULL_WIDTHS
from dff.models.trunk import RESNET_LAYOUTS
from dff.runtime.flows import DisFlow
from dff.runtime.loaders import open_backend
from dff.runtime.profile import STAGES, profile_end_to_end, profile_stages
from dff.runtime.writers import write_summary

from dff.commands.common import guarded
from dff.commands.profile import format_report
from dff.errors import DffError
from dff.tasks import DETECTION, SEGMENTATION

TASKS = (SEGMENTATION, DETECTION)
# the paper's datasets' class counts: Cityscapes (segmentation), ImageNet VID (detection)
PAPER_CLASSES = {SEGMENTATION: 19, DETECTION: 30}
PAPER_SPEEDUP_K10 = 5.0  # the paper's ImageNet VID figure at K = 10 (r ≈ 0.11)
TARGET_SPEEDUP_K10, TARGET_EFFICIENCY = 6.0, 0.9  # issue 13's bar on ONNX Runtime CPU
WEIGHTS = "random: speed only"
FLOW_LAYERS = ("conv1", "conv2", "conv3", "conv3_1", "conv4", "conv4_1", "conv5", "conv5_1",
               "conv6", "conv6_1")
PROBE = (64, 128)  # the size the architecture's strides are measured at (in PyTorch)


def size_arg(text: str) -> tuple[int, int]:
    """'576x1024' -> (576, 1024), both multiples of the stride 16."""
    try:
        h, w = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 576x1024") from None
    if min(h, w) < 16 or h % 16 or w % 16:
        raise argparse.ArgumentTypeError(f"{text!r}: H and W must be multiples of 16, the "
                                         "stride (576x1024 is the paper's 600x1000 so rounded)")
    return h, w


SEG_HEADS = ("paper", "aspp")  # the paper's 1×1 score head, or dff-trt's ASPP head


def paper_config(task: str, size: tuple[int, int], classes: int | None = None,
                 seg_head: str = "paper") -> DFFConfig:
    """The paper's architecture ("resnet101" preset) for `task` with `classes` classes; a
    segmentation head of SEG_HEADS (`head_channels` 0 is the paper's ScoreHead)."""
    if seg_head not in SEG_HEADS:
        raise ValueError(f"seg_head {seg_head!r}: choose one of {SEG_HEADS}")
    n = classes or PAPER_CLASSES[task]
    names = [f"class{i:02d}" for i in range(n)]
    head = {"head_channels": 0} if task == SEGMENTATION and seg_head == "paper" else {}
    return DFFConfig.from_dict({**PRESETS["resnet101"].to_dict(), "task": task,
                                "class_names": names, "input_size": list(size), **head})


def build_model(config: DFFConfig, seed: int = 0) -> DFF:
    """DFF with the modules' own random initialisation (seeded), in eval mode."""
    torch.manual_seed(seed)
    return DFF(config).eval()


@torch.no_grad()
def architecture(model: DFF, probe: tuple[int, int] = PROBE) -> dict[str, Any]:
    """What the model is, read off its modules and measured by one forward at `probe`: the
    trunk's blocks per stage and output stride, C, the flow net's widths against FlowNet-S's
    and the size of the pair its first conv sees."""
    cfg, trunk, flownet = model.config, model.trunk, model.flownet
    seen: dict[str, list[int]] = {}

    def record(_module: Any, inputs: tuple, _output: Any) -> None:
        seen["flow_input"] = list(inputs[0].shape[1:])

    hook = flownet.conv1.register_forward_hook(record)
    image = torch.zeros(1, 3, *probe)
    try:
        feat = model.features(image)
        model.flow(image, image)
    finally:
        hook.remove()
    widths = [getattr(flownet, name)[0].out_channels for name in FLOW_LAYERS]
    return {
        "trunk": f"ResNet-{cfg.trunk_depth} v1 ({RESNET_LAYOUTS[cfg.trunk_depth][0]})",
        "blocks": [len(stage) for stage in trunk.stages],
        "res5_dilation": trunk.stages[3][0].conv2.dilation[0],
        "output_stride": probe[0] // feat.shape[2],
        "feat_channels": int(feat.shape[1]),
        "feat_conv_dilation": trunk.feat_conv[0].dilation[0],
        "flow_widths": widths,
        "flownet_s_widths": list(FULL_WIDTHS),
        "flow_input": seen["flow_input"],  # [6, H', W'] at the probe's H×W
        "probe": list(probe),
        "head": f"{type(model.head).__name__} ("
                + (f"{cfg.head_channels} channels" if cfg.head_channels else "1x1 score conv")
                + f", {cfg.num_classes} classes)",
        "parameters_m": {name: sum(p.numel() for p in part.parameters()) / 1e6 for name, part
                         in (("feature", trunk), ("flow", flownet), ("task", model.head))},
    }


def describe(arch: dict[str, Any]) -> str:
    ratio = {round(w / f, 3) for w, f in zip(arch["flow_widths"], arch["flownet_s_widths"])}
    _, h, w = arch["flow_input"]
    ph, pw = arch["probe"]
    params = ", ".join(f"{k} {v:.1f} M" for k, v in arch["parameters_m"].items())
    return (f"{arch['trunk']} blocks {arch['blocks']}, res5 dilation {arch['res5_dilation']}, "
            f"stride {arch['output_stride']}, feat_conv C={arch['feat_channels']} (dilation "
            f"{arch['feat_conv_dilation']}); FlowNet-S x{'/'.join(map(str, sorted(ratio)))} "
            f"widths {arch['flow_widths']} on the {h}x{w} pair of {ph}x{pw} frames; "
            f"{arch['head']}; parameters: {params}")


def export(model: DFF, out_dir: Path, size: tuple[int, int], parity: tuple[int, int]) -> None:
    """dff-export's path for a DFF (as `export_model` takes a checkpoint): H and W dynamic
    from `parity` (the opt shape, where parity is checked) to `size`, batch 1."""
    mods = from_dff(model, source={"benchmark": "benchmarks/paper_scale.py",
                                   "weights": WEIGHTS})
    start = time.perf_counter()
    export_dff_modules(mods, out_dir, min_shape=(1, *parity), opt_shape=(1, *parity),
                       max_shape=(1, *size), log=lambda text: print(textwrap.indent(text, "  "), flush=True),
                       facts=Facts(model.config.feat_channels, True, False))
    print(f"  exported in {time.perf_counter() - start:.0f} s", flush=True)


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # not idle, iowait


def timed(work: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """work()'s result, its wall seconds, and the share of all CPUs that other processes used
    meanwhile (None where unknown): on a shared machine that skews every figure."""
    busy, own, start = _busy_seconds(), os.times(), time.perf_counter()
    result = work()
    wall = time.perf_counter() - start
    after, mine = _busy_seconds(), os.times()
    if busy is None or after is None or wall <= 0:
        return result, wall, None
    used = (mine.user - own.user) + (mine.system - own.system)
    return result, wall, max(0.0, (after - busy - used) / (wall * (os.cpu_count() or 1)))


def _took(wall: float, other: float | None) -> str:
    share = "" if other is None else f"; other processes used {100 * other:.0f} % of the CPUs"
    return f"  {wall:.0f} s{share}"


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _speedups(rows: list[dict]) -> str:
    return ", ".join(f"K={row['key_interval']} {row['speedup']:.2f}x" for row in rows
                     if row["key_interval"] > 1)


def median_rows(repeats: list[list[dict]]) -> list[dict]:
    """Per key interval, the row of the repeat with the median speedup (K = 1: the median
    fps), so every row shown is one real run; with an even count the upper median."""
    rows = []
    for i, row in enumerate(repeats[0]):
        key = "speedup" if row["key_interval"] > 1 else "fps"
        runs = sorted((rep[i] for rep in repeats), key=lambda r: r[key])
        rows.append(runs[len(runs) // 2])
    return rows


def summarise(profile: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's figures from dff-profile's result: stage medians, r, and per K > 1 the
    measured speedup, the model's, their ratio and the runtime efficiency (the lowest of all
    runs, K = 1 included, is `efficiency`)."""
    rows = profile["end_to_end"]
    dff_rows = [row for row in rows if row["key_interval"] > 1]
    speedup = {str(row["key_interval"]): row["speedup"] for row in dff_rows}
    model = {str(row["key_interval"]): row["predicted_speedup"] for row in dff_rows}
    return {
        "stages_ms": {s: profile["stages"][s]["latency_ms"]["median"] for s in STAGES},
        "r": profile["r"],
        "speedup": speedup,
        "model_speedup": model,
        "measured_over_model": {k: speedup[k] / model[k] for k in speedup},
        "efficiency": min(row["efficiency"] for row in rows),
        "efficiency_by_k": {str(row["key_interval"]): row["efficiency"] for row in rows},
        "paper_speedup": {"10": PAPER_SPEEDUP_K10},
    }


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    s10 = summary["speedup"].get("10")
    return {"speedup_k10": s10, "speedup_k10_min": TARGET_SPEEDUP_K10,
            "efficiency_min": TARGET_EFFICIENCY,
            "met": s10 is not None and s10 >= TARGET_SPEEDUP_K10
            and summary["efficiency"] >= TARGET_EFFICIENCY}


def format_summary(res: dict[str, Any]) -> list[str]:
    """The paper-scale table: stage medians, r, and per K the measured and modelled speedup."""
    h, w = res["size"]
    med, eff, t = res["stages_ms"], res["efficiency_by_k"], res["targets"]
    threads = res["threads"] or "default"
    title = (f"paper scale, {res['task']} at {h}x{w} on {res['backend']} ({threads} threads), "
             f"weights {WEIGHTS}")
    lines = [title, f"  {res['architecture_line']}", "", f"{'stage':<15}{'median ms':>10}"]
    for stage in STAGES:
        label = "flow (+warp)" if stage == "flow" else stage
        lines.append(f"{label:<15}{med[stage]:>10.1f}")
    lines.append(f"r = (flow + task) / (feature + task) = ({med['flow']:.1f} + "
                 f"{med['task']:.1f}) / ({med['feature']:.1f} + {med['task']:.1f}) = "
                 f"{res['r']:.4f}")
    header = (f"{'K':>4}{'measured':>10}{'model s':>10}{'measured/model':>16}"
              f"{'efficiency':>12}{'paper':>8}")
    lines += ["", header, f"{1:>4}{1:>9.2f}x{1:>9.2f}x{1:>16.2f}{eff['1']:>12.2f}"]
    for k, s in res["speedup"].items():
        paper = f"{res['paper_speedup'][k]:.0f}x" if k in res["paper_speedup"] else ""
        lines.append(f"{k:>4}{s:>9.2f}x{res['model_speedup'][k]:>9.2f}x"
                     f"{res['measured_over_model'][k]:>16.2f}{eff[k]:>12.2f}{paper:>8}")
    s10 = "not run" if t["speedup_k10"] is None else f"{t['speedup_k10']:.2f}x"
    how = (f"measured = fps at K / fps at K=1 over the same {res['frames']} frames "
           f"(dff-profile's end-to-end run; the median of {res['repeats']}); model s = K / "
           "(1 + (K-1) r); efficiency = sum of stage medians x frames / wall (DESIGN.md §5)")
    verdict = (f"target (issue 13): speedup at K=10 >= {t['speedup_k10_min']:g}x ({s10}) and "
               f"efficiency >= {t['efficiency_min']:g} ({res['efficiency']:.2f}): "
               + ("met" if t["met"] else "NOT met"))
    other = res["other_cpu_share"]
    busy = ", ".join(f"{name} {100 * v:.0f} %" for name, v in other.items() if v is not None)
    lines += ["", how] + ([f"other processes' share of the CPUs meanwhile: {busy}"] if busy
                          else [])
    d = res.get("dis")
    if d:
        f = d["flow"]
        lines += ["", (f"--flow dis ({f['preset']}, scale {f['scale']:g}), same backend and "
                      "frames, each repeat beside the learned flow's:"),
                  (f"  flow stage {d['stages_ms']['flow']:.1f} ms (DIS on the host "
                  f"{d['dis_ms']:.1f}, warp.onnx {d['warp_ms']:.1f}) against the learned "
                  f"{med['flow']:.1f}"),
                  (f"  r = {d['r']:.4f}, {d['r_over_learned']:.2f}x the learned flow's "
                  f"{res['r']:.4f}"),
                  "  speedup " + ", ".join(
                      f"K={k} {v:.2f}x (learned {res['speedup'].get(k, float('nan')):.2f}x)"
                      for k, v in d["speedup"].items())]
    return [line.rstrip() for line in (*lines, verdict)]


def run_task(task: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build, export, profile one task; print dff-profile's report and the summary."""
    size = tuple(args.size)
    config = paper_config(task, size, args.classes, args.seg_head)
    print(f"[{task}] building the paper's model (random weights, seed {args.seed}) ...",
          flush=True)
    model = build_model(config, args.seed)
    arch = architecture(model)
    print(f"  {describe(arch)}", flush=True)
    engines = work / task
    print(f"[{task}] exporting to {engines} with dff-export's code (parity at "
          f"{format_shape((1, *args.parity_size))}) ...", flush=True)
    export(model, engines, size, args.parity_size)
    del model
    h, w = size
    print(f"[{task}] making {args.frames} synthetic frames at {h}x{w} ...", flush=True)
    frames = make_clip(EVAL_SEEDS[0], args.frames, h, w).frames
    backend = open_backend("onnxruntime-cpu", engines, threads=args.threads)
    try:
        timing = {"transfers": True, "warmup_s": args.warmUp / 1000,
                  "iterations": args.iterations, "duration_s": 0.0}
        print(f"[{task}] timing each stage alone with dff-profile's profile_stages: "
              f"{args.iterations} calls each after {args.warmUp:g} ms of warm-up (9 feature "
              "calls first make its inputs) ...", flush=True)
        stages, wall, other_stages = timed(lambda: profile_stages(backend, frames, 1, **timing))
        print(_took(wall, other_stages), flush=True)
        med = {s: stages[s]["latency_ms"]["median"] for s in STAGES}
        r = (med["flow"] + med["task"]) / (med["feature"] + med["task"])  # as dff-profile
        intervals = [1, *args.key_intervals]
        keys = sum(-(-args.frames // k) for k in intervals)
        estimate = (keys * med["feature"] + (len(intervals) * args.frames - keys) * med["flow"]
                    + len(intervals) * args.frames * med["task"]) / 1000
        print(f"[{task}] end to end with dff-profile's profile_end_to_end at K="
              f"{','.join(map(str, intervals))}, {args.frames} frames each, {args.repeats} "
              f"time(s) (about {estimate:.0f} s each by the stage medians) ...", flush=True)
        dis = DisFlow() if args.flow == "dis" else None
        if dis is not None:
            print(f"[{task}] --flow dis: the flow stage again with DIS ({dis.preset}, scale "
                  f"{dis.scale:g}) on the host and warp.onnx ...", flush=True)
            dis_stages, wall, _ = timed(lambda: profile_stages(backend, frames, 1, dis,
                                                               **timing))
            print(_took(wall, None), flush=True)
            r_dis = ((dis_stages["flow"]["latency_ms"]["median"] + med["task"])
                     / (med["feature"] + med["task"]))
        repeats, others, dis_repeats = [], [], []
        for i in range(args.repeats):
            rows, wall, other = timed(lambda: profile_end_to_end(backend, frames, intervals, r))
            repeats.append(rows)
            others.append(other)
            print(f"  {i + 1}/{args.repeats}: speedup {_speedups(rows)};{_took(wall, other)[1:]}",
                  flush=True)
            if dis is not None:  # DIS's K > 1 in the same repeat, against its per-frame run
                rows, wall, other = timed(lambda: profile_end_to_end(
                    backend, frames, args.key_intervals, r_dis, dis))
                for row in rows:
                    row["speedup"] = row["fps"] / repeats[-1][0]["fps"]
                dis_repeats.append([repeats[-1][0], *rows])
                others.append(other)
                print(f"       dis: speedup {_speedups(rows)};{_took(wall, other)[1:]}",
                      flush=True)
        name = backend.name
    finally:
        backend.close()
    profile = {"tool": "dff-profile", "task": task, "backend": name, "precision": None,
               "engine_dir": str(engines), "shape": [1, h, w], "frames": args.frames,
               "clip_seed": EVAL_SEEDS[0], "warmUp_ms": args.warmUp,
               "iterations": args.iterations, "duration_s": None, "noDataTransfers": False,
               "stages": stages, "r": r, "end_to_end": median_rows(repeats)}
    print()
    for line in format_report(profile):
        print(line)
    result = {"task": task, "seg_head": args.seg_head if task == SEGMENTATION else None,
              "size": [h, w], "weights": WEIGHTS, "backend": name,
              "threads": args.threads, "frames": args.frames, "seed": args.seed,
              "parity_size": list(args.parity_size), "architecture": arch,
              "repeats": args.repeats,
              "other_cpu_share": {"stages": other_stages, "end_to_end": _mean(others)},
              "architecture_line": describe(arch), **summarise(profile), "profile": profile,
              "end_to_end_repeats": repeats}
    result["targets"] = targets(result)
    if dis is not None:
        result["dis"] = {"flow": dis.settings(),
                         **summarise({**profile, "stages": {**stages, "flow": dis_stages["flow"]},
                                      "r": r_dis, "end_to_end": median_rows(dis_repeats)}),
                         "dis_ms": dis_stages["dis"]["latency_ms"]["median"],
                         "warp_ms": dis_stages["warp"]["latency_ms"]["median"],
                         "end_to_end_repeats": dis_repeats}
        result["dis"]["r_over_learned"] = r_dis / r
    print()
    for line in format_summary(result):
        print(line)
    print(flush=True)
    return result


def intervals_arg(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 5,10,20") from None
    if not values or values[0] < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: key intervals must be >= 2 (K=1, the "
                                         "per-frame baseline, always runs)")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=(*TASKS, "both"), default=SEGMENTATION,
                   help="the task head (default: segmentation)")
    p.add_argument("--size", type=size_arg, default=(576, 1024), metavar="HxW",
                   help="frame size (default: 576x1024, the paper's 600x1000 at stride 16)")
    p.add_argument("--parity-size", type=size_arg, default=(64, 128), metavar="HxW",
                   help="dff-export's opt shape, where it checks parity (default: 64x128; "
                        "--size makes the graphs static)")
    p.add_argument("--seg-head", choices=SEG_HEADS, default="paper",
                   help="segmentation's head: the paper's 1x1 score convolution and bilinear "
                        "upsampling (default), or dff-trt's ASPP head (the shipped model's)")
    p.add_argument("--classes", type=int, metavar="N",
                   help="classes (default: 19 for segmentation, 30 for detection)")
    p.add_argument("--iterations", type=int, default=10, metavar="N",
                   help="timed calls per stage (default: 10)")
    p.add_argument("--warmUp", "--warmup", dest="warmUp", type=float, default=1.0, metavar="MS",
                   help="warm-up per stage in ms; at least one call (default: 1, one call)")
    p.add_argument("--key-intervals", type=intervals_arg, default=[5, 10, 20], metavar="K,...",
                   help="DFF's key intervals end to end, beside K=1 (default: 5,10,20)")
    p.add_argument("--frames", type=int, default=20, metavar="N",
                   help="frames per end-to-end run (default: 20, a multiple of every K)")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="end-to-end runs of every K; each K shows the run with the median "
                        "speedup (default: 3; a shared machine swings single runs)")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime threads per stage (default: 0, its choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--flow", choices=("learned", "dis"), default="learned",
                   help="dis: also time the flow stage and DFF end to end with OpenCV's DIS on "
                        "the host + warp.onnx, in the same run and repeats as the learned flow")
    p.add_argument("--keep", metavar="DIR", help="export into DIR and keep it (default: a "
                   "temporary folder, removed at the end)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON (with --task "
                   "both: one object per task, by name)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when issue 13's target (K=10 speedup, efficiency) is not met")
    p.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    return p


def run(args: argparse.Namespace) -> int:
    if args.parity_size[0] > args.size[0] or args.parity_size[1] > args.size[1]:
        raise DffError(f"--parity-size {args.parity_size[0]}x{args.parity_size[1]} is larger "
                       f"than --size {args.size[0]}x{args.size[1]}; pick one within it")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise DffError(f"--json {args.json}: its folder does not exist; create it first")
    tasks = TASKS if args.task == "both" else (args.task,)
    with tempfile.TemporaryDirectory(prefix="dff-paper-scale-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        results = {task: run_task(task, args, work) for task in tasks}
    if args.json:
        write_summary(args.json, results[tasks[0]] if len(tasks) == 1 else results)
        print(f"wrote {args.json}")
    return 1 if args.check and not all(r["targets"]["met"] for r in results.values()) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("iterations", "frames", "classes", "repeats"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "frames" else 1):
            build_parser().error(f"--{name} must be at least {2 if name == 'frames' else 1}")
    return guarded("paper_scale", args.verbose, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
