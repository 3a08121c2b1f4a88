"""`python -m dff.serve.scaleout`: the nginx configuration for several Triton servers (one per
GPU), printed on stdout (dff.serve.scaleout.nginx_config)."""

from __future__ import annotations

import argparse
import sys

from dff.serve import scaleout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dff.serve.scaleout",
                                     description=scaleout.__doc__.split("\n\n")[0])
    parser.add_argument("servers", nargs="+", metavar="HOST:PORT",
                        help="each Triton server's gRPC endpoint")
    parser.add_argument("--listen-port", type=int, default=8001, metavar="P",
                        help="the port nginx listens on for gRPC (8001)")
    parser.add_argument("--listen-host", default="0.0.0.0", metavar="ADDR",
                        help="the address nginx listens on (0.0.0.0)")
    parser.add_argument("--max-body", default="64m", metavar="SIZE",
                        help="largest request nginx accepts (64m)")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(scaleout.nginx_config(args.servers, args.listen_port,
                                               listen_host=args.listen_host,
                                               max_body=args.max_body))
    except scaleout.ScaleoutError as e:
        print(f"dff.serve.scaleout: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
