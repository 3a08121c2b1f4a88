"""Detection AP with pycocotools (docs/DESIGN.md §15), in memory; numpy and pycocotools only.

One COCO image per video frame, one category per class. Ground truths have iscrowd 0 and the
ignore flag of the benchmark's ignore regions (§14): a detection matched to one is dropped from
the count, so it neither helps nor hurts. All object sizes count (one area range), up to
`max_dets` detections per frame. AP is COCO's 101-point interpolated AP, the mean over the
classes that have ground truth: `map50` at IoU 0.5, `map` over IoU 0.50:0.05:0.95.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from dff.errors import DffError

AREA_ALL = [0.0, 1e10]


def confusion(pred: np.ndarray, label: np.ndarray, k: int) -> np.ndarray:
    """[k,k] counts of (label, prediction) pairs: row = label, column = prediction."""
    return np.bincount(label.ravel().astype(np.int64) * k + pred.ravel(),
                       minlength=k * k).reshape(k, k)


def miou(conf: np.ndarray) -> float:
    """Mean IoU over the classes that occur in the labels or the predictions."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


def clip_ground_truth(clip: Any) -> list[dict[str, np.ndarray]]:
    """Per frame of a `dff.data.synthetic.Clip`: {"boxes" [M,4] x0,y0,x1,y1, "classes" [M]
    (0-based detection classes: segmentation label - 1), "ignore" [M] bool}."""
    return [{"boxes": np.asarray(b, np.float64).reshape(-1, 4),
             "classes": np.asarray(c, np.int64) - 1, "ignore": np.asarray(i, bool)}
            for b, c, i in zip(clip.boxes, clip.box_classes, clip.box_ignore)]


def detection_ap(frames: list[tuple[dict, dict]], class_names: list[str] | tuple[str, ...],
                 max_dets: int = 100) -> dict[str, Any]:
    """AP of detections against ground truth; `frames` has one (gt, det) per video frame:
    gt = {"boxes" [M,4] x0,y0,x1,y1 pixels, "classes" [M] (index into class_names), "ignore"
    [M] bool}, det = {"boxes" [n,4], "scores" [n], "classes" [n]}. Returns {"map50", "map",
    "per_class": {name: {"ap50", "ap"}} (None for a class without ground truth), "frames",
    "detections"}."""
    try:
        from pycocotools.coco import COCO
    except ImportError as e:
        raise DffError("detection AP needs pycocotools: pip install 'dff-trt[train]'") from e
    categories = [{"id": k + 1, "name": str(n)} for k, n in enumerate(class_names)]
    images, gts, dts = [], [], []
    for image_id, (gt, det) in enumerate(frames, start=1):
        images.append({"id": image_id})
        boxes = np.asarray(gt["boxes"], np.float64).reshape(-1, 4)
        ignore = np.asarray(gt.get("ignore", np.zeros(len(boxes), bool)), bool).reshape(-1)
        for box, cls, ign in zip(boxes, np.asarray(gt["classes"]).reshape(-1), ignore):
            gts.append(_annotation(len(gts) + 1, image_id, box, cls, iscrowd=0,
                                   dff_ignore=int(ign)))
        boxes = np.asarray(det["boxes"], np.float64).reshape(-1, 4)
        for box, score, cls in zip(boxes, np.asarray(det["scores"]).reshape(-1),
                                   np.asarray(det["classes"]).reshape(-1)):
            dts.append(_annotation(len(dts) + 1, image_id, box, cls, score=float(score)))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "categories": categories, "annotations": gts}
        coco_dt.dataset = {"images": images, "categories": categories, "annotations": dts}
        coco_gt.createIndex()
        coco_dt.createIndex()
        ev = _ignore_aware_eval()(coco_gt, coco_dt, "bbox")
        ev.params.areaRng, ev.params.areaRngLbl = [AREA_ALL], ["all"]
        ev.params.maxDets = sorted({1, min(10, max_dets), max_dets})
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [IoU thresholds, recall, classes]
    per_class, ap50s, aps = {}, [], []
    for k, name in enumerate(class_names):
        p = precision[:, :, k]
        if (p < 0).all():  # no ground truth of this class
            per_class[str(name)] = {"ap50": None, "ap": None}
            continue
        ap50, ap = float(np.mean(p[0])), float(np.mean(p))
        per_class[str(name)] = {"ap50": round(ap50, 5), "ap": round(ap, 5)}
        ap50s.append(ap50)
        aps.append(ap)
    return {"map50": round(float(np.mean(ap50s)), 5) if ap50s else 0.0,
            "map": round(float(np.mean(aps)), 5) if aps else 0.0,
            "per_class": per_class, "frames": len(frames), "detections": len(dts)}


def bootstrap_ap(runs: dict[str, list[tuple[dict, dict]]], groups: Sequence[Hashable],
                 pairs: Sequence[tuple[str, str]], class_names: list[str] | tuple[str, ...],
                 samples: int = 200, seed: int = 0, max_dets: int = 100, level: float = 0.95,
                 wrap: Callable[[Iterable], Iterable] = iter) -> dict[str, dict]:
    """How sure a difference in AP is: a paired bootstrap over groups of frames (clips).

    `runs` maps a run's name to its (gt, det) per frame as `detection_ap` takes them, every run
    over the same frames in the same order; `groups[i]` is frame i's clip. Each of `samples`
    draws takes as many clips as there are, with replacement, the same clips for every run, and
    scores them with `detection_ap`. For each pair (a, b) it returns under "a-b", for "map50"
    and "map": the difference a − b on all frames ("diff"), the central `level` interval of the
    drawn differences ("low", "high") and the share of draws where a scored higher
    ("p_higher"). Frames of a clip move together, as their errors do. `wrap` wraps the draws'
    iterator (a progress bar)."""
    if samples < 1 or not 0 < level < 1:
        raise ValueError(f"samples {samples} must be at least 1 and level {level} in (0, 1)")
    for name, frames in runs.items():
        if len(frames) != len(groups):
            raise ValueError(f"run {name!r}: {len(frames)} frames, {len(groups)} groups")
    clips: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        clips.setdefault(g, []).append(i)
    members = list(clips.values())
    names = sorted({m for pair in pairs for m in pair})

    def scores(index: list[int]) -> dict[str, dict]:
        return {m: detection_ap([runs[m][i] for i in index], class_names, max_dets)
                for m in names}

    full = scores(list(range(len(groups))))
    rng = np.random.default_rng(seed)
    drawn: dict[tuple[str, str], dict[str, list[float]]] = {
        pair: {"map50": [], "map": []} for pair in pairs}
    for _ in wrap(range(samples)):
        picked = rng.integers(len(members), size=len(members))
        res = scores([i for j in picked for i in members[j]])
        for a, b in pairs:
            for key in ("map50", "map"):
                drawn[(a, b)][key].append(res[a][key] - res[b][key])
    tail = (1 - level) / 2 * 100
    out = {}
    for a, b in pairs:
        out[f"{a}-{b}"] = {key: {"diff": round(full[a][key] - full[b][key], 5),
                                 "low": round(float(np.percentile(d, tail)), 5),
                                 "high": round(float(np.percentile(d, 100 - tail)), 5),
                                 "p_higher": round(float(np.mean(np.asarray(d) > 0)), 4)}
                           for key, d in drawn[(a, b)].items()}
    return out


def _annotation(ann_id: int, image_id: int, box: np.ndarray, cls: Any, **extra) -> dict:
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
    return {"id": ann_id, "image_id": image_id, "category_id": int(cls) + 1,
            "bbox": [x0, y0, w, h], "area": w * h, **extra}


def _ignore_aware_eval() -> type:
    """COCOeval's subclass, built on first use (pycocotools is imported lazily)."""
    from pycocotools.cocoeval import COCOeval

    class IgnoreAwareEval(COCOeval):
        """COCOeval whose ground truths keep our ignore flag: its _prepare overwrites `ignore`
        with `iscrowd`, so the flag travels as `dff_ignore` and is set again afterwards."""

        def _prepare(self):
            super()._prepare()
            for anns in self._gts.values():
                for gt in anns:
                    gt["ignore"] = int(bool(gt["ignore"]) or bool(gt.get("dff_ignore", 0)))

    return IgnoreAwareEval


