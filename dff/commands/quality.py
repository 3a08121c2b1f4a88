"""`python -m dff.models.quality MODEL.pth -o OUT.pth`: add a trained quality head to a DFF
checkpoint (dff.models.quality.add_quality_head)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dff.errors import DffError
from dff.models.checkpoint import (
    VERSION_QUANTIZED,
    WEIGHTS_DTYPES,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from dff.models.quality import add_quality_head


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dff.models.quality",
                                description="Add a trained quality head to a DFF checkpoint.")
    p.add_argument("checkpoint", help="a DFF checkpoint (.pth)")
    p.add_argument("-o", "--output", required=True, help="the checkpoint to write")
    p.add_argument("--hidden", type=int, default=16, help="the head's hidden channels")
    p.add_argument("--clips", type=int, default=6, help="training clips per motion category")
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--weights", choices=WEIGHTS_DTYPES, default=None,
                   help="how the weights are stored (default: as the input's, int8 for a "
                        "quantized checkpoint such as the shipped demos, else float32)")
    args = p.parse_args(argv)
    try:
        model = load_checkpoint(args.checkpoint)
        blob = read_checkpoint(args.checkpoint)
        weights = args.weights or ("int8" if blob["version"] == VERSION_QUANTIZED
                                   else "float32")
        new, report = add_quality_head(model, args.hidden, args.clips, args.iters)
        meta = dict(blob.get("meta") or {})
        meta["quality_head"] = report
        save_checkpoint(args.output, new, meta=meta, weights=weights)
    except DffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {Path(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
