"""dff-eval --split motion: accuracy by motion category, and key-frame schedules at equal cost.

On dff.data.motion's evaluation split, per category (slow, medium, fast, cuts, bursts) and
overall: per-frame inference, DFF and the copy baseline at each key interval, and each
schedule at one key-frame budget (default 10 % of the frames): fixed k = 1 / budget, the
adaptive rule under a KeyBudget, and the learned one (the quality head's prediction; only for
a model that has one). The budget's starting thresholds come from the tuning split
(`tune`), never from the evaluation clips. Each schedule reports the key-frame fraction it
really used. PyTorch on the CPU; fps counts the model (the schedules' tests included).
"""

from __future__ import annotations

import numpy as np
from dff.data.motion import CATEGORIES, MotionClip, motion_split
from dff.models.dff import DFF
from dff.models.evaluate import confusion, miou, run_streams
from dff.models.metrics import clip_ground_truth, detection_ap
from dff.runtime.flows import DisFlow
from dff.runtime.scheduler import LEARNED_THRESHOLD, Adaptive, KeyBudget, Learned, make_scheduler

from dff.tasks import DETECTION

INTERVALS = (5, 10, 20)
BUDGET = 0.1
# starting thresholds tried on the tuning split, in each schedule's score units (adaptive:
# its tests' ratio to their thresholds; learned: the predicted relative error)
GRID = {"adaptive": (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0),
        "learned": (0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0)}


def run_fixed(model: DFF, clip, interval: int | None, copy: bool,
              flow: DisFlow | None = None) -> tuple[list, int, float]:
    """Per-frame (interval None), DFF or the copy baseline at a fixed interval: each frame's
    task outputs, the key frames used, and the seconds spent."""
    return run_schedule(model, clip, make_scheduler("fixed", interval or 1), copy,
                        flow if interval and interval > 1 and not copy else None)


def run_schedule(model: DFF, clip, scheduler, copy: bool = False,
                 flow: DisFlow | None = None) -> tuple[list, int, float]:
    """Each frame's task outputs of `clip` under `scheduler`, the key frames used, and the
    seconds spent; `flow` a host flow (DisFlow) in place of the flow net."""
    outs, keys, seconds = run_streams(model, [clip.frames], [scheduler], copy=copy, flow=flow)
    return outs[0], keys[0], seconds


class Tally:
    """Accuracy, key frames, frames and seconds of one run kind over some clips."""

    def __init__(self, model: DFF):
        self.model, self.detect = model, model.config.task == DETECTION
        k = model.config.num_classes
        self.conf = np.zeros((k, k), np.int64)
        self.found: list = []
        self.keys = self.frames = 0
        self.seconds = 0.0

    def add(self, clip, outs: list, keys: int, seconds: float) -> None:
        if self.detect:
            self.found += zip(clip_ground_truth(clip), outs)
        else:
            for i, out in enumerate(outs):
                self.conf += confusion(out["labels"].astype(np.int64), clip.labels[i],
                                       self.conf.shape[0])
        self.keys += keys
        self.frames += len(outs)
        self.seconds += seconds

    def result(self) -> dict:
        out: dict = {"key_fraction": round(self.keys / max(self.frames, 1), 4),
                     "fps": round(self.frames / max(self.seconds, 1e-9), 2)}
        if self.detect:
            cfg = self.model.config
            ap = detection_ap(self.found, cfg.class_names, cfg.max_detections)
            return {"map50": ap["map50"], "map": ap["map"], **out}
        return {"miou": round(miou(self.conf), 5), **out}


def schedules_for(model: DFF, flow: DisFlow | None = None) -> list[str]:
    """The schedules to run: learned needs the flow net's quality output, so not with DIS."""
    learned = model.quality_head is not None and flow is None
    return ["fixed", "adaptive"] + (["learned"] if learned else [])


def _scheduler(name: str, budget: KeyBudget, stride: int):
    """The budgeted schedule `name` under `budget` (its own, or one to share)."""
    return Adaptive(stride=stride, key_budget=budget) if name == "adaptive" else Learned(budget)


def run_all(model: DFF, clips: list[MotionClip], name: str, budget: float,
            threshold: float | None, pooled: bool,
            flow: DisFlow | None = None) -> list[tuple[list, int, float]]:
    """Per clip (outs, keys, seconds) of schedule `name` at `budget`: a budget per clip, or
    with `pooled` one for all the clips run as concurrent streams (run_streams, their order
    turning each frame; its seconds are shared out by frames)."""
    stride = model.config.stride
    if name == "fixed":
        return [run_schedule(model, m.clip, make_scheduler("fixed", round(1 / budget)),
                             flow=flow) for m in clips]
    if threshold is None:
        threshold = LEARNED_THRESHOLD if name == "learned" else 1.0
    if not pooled:
        return [run_schedule(model, m.clip, _scheduler(name, KeyBudget(budget, threshold),
                                                       stride), flow=flow) for m in clips]
    shared = KeyBudget(budget, threshold, streams=len(clips))
    outs, keys, seconds = run_streams(model, [m.clip.frames for m in clips],
                                      [_scheduler(name, shared, stride) for _ in clips],
                                      rotate=True, flow=flow)
    frames = sum(len(m.clip.frames) for m in clips)
    return [(o, k, seconds * len(m.clip.frames) / frames)
            for m, o, k in zip(clips, outs, keys)]


def tune(model: DFF, budget: float = BUDGET, clips: list[MotionClip] | None = None,
         pooled: bool = False, progress: bool = True,
         flow: DisFlow | None = None) -> dict[str, float]:
    """Per budgeted schedule, the starting threshold of GRID with the best accuracy on the
    tuning split (its clips of every category) at `budget` (shared by them with `pooled`)."""
    from tqdm import tqdm

    h, w = model.config.input_size
    clips = clips if clips is not None else list(motion_split("tuning", height=h, width=w))
    best = {}
    for name in schedules_for(model, flow)[1:]:
        scores = {}
        for threshold in tqdm(GRID[name], desc=f"tune {name}", disable=not progress):
            tally = Tally(model)
            for m, res in zip(clips, run_all(model, clips, name, budget, threshold, pooled,
                                             flow)):
                tally.add(m.clip, *res)
            r = tally.result()
            scores[threshold] = r.get("miou", r.get("map50"))
        best[name] = max(scores, key=lambda th: (scores[th], -abs(np.log(th))))
    return best


def evaluate_motion(model: DFF, budget: float = BUDGET, intervals=INTERVALS,
                    clips: int | None = None, thresholds: dict[str, float] | None = None,
                    progress: bool = True, flow: DisFlow | None = None) -> dict:
    """The motion split's table (module docstring) as the JSON dff-eval --split motion
    writes; `flow` (a DisFlow) runs DFF and the schedules with DIS in place of the flow net
    (and so without the learned schedule)."""
    from tqdm import tqdm

    h, w = model.config.input_size
    if thresholds is None:
        tuning = list(motion_split("tuning", height=h, width=w))
        thresholds = {"stream": tune(model, budget, tuning, progress=progress, flow=flow),
                      "pooled": tune(model, budget, tuning, pooled=True, progress=progress,
                                     flow=flow)}
    runs = [("per_frame", None, False)] + [("dff", k, False) for k in intervals] \
        + [("copy", k, True) for k in intervals]
    names = schedules_for(model, flow)
    scheduled = [("stream", n) for n in names] + [("pooled", n) for n in names[1:]]
    tallies = {c: {r: Tally(model) for r in [*runs, *scheduled]}
               for c in [*CATEGORIES, "all"]}
    flows: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    split = list(motion_split("eval", clips=clips, height=h, width=w))

    def add(kind, m: MotionClip, res) -> None:
        for c in (m.category, "all"):
            tallies[c][kind].add(m.clip, *res)

    for m in tqdm(split, desc="motion split", disable=not progress):
        flows[m.category].append(m.mean_flow_px)
        for r in runs:
            add(r, m, run_fixed(model, m.clip, r[1], r[2], flow))
    for mode, n in tqdm(scheduled, desc="schedules", disable=not progress):
        for m, res in zip(split, run_all(model, split, n, budget, thresholds[mode].get(n),
                                         mode == "pooled", flow)):
            add((mode, n), m, res)

    def table(c: str) -> dict:
        t = tallies[c]
        return {"per_frame": t[runs[0]].result(),
                "dff": {str(k): t[("dff", k, False)].result() for k in intervals},
                "copy": {str(k): t[("copy", k, True)].result() for k in intervals}}

    categories = {c: {"clips": len(flows[c]), "mean_flow_px": round(float(np.mean(flows[c])), 3),
                      **table(c)} for c in CATEGORIES if flows[c]}
    schedules: dict = {"stream": {}, "pooled": {}}
    for mode, n in scheduled:
        schedules[mode][n] = {**tallies["all"][(mode, n)].result(),
                              "threshold": thresholds[mode].get(n),
                              "by_category": {c: tallies[c][(mode, n)].result()
                                              for c in categories}}
    schedules["pooled"] = {"fixed": schedules["stream"]["fixed"], **schedules["pooled"]}
    return {"split": "motion", "task": model.config.task, "budget": budget,
            "categories": categories, "overall": table("all"), "schedules": schedules["stream"],
            "schedules_pooled": schedules["pooled"],
            "frames": tallies["all"][runs[0]].frames, "clips": len(split)}


def format_motion(res: dict) -> str:
    """The table as text: per category and overall, then the schedules at the budget."""
    metric = "map50" if res["task"] == DETECTION else "miou"
    label = "AP50" if metric == "map50" else "mIoU"
    rows = [*res["categories"].items(), ("overall", res["overall"])]
    ks = list(res["overall"]["dff"])
    head = f"{'category':10s} {'flow px':>8s} {'per-frame':>9s} " + " ".join(
        f"{'dff k=' + k:>9s} {'copy k=' + k:>10s}" for k in ks)
    title = (f"{label} by motion category (motion split, {res['clips']} clips, "
             f"{res['frames']} frames)")
    lines = [title, head]
    for name, r in rows:
        flow = f"{r['mean_flow_px']:8.2f}" if "mean_flow_px" in r else f"{'':8s}"
        cells = " ".join(f"{r['dff'][k][metric]:9.4f} {r['copy'][k][metric]:10.4f}" for k in ks)
        lines.append(f"{name:10s} {flow} {r['per_frame'][metric]:9.4f} {cells}")
    cats = list(res["categories"])
    for key, how in (("schedules", "a budget per stream"),
                     ("schedules_pooled", "one budget shared by all the clips as streams")):
        title = (f"schedules at a {res['budget']:.0%} key-frame budget, {how} ({label}, "
                 "then the key-frame fraction used, overall and by category; fps)")
        lines += ["", title,
                  f"{'schedule':9s} {'overall':>8s} {'fps':>7s} "
                  + " ".join(f"{c:>8s}" for c in cats)]
        for name, r in res[key].items():
            by = r["by_category"]
            lines.append(f"{name:9s} {r[metric]:8.4f} {r['fps']:7.1f} "
                         + " ".join(f"{by[c][metric]:8.4f}" for c in cats))
            lines.append(f"{'  keys':9s} {r['key_fraction']:8.3f} {'':7s} "
                         + " ".join(f"{by[c]['key_fraction']:8.3f}" for c in cats))
    return "\n".join(lines)
