"""How much of DFF's accuracy loss is the flow network's, and how much is warping's: a
detection checkpoint on dff-eval's evaluation split at one key interval with the features of
each non-key frame

- computed on the frame itself (per-frame),
- warped along the flow network's flow and scale (DFF),
- copied from the key frame (the copy baseline),
- warped along the true flow (the synthetic clips' exact motion, averaged over each feature
  cell as dff-train's flow loss takes it) with the network's scale, and with scale 1.

AP@0.5 and AP@[.5:.95] from pycocotools over all frames (key frames are the same in every
mode). PyTorch on the CPU. With ``--bootstrap N``, N paired draws of the 20 clips say how sure
each difference from copying is (a 95 % interval and the share of draws where the mode is
higher); the split's differences are a fraction of a point, so read them with it.

    python benchmarks/true_flow.py models/weights/dff_small_rfcn.pth --threads 2 --bootstrap 200

A benchmark, not a test: five modes over 1,200 frames, a few minutes.
"""

from __future__ import annotations

import argparse
import sys

import torch
from dff.data.synthetic import EVAL_FRAMES, EVAL_SEEDS, make_clip
from dff.models.checkpoint import load_checkpoint
from dff.models.evaluate import cell_flow
from dff.models.metrics import bootstrap_ap, clip_ground_truth, detection_ap
from dff.models.warp import flow_warp
from dff.runtime.writers import write_summary

from dff.commands.common import guarded
from dff.errors import DffError
from dff.tasks import DETECTION

MODES = ("per_frame", "dff", "copy", "true_flow", "true_flow_scale1")
AGAINST_COPY = (("dff", "copy"), ("true_flow", "copy"))


def detections(model, raw) -> dict:
    """One frame's {boxes, scores, classes} (the rows in use) from the head's raw outputs."""
    out = model.outputs(raw)
    n = int(out["num"][0])
    return {k: out[k][0, :n].numpy() for k in ("boxes", "scores", "classes")}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    if model.config.task != DETECTION:
        raise DffError(f"{args.checkpoint}: a {model.config.task} model; this measures AP")
    h, w = model.config.input_size
    stride, k = model.config.stride, args.interval
    found: dict[str, list] = {m: [] for m in MODES}
    clip_of: list[int] = []  # each frame's clip seed, for --bootstrap
    with torch.no_grad():
        for seed in tqdm(EVAL_SEEDS[:args.clips or None], desc="clips"):
            clip = make_clip(seed, EVAL_FRAMES, h, w)
            frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float()
            truth = clip_ground_truth(clip)
            clip_of += [seed] * len(frames)
            key_feat = None
            for t in range(len(frames)):
                key, image = t - t % k, frames[t:t + 1]
                if t == key:
                    key_feat = model.features(image)
                    det = detections(model, model.task(key_feat))
                    for m in MODES:
                        found[m].append((truth[t], det))
                    continue
                flow, scale = model.flow(image, frames[key:key + 1])
                true = torch.from_numpy(cell_flow(clip, t, key, stride)[0][None]).float()
                ones = torch.ones_like(scale) if scale is not None else None
                feats = {"per_frame": model.features(image),
                         "dff": flow_warp(key_feat, flow, scale), "copy": key_feat,
                         "true_flow": flow_warp(key_feat, true, scale),
                         "true_flow_scale1": flow_warp(key_feat, true, ones)}
                for m, feat in feats.items():
                    found[m].append((truth[t], detections(model, model.task(feat))))
    res = {m: detection_ap(found[m], model.config.class_names, model.config.max_detections)
           for m in MODES}
    print(f"key interval {k}, {len(found['dff'])} frames")
    print(f"{'mode':<18}{'AP@0.5':>8}{'AP':>8}")
    for m in MODES:
        print(f"{m:<18}{res[m]['map50']:>8.4f}{res[m]['map']:>8.4f}")
    gaps = {}
    if args.bootstrap:
        gaps = bootstrap_ap(found, clip_of, AGAINST_COPY, model.config.class_names,
                            args.bootstrap, max_dets=model.config.max_detections,
                            wrap=lambda it: tqdm(it, total=args.bootstrap, desc="bootstrap"))
        print(f"paired bootstrap over clips, {args.bootstrap} draws: difference in points, "
              "95 % interval, share of draws higher")
        for pair, by in gaps.items():
            print(f"{pair:<18}" + "  ".join(
                f"{name} {100 * g['diff']:+.2f} [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]"
                f" {g['p_higher']:.2f}" for name, g in (("AP@0.5", by["map50"]),
                                                        ("AP", by["map"]))))
    if args.json:
        write_summary(args.json, {"checkpoint": str(args.checkpoint), "interval": k,
                                  **{m: {"map50": r["map50"], "map": r["map"]}
                                     for m, r in res.items()},
                                  **({"bootstrap": {"draws": args.bootstrap, **gaps}}
                                     if gaps else {})})
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="MODEL.pth", help="a detection checkpoint")
    p.add_argument("--interval", type=int, default=10, help="key interval")
    p.add_argument("--clips", type=int, default=0, help="first N clips (0 = all 20)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="N paired bootstrap draws of the clips for DFF's and true flow's "
                        "differences from copying (0 = none; 200 takes a few minutes)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    return guarded("true_flow", args.verbose, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
