"""What dff-tune recommends (issue 24; DESIGN.md §21), from the figures dff.models.tune
measures: the Pareto frontier of cost against agreement, the cheapest candidate that meets a
target, a recommendation measured again on other footage (`verify`), and for a model too slow
for the grid, every candidate's cost from stage medians (`cost_only`). Plain lines and the
table for the command.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from dff.export.manifest import DIS, LEARNED
from dff.models.agreement import open_clip
from dff.models.tune import (
    COPY,
    DFF,
    INTERVALS,
    PER_FRAME,
    RESIZE,
    Candidate,
    Rendered,
    graph_takes,
    grid,
    measure,
    reduced_sizes,
)
from dff.runtime.backends import Backend
from dff.runtime.propagate import TRACK, WARP_OUTPUT

from dff.errors import DffError
from dff.tasks import DETECTION

DEFAULT_TARGET = 0.95
AGREEMENT_POINTS, SPEEDUP_SHARE = 1.5, 0.2  # --verify: a prediction holds within these


def frontier(rows: list[dict]) -> list[int]:
    """The indices of the Pareto frontier: no other candidate costs no more and agrees at
    least as well, one of them strictly; by cost."""
    scored = sorted((i for i, r in enumerate(rows) if r["agreement"] is not None
                     and r["ms_per_frame"] is not None),
                    key=lambda i: (rows[i]["ms_per_frame"], -rows[i]["agreement"]))
    out, best = [], -np.inf
    for i in scored:
        if rows[i]["agreement"] > best:
            out.append(i)
            best = rows[i]["agreement"]
    return out


def recommend(rows: list[dict], target: float) -> int | None:
    """The cheapest candidate whose agreement is at least `target`, or None."""
    ok = [i for i, r in enumerate(rows) if r["agreement"] is not None
          and r["ms_per_frame"] is not None and r["agreement"] >= target]
    return min(ok, key=lambda i: rows[i]["ms_per_frame"]) if ok else None


def check_target(target: float) -> float:
    if not 0 < target <= 1:
        raise DffError(f"--target {target}: agreement (mIoU or AP against per-frame inference) "
                       "is at most 1; give a fraction in (0, 1], e.g. 0.95")
    return float(target)


def tune(backend: Backend, manifest: dict, videos: Sequence[Any],
         target: float = DEFAULT_TARGET, max_drop: float | None = None,
         **kw: Any) -> dict[str, Any]:
    """`measure`, then the frontier and the recommendation at `target`, or, with `max_drop`
    (points), at per-frame's own score less that (`target_rule` says which)."""
    check_target(target)
    if max_drop is not None and not 0 <= max_drop < 100:
        raise DffError(f"--max-drop {max_drop}: give the points of agreement the recommendation "
                       "may lose against per-frame, from 0 to below 100, e.g. 1.5")
    res = measure(backend, manifest, videos, **kw)
    rows = res["candidates"]
    if max_drop is not None:
        base = rows[0]["agreement"]
        if base is None:
            raise DffError("--max-drop: per-frame inference could not be scored on this "
                           "footage, so there is no score to drop from; give --target")
        target = round(base - max_drop / 100, 6)
        res["target_rule"] = f"per-frame's {base:.4f} less {max_drop:g} points"
    else:
        res["target_rule"] = "--target"
    res["target"] = target
    res["frontier"] = frontier(rows)
    res["recommended"] = recommend(rows, target)
    return res


COST_FACTORS = (0.75, 0.5, 0.35, 0.25)  # --cost-only's smaller inputs: enough to bracket
COST_FRAMES = 8  # --cost-only's frames per video by default


def cost_only(backend: Backend, manifest: dict, videos: Sequence[Any], *,
              size: tuple[int, int] | None = None, intervals: Sequence[int] = INTERVALS,
              max_frames: int | None = COST_FRAMES, kinds: Sequence[str] | None = None,
              dis_preset: str | None = None, dis_scale: float | None = None,
              progress: bool = True, **_: Any) -> dict[str, Any]:
    """Every fixed-schedule candidate's cost from stage medians, for a model too slow to run
    the grid end to end (the paper-scale one): probes (per-frame; per-frame at COST_FACTORS
    of each side, timed end to end; and each kind at the largest k) run on the footage; a
    candidate at k then costs decode + upload + schedule + (feature + task) / k + (1 - 1/k) x
    (its non-key stage(s)), from the probes' medians. No agreement is measured; `match` says
    which k or size each alternative needs to cost no more than DFF at k = 10."""
    if not videos:
        raise DffError("no videos to cost on; pass --video FILE")
    first = videos[0] if isinstance(videos[0], Rendered) else open_clip(videos[0], size, manifest)
    if not isinstance(first, Rendered):
        first.video.close()
    frame_size = first.size
    k_max = max(intervals)
    takes = graph_takes(backend)  # one probe per size for grid's sizes and these
    full = grid(manifest, backend, frame_size, intervals, takes)
    probes = [Candidate(PER_FRAME, schedule="per-frame")]
    probes += [Candidate(RESIZE, schedule="per-frame", size=s) for s in
               reduced_sizes(frame_size, int(manifest["stride"]), manifest["profile"],
                             COST_FACTORS, takes)]
    probes += [c for c in full if c.k == k_max and c.schedule == "fixed"
               and c.kind in (DFF, COPY, WARP_OUTPUT, TRACK)]
    if kinds:
        probes = [c for c in probes if c.kind in kinds or c.kind == PER_FRAME]
    res = measure(backend, manifest, videos, size=size, max_frames=max_frames,
                  dis_preset=dis_preset, dis_scale=dis_scale, candidates=probes,
                  progress=progress)
    rows = res["candidates"]
    ref = rows[0]["stage_ms"]
    base = res["decode_ms_per_frame"] + ref.get("upload", 0.0) + ref.get("schedule", 0.0)
    key = ref["feature"] + ref["task"]
    out = [{**rows[0], "agreement": None, "cost": "end to end"}]
    out += [{**r, "agreement": None, "cost": "end to end"} for r in rows if r["kind"] == RESIZE]
    for r in rows:
        if r["kind"] in (PER_FRAME, RESIZE):
            continue
        nonkey = r["stage_ms"].get("flow", 0.0) + (
            0.0 if r["kind"] in (WARP_OUTPUT, TRACK) else ref["task"])
        for k in intervals:
            c = Candidate(r["kind"], k, r["flow"], "fixed")
            ms = base + key / k + (1 - 1 / k) * nonkey
            out.append({**c.record(frame_size), "label": c.label, "ms_per_frame": round(ms, 3),
                        "agreement": None, "key_fraction": round(1 / k, 4),
                        "cost": "stage medians", "speedup": round(rows[0]["ms_per_frame"] / ms, 3)})
    res["candidates"] = out
    res["timing"] = ("stage medians (cost only, no agreement): per-frame and resize end to end, "
                     "the rest decode + upload + (feature + task) / k + (1 - 1/k) x non-key "
                     "stages")
    res["probes"] = rows
    res["match"] = _match(out)
    res["target"], res["frontier"], res["recommended"] = None, [], None
    return res


def _match(rows: list[dict]) -> dict[str, Any]:
    """What each alternative needs to cost no more than DFF at k = 10 (learned flow, else
    DIS): the smallest k, or the largest input size; None where nothing in the grid does."""
    dff10 = next((r for src in (LEARNED, DIS) for r in rows if r["kind"] == DFF
                  and r["flow"] == src and r["k"] == 10), None)
    if dff10 is None:
        return {}
    bar = dff10["ms_per_frame"]
    out: dict[str, Any] = {"dff": dff10["label"], "ms_per_frame": bar}
    for label, pick in (("copy", lambda r: r["kind"] == COPY),
                        ("dff dis", lambda r: r["kind"] == DFF and r["flow"] == DIS),
                        ("warp-output", lambda r: r["kind"] == WARP_OUTPUT),
                        ("track", lambda r: r["kind"] == TRACK)):
        ks = sorted(r["k"] for r in rows if pick(r) and r["ms_per_frame"] <= bar)
        if any(pick(r) for r in rows):
            out[label] = {"k": ks[0] if ks else None}
    sizes = [r for r in rows if r["kind"] == RESIZE and r["ms_per_frame"] <= bar]
    out["resize"] = {"size": max(sizes, key=lambda r: r["size"][0] * r["size"][1])["size"]
                     if sizes else None}
    return out


def explain(res: dict) -> list[str]:
    """Plain lines: what is recommended, and whether DFF is on the frontier and why not."""
    rows, lines = res["candidates"], []
    rec = res["recommended"]
    score = _score_name(res)
    if "match" in res:  # cost only
        m = res["match"]
        if not m:
            return ["cost only: no DFF candidate at k = 10 to compare with"]
        parts = []
        for kind, v in m.items():
            if not isinstance(v, dict):
                continue
            if v.get("k"):
                parts.append(f"{kind} at k={v['k']}")
            elif v.get("size"):
                parts.append(f"{kind} at {'x'.join(map(str, v['size']))}")
            else:
                parts.append(f"{kind}: nothing in the grid")
        need = "; ".join(parts)
        return [(f"cost only (no agreement measured): to cost no more than {m['dff']} "
                f"({m['ms_per_frame']:.1f} ms/frame) takes {need}")]
    if all(r["agreement"] is None for r in rows):
        return [("no candidate could be scored: the reference has nothing to score against "
                "(a detector that found nothing above its score threshold?)")]
    if rec is None:
        lines.append(f"no candidate reaches {score} {res['target']:g}; the best is "
                     + _describe(max((r for r in rows if r["agreement"] is not None),
                                     key=lambda r: r["agreement"]), score))
    else:
        lines.append(f"recommended (cheapest at {score} >= {res['target']:g}): "
                     + _describe(rows[rec], score))
    on = [rows[i] for i in res["frontier"]]
    kinds = sorted({r["kind"] for r in on})
    r_text = ", ".join(f"{s} {v:.2f}" for s, v in res["r"].items() if v is not None)
    motion = res.get("motion_px_per_frame")
    why = (f"r (flow + warp + task over feature + task): {r_text or 'not measured'}; motion "
           f"{motion:.2f} px per frame" if motion is not None else "")
    if DFF not in kinds:
        lines.append(f"DFF is not on the frontier (frontier: {', '.join(kinds)}); {why}")
    else:
        mine = [r["label"] for r in on if r["kind"] == DFF]
        listed = ", ".join(mine[:4]) + (f" and {len(mine) - 4} more" if len(mine) > 4 else "")
        lines.append(f"DFF is on the frontier at {listed}, with "
                     f"{', '.join(k for k in kinds if k != DFF)} elsewhere; {why}")
    return lines


def _score_name(res: dict) -> str:
    return "accuracy" if res.get("reference") == "labels" else "agreement"


def _describe(row: dict, score: str = "score") -> str:
    return (f"{row['label']}: {row['ms_per_frame']:.2f} ms/frame ({row['speedup']:.2f}x "
            f"per-frame), {score} {row['agreement']:.4f}")


def candidate_of(row: dict) -> Candidate:
    """The Candidate a JSON row describes (its size kept for resize only)."""
    size = (int(row["size"][0]), int(row["size"][1])) if row["kind"] == RESIZE else None
    return Candidate(row["kind"], row["k"], row["flow"], row["schedule"], size)


def verify(backend: Backend, manifest: dict, previous: dict, videos: Sequence[Any],
           **kw: Any) -> dict[str, Any]:
    """The recommendation of an earlier dff-tune result (`previous`) measured again, with
    per-frame in the same sitting, on other footage: its predicted and measured agreement and
    speedup, and whether they land within AGREEMENT_POINTS and SPEEDUP_SHARE.

    Against per-frame inference (agreement) per-frame scores 1 on any footage, so the score
    itself is compared. Against ground truth (`labels`), per-frame's own accuracy moves with
    the clips, which the choice does not predict: what it predicts is the candidate's loss
    against per-frame, so the verdict compares that (`drop_points`); `agreement_points`, the
    change of the score itself, is reported beside it."""
    rec = previous.get("recommended")
    if rec is None:
        raise DffError("--verify: that dff-tune result recommends nothing (no candidate "
                       "reached its target), so there is nothing to measure again")
    row = previous["candidates"][rec]
    res = measure(backend, manifest, videos, candidates=[candidate_of(row)], **kw)
    base, got = res["candidates"][0], res["candidates"][-1]
    was = previous["candidates"][0] if previous["candidates"][0]["kind"] == PER_FRAME else None

    def points(a: Any, b: Any) -> float | None:
        return None if a is None or b is None else round(100 * (a - b), 3)

    d_points = points(got["agreement"], row["agreement"])
    d_drop = None
    if was is not None and None not in (got["agreement"], base["agreement"],
                                        row["agreement"], was["agreement"]):
        d_drop = round(points(got["agreement"], base["agreement"])  # type: ignore[operator]
                       - points(row["agreement"], was["agreement"]), 3)  # type: ignore[operator]
    d_share = (None if not got["speedup"] or not row["speedup"]
               else round(got["speedup"] / row["speedup"] - 1, 4))
    judged = d_drop if res.get("reference") == "labels" else d_points
    res["verify"] = {
        "candidate": row["label"],
        "predicted": {"agreement": row["agreement"], "speedup": row["speedup"],
                      "per_frame": was["agreement"] if was else None,
                      "videos": previous.get("videos")},
        "measured": {"agreement": got["agreement"], "speedup": got["speedup"],
                     "per_frame": base["agreement"]},
        "agreement_points": d_points, "drop_points": d_drop, "speedup_change": d_share,
        "judged_on": "drop_points" if res.get("reference") == "labels" else "agreement_points",
        "within": (judged is not None and d_share is not None
                   and abs(judged) <= AGREEMENT_POINTS and abs(d_share) <= SPEEDUP_SHARE)}
    return res


def format_table(res: dict, only: Callable[[int], bool] | None = None) -> str:
    """The candidates (`only` those whose index passes; default the frontier), by cost."""
    rows = res["candidates"]
    keep = set(res["frontier"]) if only is None else {i for i in range(len(rows)) if only(i)}
    metric = "AP" if res["task"] == DETECTION else "mIoU"
    lines = [(f"{'candidate':<28}{'size':>10}{'ms/frame':>10}{'speedup':>9}{metric:>9}"
             f"{'keys':>7}")]
    for i in sorted(keep, key=lambda i: rows[i]["ms_per_frame"] or 0):
        r = rows[i]
        mark = " *" if i == res.get("recommended") else ""
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.4f}"
        keys = "-" if r["key_fraction"] is None else f"{r['key_fraction']:.2f}"
        lines.append(f"{r['label'][:28]:<28}{'x'.join(map(str, r['size'])):>10}"
                     f"{r['ms_per_frame']:>10.2f}{r['speedup']:>9.2f}{agree:>9}{keys:>7}{mark}")
    return "\n".join(lines)
