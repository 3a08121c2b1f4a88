"""dff-tune: what to deploy, measured on the user's own footage (issue 24; DESIGN.md §21).

Every candidate (DFF at each k with each flow source and schedule, copy, a smaller input,
outputs carried between key frames, per-frame) is timed end to end on the chosen backend and
scored against per-frame inference, in one sitting (dff.models.tune). It prints the Pareto
frontier of cost against agreement, writes the JSON and a plot, names the cheapest candidate
that meets --target (or says none does) and, with --write, records it in the manifest
(`deploy`) so that dff-run takes it by default.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from dff.commands.common import BACKENDS, choose_backend, guarded, size_arg
from dff.errors import DffError
from dff.export.manifest import load_manifest, write_deploy
from dff.runtime.backends import PRECISIONS
from dff.runtime.flows import PRESETS
from dff.runtime.writers import write_summary

EPILOG = """\
candidates (the JSON's "kind"):
  dff          DFF at k = 2..20 with each flow source (learned, dis) and schedule (fixed;
               adaptive and learned at a key-frame budget of 1/k)
  copy         the key frame's features as they are, k = 2..20
  resize       per-frame inference at about 0.75 and 0.5 of each side, outputs resized back
  warp-output  segmentation: the key frame's labels warped along DIS's flow, k = 2..20
  track        detection: the key frame's boxes carried by a Kalman-filter tracker, k = 2..20
  per-frame    every frame a key frame: the reference (agreement 1)

agreement: mIoU (segmentation) or AP@[.5:.95] (detection) against per-frame inference, over
every frame; ms/frame: decode + every call of the candidate, timed end to end in one sitting
with per-frame's. --write records the recommended candidate in DIR/manifest.json ('deploy');
dff-run then runs it by default, and an explicit --key-interval, --schedule, --flow, --resize
or --propagate wins.

examples:
  dff-tune -e engines/ --video cam1.mp4 cam2.mp4 --json tune.json
  dff-tune -e engines/ --video cam1.mp4 --target 0.9 --json tune.json --write
  dff-tune -e engines/ --video clip.mp4 --quick --max-frames 100 --json tune.json
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dff-tune", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--engine-dir", metavar="DIR", help="the folder dff-export wrote")
    p.add_argument("--video", nargs="*", metavar="FILE", default=[],
                   help="the footage to measure on (one size, or give --resize)")
    p.add_argument("--split", metavar="NAME[:A-B]",
                   help="instead of --video: a synthetic split rendered in memory (eval, motion "
                        "or motion-tuning; clips A to B), at --resize or 128x224")
    p.add_argument("--labels", action="store_true",
                   help="with --split: score accuracy against its ground truth instead of "
                        "agreement with per-frame inference (--target then applies to it)")
    p.add_argument("--target", type=float, default=None, metavar="A",
                   help="the agreement the recommendation must reach, in (0, 1] (default 0.95)")
    p.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="instead of --target: per-frame's own score (with --labels its accuracy; "
                        "otherwise 1) less POINTS, e.g. 1.5")
    p.add_argument("--json", metavar="OUT.json", help="write every candidate's figures here "
                   "(required)")
    p.add_argument("--plot", metavar="OUT.png", help="the frontier plot (default: --json's "
                   "path with .png)")
    p.add_argument("--write", action="store_true",
                   help="record the recommendation in DIR/manifest.json ('deploy'), which dff-run "
                        "takes by default")
    p.add_argument("--verify", metavar="TUNE.json",
                   help="measure again the candidate an earlier dff-tune run recommended (with "
                        "--target or --max-drop: the one its figures give at that bar), with "
                        "per-frame in the same sitting, on this footage (which that run did not "
                        "see): predicted against measured agreement and speedup")
    p.add_argument("--quick", action="store_true", help="k in 2, 5, 10, 20 only")
    p.add_argument("--cost-only", action="store_true",
                   help="for a model too slow for the grid (the paper-scale one): time probes on "
                        "the first frames (--max-frames, default 8) and cost every fixed-schedule "
                        "candidate from their stage medians; no agreement, no recommendation")
    p.add_argument("--intervals", metavar="K,K,...", help="the key intervals (default 2..20)")
    p.add_argument("--kinds", metavar="KIND,...",
                   help="only these candidate kinds (per-frame always runs: the reference)")
    p.add_argument("--resize", type=size_arg, metavar="HxW",
                   help="resize every frame to HxW (multiples of the stride, within the profile)")
    p.add_argument("--max-frames", type=int, metavar="N", help="the first N frames of each video")
    p.add_argument("-b", "--backend", default="auto", choices=BACKENDS, metavar="NAME",
                   help=f"one of {', '.join(BACKENDS)} (default: auto)")
    p.add_argument("--device", type=int, default=0, metavar="N", help="CUDA device index")
    p.add_argument("--precision", choices=PRECISIONS["tensorrt"],
                   help="the backend's precision (dff-run's --precision)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads per stage (default: 0 = the library's choice)")
    p.add_argument("--dis-preset", choices=PRESETS, default=None,
                   help="DIS's preset for dff dis and warp-output (default: the manifest's)")
    p.add_argument("--dis-scale", type=float, default=None, metavar="F",
                   help="DIS's fraction of each side (default: the manifest's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="full tracebacks on errors")
    return p


def _intervals(args: argparse.Namespace) -> tuple[int, ...]:
    from dff.models.tune import INTERVALS, QUICK_INTERVALS

    if args.intervals is None:
        return QUICK_INTERVALS if args.quick else INTERVALS
    if args.quick:
        raise DffError("--quick is a grid of k; give it or --intervals, not both")
    try:
        ks = tuple(sorted({int(x) for x in args.intervals.split(",") if x.strip()}))
    except ValueError:
        ks = ()
    if not ks or ks[0] < 2:
        raise DffError(f"--intervals {args.intervals!r}: give key intervals of at least 2 "
                       "(k=1 is per-frame inference, always measured), e.g. 2,5,10")
    return ks


def _kinds(args: argparse.Namespace, manifest: dict, backend, where: str) -> list[str] | None:
    """--kinds checked: known kinds, and a dff candidate only where the export has a flow."""
    from dff.models.tune import DFF, KINDS

    if args.kinds is None:
        return None
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise DffError(f"--kinds {args.kinds!r}: choose among {', '.join(KINDS)}")
    if DFF in kinds and not backend.flow_sources:
        raise DffError(f"--kinds dff: {where} has no flow graph (neither flow.onnx nor "
                       "warp.onnx), so it cannot run DFF; re-export it with this version's "
                       "dff-export, or drop dff from --kinds")
    return kinds


def plot(res: dict, path: Path) -> None:
    """Every candidate's ms/frame against agreement by kind, the frontier joined, the
    recommendation starred, the target dashed; written to a temporary file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["candidates"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"dff": "o", "copy": "s", "resize": "D", "warp-output": "^", "track": "^",
               "per-frame": "*"}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        pts = [(r["ms_per_frame"], r["agreement"]) for r in rows
               if r["kind"] == kind and r["agreement"] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=markers.get(kind, "o"), s=22, alpha=0.6, label=kind)
    front = [(rows[i]["ms_per_frame"], rows[i]["agreement"]) for i in res["frontier"]]
    if front:
        ax.plot(*zip(*front), "k-", lw=1, label="frontier")
    rec = res["recommended"]
    if rec is not None:
        r = rows[rec]
        ax.scatter([r["ms_per_frame"]], [r["agreement"]], marker="*", s=250, facecolors="none",
                   edgecolors="r", label=f"recommended: {r['label']}")
    ax.axhline(res["target"], color="r", ls="--", lw=0.8, label=f"target {res['target']:.4g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per frame (end to end, {res['backend']})")
    metric = "AP@[.5:.95]" if res["task"] == "detection" else "mIoU"
    ax.set_ylabel(f"accuracy ({metric} against the labels)" if res.get("reference") == "labels"
                  else f"agreement with per-frame ({metric})")
    names = [Path(v).name for v in res["videos"]]
    shown = ", ".join(names) if len(names) <= 3 else f"{names[0]} … {names[-1]} ({len(names)})"
    ax.set_title(f"dff-tune: {shown}, {res['size'][0]}x{res['size'][1]}", fontsize=9)
    _save(fig, ax, path, "lower right")


def plot_costs(res: dict, path: Path) -> None:
    """--cost-only: ms/frame against k per kind (and flow source), the smaller inputs as
    horizontal lines, DFF at k = 10 marked; written to a temporary file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["candidates"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["k"] is not None:
            name = r["kind"] + (f" {r['flow']}" if r["flow"] else "")
            series.setdefault(name, []).append((r["k"], r["ms_per_frame"]))
    for name, pts in series.items():
        ax.plot(*zip(*sorted(pts)), "o-", ms=3, label=name)
    for r in rows:
        if r["k"] is None:
            ax.axhline(r["ms_per_frame"], ls=":" if r["kind"] == "resize" else "-", lw=0.8,
                       color="grey")
            ax.annotate(r["label"], (ax.get_xlim()[0], r["ms_per_frame"]), fontsize=7,
                        va="bottom")
    match = res.get("match") or {}
    if match:
        ax.scatter([10], [match["ms_per_frame"]], marker="*", s=200, color="r", zorder=5,
                   label=match["dff"])
    ax.set_yscale("log")
    ax.set_xlabel("key interval k")
    ax.set_ylabel(f"ms per frame (stage medians, {res['backend']})")
    ax.set_title(f"dff-tune --cost-only, {res['size'][0]}x{res['size'][1]}", fontsize=9)
    _save(fig, ax, path, "best")


def _save(fig, ax, path: Path, legend: str) -> None:
    """Grid and legend on; the figure written to a temporary file, then renamed to `path`."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc=legend)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def deploy_record(res: dict) -> dict:
    """The manifest's `deploy` entry for the recommended candidate."""
    row = res["candidates"][res["recommended"]]
    return {"kind": row["kind"], "k": row["k"], "schedule": row["schedule"], "flow": row["flow"],
            "size": row["size"], "agreement": row["agreement"],
            "ms_per_frame": row["ms_per_frame"], "speedup": row["speedup"],
            "target": res["target"], "backend": res["backend"], "videos": res["videos"],
            "tool": "dff-tune"}


def _previous(args: argparse.Namespace) -> dict | None:
    """--verify's earlier result, read and checked; None without --verify."""
    if args.verify is None:
        return None
    for flag, given in (("--write", args.write), ("--kinds", args.kinds),
                        ("--cost-only", args.cost_only),
                        ("--intervals", args.intervals), ("--quick", args.quick)):
        if given:
            raise DffError(f"--verify measures the candidate {args.verify} recommends; "
                           f"{flag} does not apply")
    try:
        previous = json.loads(Path(args.verify).read_text())
        rows, rec = previous["candidates"], previous["recommended"]
        if rec is not None:
            rows[rec]["kind"], rows[rec]["agreement"], previous["size"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise DffError(f"{args.verify}: not a dff-tune result ({type(e).__name__}: {e}); give "
                       "the --json file of an earlier dff-tune run") from None
    if args.target_given or args.max_drop is not None:  # chosen again from its figures
        from dff.models.frontier import recommend

        target = args.target
        if args.max_drop is not None:
            base = rows[0]["agreement"] if rows and rows[0]["kind"] == "per-frame" else None
            if base is None:
                raise DffError(f"--max-drop: {args.verify} has no per-frame score to drop from")
            target = round(base - args.max_drop / 100, 6)
        previous["recommended"] = recommend(rows, target)
        previous["target"] = target
    return previous


def describe_verify(res: dict) -> str:
    v = res["verify"]
    p, m = v["predicted"], v["measured"]

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    verdict = ("within" if v["within"] else "NOT within") + " 1.5 points and 20 %"
    labels = res.get("reference") == "labels"
    score = "accuracy" if labels else "agreement"
    drop = (f"; its loss against per-frame's own {num(m['per_frame'], '.4f')} (predicted "
            f"{num(p['per_frame'], '.4f')}) changed by {num(v['drop_points'], '+.2f')} points, "
            "which the verdict judges" if labels else "")
    names = [Path(x).name for x in res["videos"]]
    shown = ", ".join(names) if len(names) <= 3 else f"{names[0]} … {names[-1]}"
    return (f"verify {v['candidate']} on {shown} "
            f"({res['frames']} frames): {score} predicted {num(p['agreement'], '.4f')}, "
            f"measured {num(m['agreement'], '.4f')} ({num(v['agreement_points'], '+.2f')} "
            f"points){drop}; speedup over per-frame predicted {num(p['speedup'], '.2f')}x, "
            f"measured {num(m['speedup'], '.2f')}x ({num(v['speedup_change'], '+.1%')}): "
            f"{verdict}")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    command = shlex.join(["dff-tune", *(sys.argv[1:] if argv is None else argv)])
    say = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))

    def body() -> int:
        from dff.models.frontier import (
            COST_FRAMES,
            DEFAULT_TARGET,
            check_target,
            cost_only,
            explain,
            format_table,
            tune,
            verify,
        )

        if not args.video and not args.split:
            raise DffError("no video: pass --video FILE [FILE ...], footage like what the model "
                           "will see (or --split for a synthetic split)")
        if args.video and args.split:
            raise DffError("--video and --split are two sources of footage; give one")
        if args.labels and not args.split:
            raise DffError("--labels: ground truth exists for the synthetic splits only; add "
                           "--split NAME (real footage is scored against per-frame inference)")
        if args.target is not None and args.max_drop is not None:
            raise DffError("--target and --max-drop are two ways to set the bar; give one")
        args.target_given = args.target is not None
        if args.target is None:
            args.target = DEFAULT_TARGET
        check_target(args.target)
        if args.engine_dir is None:
            raise DffError("--engine-dir DIR is required: the folder dff-export wrote")
        if args.json is None:
            raise DffError("--json OUT.json is required: where every candidate's figures go")
        if args.max_frames is not None and args.max_frames < 1:
            raise DffError(f"--max-frames {args.max_frames}: give at least 1")
        out = Path(args.json)
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        for path, flag in ((out, "--json"), (png, "--plot")):
            if path.is_dir() or not path.parent.is_dir():
                raise DffError(f"{path}: {flag} needs a file path in an existing folder")
        intervals = _intervals(args)
        previous = _previous(args)
        engine_dir = Path(args.engine_dir)
        manifest = load_manifest(engine_dir, verify_hashes=False)
        args.checkpoint, args.useCudaGraph = None, False  # choose_backend's other arguments
        backend, reason = choose_backend(args, engine_dir, say)
        try:
            kinds = _kinds(args, manifest, backend, str(engine_dir))
            if not backend.flow_sources:
                say(f"{engine_dir} has no flow graph: no dff candidates")
            footage = args.video
            if args.split:
                from dff.models.tune import split_clips
                from dff.runtime.backends import task_spec

                say(f"rendering the synthetic split {args.split}")
                footage = split_clips(args.split, task_spec(manifest)["kind"],
                                      args.resize or (128, 224))
            kw: dict = {"size": None if args.split else args.resize,
                        "max_frames": args.max_frames, "dis_preset": args.dis_preset,
                        "dis_scale": args.dis_scale, "labels": args.labels,
                        "progress": not args.quiet}
            if previous is not None:
                if not args.split and args.resize is None:  # the size it was chosen at
                    kw["size"] = tuple(previous["size"])
                res = verify(backend, manifest, previous, footage, **kw)
            elif args.cost_only:
                if args.max_frames is None:
                    kw["max_frames"] = COST_FRAMES
                res = cost_only(backend, manifest, footage, intervals=intervals, kinds=kinds,
                                **kw)
            else:
                res = tune(backend, manifest, footage, args.target, max_drop=args.max_drop,
                           intervals=intervals, kinds=kinds, **kw)
            name, precision = backend.name, backend.precision
        finally:
            backend.close()
        res = {"command": command, "engine_dir": str(engine_dir), "backend": name,
               "backend_reason": reason, "precision": precision, **res}
        if previous is not None:
            write_summary(out, res)
            print(describe_verify(res))
            print(f"wrote {out}")
            return 0
        if args.cost_only:
            shown = {2, 5, 10, 20}
            print(f"cost only, from stage medians on {res['frames']} frames at "
                  f"{res['size'][0]}x{res['size'][1]} ({name}):")
            print(format_table(res, only=lambda i: res["candidates"][i]["k"] in (None, *shown)))
        else:
            print(f"the Pareto frontier on {res['frames']} frames at "
                  f"{res['size'][0]}x{res['size'][1]} ({name}; * = recommended):")
            print(format_table(res))
        for line in explain(res):
            print(line)
        write_summary(out, res)
        (plot_costs if args.cost_only else plot)(res, png)
        print(f"wrote {out} ({len(res['candidates'])} candidates) and {png}")
        if args.write:
            if args.cost_only:
                print("--write: nothing recorded, --cost-only measures no agreement to choose by")
            elif res["recommended"] is None:
                print(f"--write: nothing recorded, no candidate reaches {args.target:g}; "
                      f"{engine_dir / 'manifest.json'} is unchanged")
            else:
                record = deploy_record(res)
                old = write_deploy(engine_dir, record)
                was = f" (was: {old.get('kind')} k={old.get('k')})" if old else ""
                print(f"--write: {engine_dir / 'manifest.json'} 'deploy' is now "
                      f"{res['candidates'][res['recommended']]['label']} at "
                      f"{'x'.join(map(str, record['size']))}{was}; dff-run -e {engine_dir} runs "
                      "it by default")
        return 0

    return guarded("dff-tune", args.verbose, body)


if __name__ == "__main__":
    sys.exit(main())
