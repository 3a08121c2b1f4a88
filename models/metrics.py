"""Detection AP with pycocotools (docs/DESIGN.md §5), in memory; numpy and pycocotools only.

One COCO image per video frame, one category per class. Ground truths have iscrowd 0 and the
ignore flag of the benchmark's ignore regions (§4): a detection matched to one is dropped from
the count, so it neither helps nor hurts. All object sizes count (one area range), up to
`max_dets` detections per frame. AP is COCO's 101-point interpolated AP, the mean over the
classes that have ground truth: `map50` at IoU 0.5, `map` over IoU 0.50:0.05:0.95.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from dff.errors import DffError

AREA_ALL = [0.0, 1e10]


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


