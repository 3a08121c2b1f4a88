"""dff-serve: serve DFF on Triton Inference Server (DESIGN.md §9).

    dff-serve repo ENGINE_DIR REPO_DIR [--stages python|onnxruntime|tensorrt|inline]
    dff-serve start REPO_DIR [--http-port P] [--grpc-port P]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from dff.commands.common import budget_arg, guarded, int_at_least
from dff.runtime.scheduler import SCHEDULES
from dff.serve.repository import IDLE_S, STAGES, write_repository
from dff.serve.server import ServerError, TritonServer, log_tail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dff-serve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("repo", help="write a Triton model repository from an engine folder")
    r.add_argument("engine_dir", metavar="ENGINE_DIR", help="dff-export's output folder")
    r.add_argument("repo_dir", metavar="REPO_DIR", help="the model repository to write")
    r.add_argument("--stages", choices=STAGES, default="python",
                   help="feature/flow/task as Python-backend models on ONNX Runtime CPU "
                        "(default; runs on a Python-only Triton), onnxruntime_onnx models, "
                        "tensorrt_plan models from the manifest's engines, or inline: no stage "
                        "models, the dff model runs the graphs on ONNX Runtime CPU in its own "
                        "process (a Python-only Triton, no BLS calls)")
    r.add_argument("--schedule", choices=SCHEDULES, default="fixed", help="key-frame schedule")
    r.add_argument("-k", "--key-interval", type=int_at_least(1), metavar="K",
                   help="key frame every K frames (default: the manifest's)")
    r.add_argument("--key-budget", type=budget_arg, metavar="F",
                   help="adaptive and learned schedules: at most this fraction of a stream's "
                        "frames are key frames, e.g. 0.1")
    r.add_argument("--max-batch", type=int_at_least(1), metavar="N",
                   help="frames per batch (default: the profile's largest batch)")
    r.add_argument("--max-streams", type=int_at_least(1), default=16, metavar="N",
                   help="live streams batched together (max_candidate_sequences; more wait)")
    r.add_argument("--idle-timeout", type=float, default=IDLE_S, metavar="S",
                   help=f"seconds before an idle stream is forgotten (default {IDLE_S:g})")
    r.add_argument("--threads", type=int_at_least(0), default=1, metavar="N",
                   help="ONNX Runtime threads per stage session of --stages python or inline "
                        "(0: its default)")
    r.add_argument("--precision", choices=("fp16", "fp32", "int8"),
                   help="--stages tensorrt: which engine set (default: the first complete)")
    r.add_argument("--force", action="store_true", help="replace the models if they exist")
    r.add_argument("-v", "--verbose", action="store_true", help="full tracebacks on errors")
    s = sub.add_parser("start", help="start Triton on a repository until Ctrl-C or SIGTERM")
    s.add_argument("repo_dir", metavar="REPO_DIR")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    s.add_argument("--http-port", type=int_at_least(1), metavar="P", help="default: a free one")
    s.add_argument("--grpc-port", type=int_at_least(1), metavar="P", help="default: a free one")
    s.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for the server to be ready (120)")
    s.add_argument("--log", metavar="FILE", help="server log (default: a temporary file)")
    s.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="passed to tritonserver as it is, repeatable (e.g. --server-arg="
                        "--backend-config=tensorrt,plugins=/path/libplugin.so)")
    s.add_argument("-v", "--verbose", action="store_true", help="full tracebacks on errors")
    return parser


def repo(args: argparse.Namespace) -> int:
    summary = write_repository(args.engine_dir, args.repo_dir, stages=args.stages,
                               max_batch=args.max_batch, threads=args.threads,
                               precision=args.precision, force=args.force,
                               schedule=args.schedule, key_interval=args.key_interval,
                               key_budget=args.key_budget,
                               max_streams=args.max_streams, idle_s=args.idle_timeout)
    print(f"wrote {', '.join(summary['models'])} ({args.stages} stages, batch "
          f"{summary['max_batch']}, {summary['schedule']} schedule k={summary['key_interval']}) "
          f"in {summary['repository']}; start it with `dff-serve start {args.repo_dir}`")
    return 0


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def start(args: argparse.Namespace) -> int:
    server = TritonServer(args.repo_dir, host=args.host, http_port=args.http_port,
                          grpc_port=args.grpc_port, timeout=args.timeout, log_path=args.log,
                          extra_args=tuple(args.server_arg))
    # Ctrl-C as well where the shell started us with SIGINT ignored (`dff-serve start ... &`)
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _stop_on_sigterm),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        server.start()
        print(f"tritonserver ready in {server.started_s:.1f} s (pid {server.pid}): HTTP "
              f"{server.http_url}, gRPC {server.grpc_url}; log {server.log_path}; "
              "Ctrl-C stops it", flush=True)
        while server.alive():
            time.sleep(0.2)
        code = server.stop(keep_log=True)
        raise ServerError(f"tritonserver exited with code {code}: "
                          f"{log_tail(server.log_path)} (log: {server.log_path})")
    except KeyboardInterrupt:
        code = server.stop()
        print(f"tritonserver stopped (exit code {code})", file=sys.stderr)
        return 0
    finally:
        server.stop(keep_log=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    body = {"repo": repo, "start": start}[args.command]
    return guarded("dff-serve", args.verbose, lambda: body(args))


if __name__ == "__main__":
    sys.exit(main())
