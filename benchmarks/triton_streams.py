"""Many streams through Triton: total frames per second of N streams served by Triton's real
server (the `dff` BLS model over python stage models, `dff-serve repo ENGINE --stages python`,
or with `--stages inline` the `dff` model running the graphs in its own process) against the
same N streams batched in process (StreamPipeline) and run one after another (Pipeline), on
ONNX Runtime CPU (issue 12: Triton serving 8 streams keeps at least 70 % of the in-process
batched throughput).

Each stream is its own synthetic clip (seed 100 + i, as benchmarks/streams.py) at the
manifest's opt size, held in memory. Through Triton, each stream is one client thread with its
own gRPC connection sending its clip frame by frame as one sequence (start and end flags),
each frame after the previous one's answer, all streams released at once; its fps is all
frames over the time from that release to the last answer. Every Triton run's outputs are
compared with the batched run's (labels and key frames), so both did the same work.

Threads: `--threads T` ONNX Runtime threads for each stage session on both sides (stage calls
run one at a time on both sides: the `dff` model has one instance and waits for each stage),
so both have T compute threads; the server's own threads, the `dff` model's process and the
clients share the same CPUs, as a client on the serving machine would.

One warm-up run of each kind is off the clock; for each N the three kinds take turns
--repeats times and each reports its median. Column `others`: the largest share of the CPUs
that processes other than this script and its server took during one of that N's runs (a
shared machine skews everything; trust rows near 0 %). Per N the server's statistics of the last
Triton run tell where its time went (per model: executions, frames per execution, queue and
compute per execution; BLS: the `dff` model's compute less its stage calls; inline has only the
`dff` model, whose compute holds the graph runs).

    python benchmarks/triton_streams.py --engine-dir dff-demo/engines --threads 2 --repeats 5
    python benchmarks/triton_streams.py --engine-dir dff-demo/engines --threads 2 --stages inline
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from dff.runtime.loaders import open_backend
from dff.runtime.loop import StreamPipeline
from dff.runtime.scheduler import make_scheduler
from dff.serve.server import TritonServer

from dff.commands.serve import main as dff_serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streams import sequential, stream_clips, stream_parser  # benchmarks/streams.py

MODELS = ("dff", "feature", "flow", "task")
STAGE_MODELS = ("feature", "flow", "task")  # absent under --stages inline
SEQ_BASE = 1000  # sequence ids: SEQ_BASE + 100 * run + stream


def batched(backend, clips, k: int) -> tuple[float, dict, list[list]]:
    """Total fps of the clips through one StreamPipeline, its summary, and per stream the
    (labels, is_key) of every frame."""
    runtime = StreamPipeline(backend, [make_scheduler("fixed", k) for _ in clips])
    outputs: list[list] = [[] for _ in clips]
    start = time.perf_counter()
    for number, r in runtime.run([iter(c) for c in clips]):
        outputs[number].append((r.outputs["labels"], r.is_key))
    return sum(map(len, clips)) / (time.perf_counter() - start), runtime.summary(), outputs


def served(url: str, clips, first_id: int) -> tuple[float, list[list]]:
    """Total fps of the clips as concurrent Triton sequences (one thread and gRPC connection
    each), and per stream the (labels, is_key) of every frame."""
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(url) for _ in clips]
    for c in clients:  # connect before the clock starts
        c.is_server_ready()
    outputs: list[list] = [[] for _ in clips]
    failures: list[str] = []
    go = threading.Barrier(len(clips) + 1)

    def stream(i: int) -> None:
        client, frames, sid = clients[i], clips[i], first_id + i
        image = grpcclient.InferInput("image", [1, *frames.shape[1:]], "UINT8")
        go.wait()
        try:
            for t, frame in enumerate(frames):
                image.set_data_from_numpy(frame[None])
                r = client.infer("dff", [image], sequence_id=sid, sequence_start=t == 0,
                                 sequence_end=t == len(frames) - 1, client_timeout=120)
                outputs[i].append((r.as_numpy("labels")[0], bool(r.as_numpy("is_key")[0, 0])))
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"stream {i} (sequence {sid}): {e}")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(clips))]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    if failures:
        raise RuntimeError("; ".join(failures))
    return sum(map(len, clips)) / wall, outputs


def same_outputs(a: list[list], b: list[list]) -> bool:
    return all(len(x) == len(y) and all(kx == ky and np.array_equal(lx, ly)
                                        for (lx, kx), (ly, ky) in zip(x, y))
               for x, y in zip(a, b))


def model_stats(url: str, models: tuple[str, ...]) -> dict[str, dict]:
    """Per model of `models`: executions, frames (inferences), and total seconds in the queue
    (summed over requests) and in compute (input + infer + output, summed over executions; for
    a Python-backend model input and output are the copies to and from its process)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        out = {}
        for model in models:
            s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
            inf = s.get("inference_stats", {})
            parts = {f: sum(int(b.get(f, {}).get("ns", 0)) for b in s.get("batch_stats", []))
                     / 1e9 for f in ("compute_input", "compute_infer", "compute_output")}
            out[model] = {"executions": int(s.get("execution_count", 0)),
                          "frames": int(s.get("inference_count", 0)),
                          "queue_s": int(inf.get("queue", {}).get("ns", 0)) / 1e9,
                          "compute_s": sum(parts.values()),
                          **{f"{f}_s": v for f, v in parts.items()}}
        return out
    finally:
        client.close()


def stats_delta(after: dict, before: dict, wall_s: float) -> dict[str, dict]:
    """What one run added, per model, with per-execution means and the share of the wall, and
    (when the stage models are there) the BLS model's compute besides its stage calls."""
    rows = {}
    for m, now in after.items():
        d = {k: v - before[m][k] for k, v in now.items()}
        runs = d["executions"] or 1
        rows[m] = {**d, "frames_per_execution": d["frames"] / runs,
                   "queue_ms_per_frame": 1e3 * d["queue_s"] / (d["frames"] or 1),
                   "compute_ms_per_execution": 1e3 * d["compute_s"] / runs,
                   "compute_share_of_wall": d["compute_s"] / wall_s}
    if not all(m in rows for m in STAGE_MODELS):
        return rows
    stages = sum(rows[m]["compute_s"] + rows[m]["queue_s"] for m in STAGE_MODELS)
    rows["bls_overhead"] = {"seconds": rows["dff"]["compute_s"] - stages,
                            "share_of_wall": (rows["dff"]["compute_s"] - stages) / wall_s}
    return rows


def cpu_ticks(roots: set[int]) -> tuple[int, int] | None:
    """(busy clock ticks of the whole machine, ticks of `roots` and their descendants) from
    Linux's /proc; None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
        procs = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:  # it exited meanwhile
                    continue
                procs[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    except OSError:
        return None

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid in roots:
                return True
            pid = procs.get(pid, (0, 0))[0]
        return False

    busy = sum(cpu[:3]) + sum(cpu[5:8])  # user nice system, irq softirq steal
    return busy, sum(t for pid, (_, t) in procs.items() if ours(pid))


def timed(roots: set[int], run, *args):
    """run(*args)'s result and the share of all CPUs that other processes used meanwhile (None
    where unknown): a busy machine skews every figure, so each run says how busy it was."""
    before, start = cpu_ticks(roots), time.perf_counter()
    result = run(*args)
    after, wall = cpu_ticks(roots), time.perf_counter() - start
    if before is None or after is None:
        return result, None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return result, max(0.0, other / (wall * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)))


def write_repo(engine_dir: str, repo: Path, k: int, threads: int, stages: str) -> list[str]:
    args = ["repo", engine_dir, str(repo), "--stages", stages, "-k", str(k),
            "--threads", str(threads)]
    if dff_serve(args) != 0:
        raise SystemExit("dff-serve repo failed (see above)")
    return args


def main(argv=None) -> int:
    p = stream_parser(__doc__, 2,
                      "ONNX Runtime threads per stage session, on both sides (default: 2)")
    p.add_argument("--stages", choices=("python", "inline"), default="python",
                   help="the repository's stage layout: python stage models called by BLS "
                        "(default), or inline, the dff model running the graphs itself")
    args = p.parse_args(argv)
    models = ("dff",) if args.stages == "inline" else MODELS
    counts, k, h, w, clips = stream_clips(args)
    rows: list[dict] = []
    load = [os.getloadavg()[0]]  # other work on the machine skews every figure: shown
    with tempfile.TemporaryDirectory(prefix="dff-triton-bench-") as tmp:
        repo_args = write_repo(args.engine_dir, Path(tmp) / "repo", k, args.threads,
                               args.stages)
        repo_args[2] = "REPO"  # a temporary folder
        server = TritonServer(Path(tmp) / "repo", log_path=str(Path(tmp) / "server.log"))
        server.start()
        backend = open_backend("onnxruntime-cpu", args.engine_dir, threads=args.threads)
        try:
            warm = [c[:k + 1] for c in clips[:2]]
            sequential(backend, warm[:1], k)  # warm-ups, off the clock
            batched(backend, warm, k)
            served(server.grpc_url, warm, SEQ_BASE)
            run = 1
            roots = {os.getpid(), server.pid}
            for n in counts:
                seqs, bats, tris, other = [], [], [], []
                equal = True
                for _ in range(args.repeats):
                    fps, busy = timed(roots, sequential, backend, clips[:n], k)
                    seqs.append(fps)
                    other.append(busy)
                    (fps, summary, local), busy = timed(roots, batched, backend,
                                                         clips[:n], k)
                    bats.append(fps)
                    other.append(busy)
                    before = model_stats(server.grpc_url, models)
                    (fps, remote), busy = timed(roots, served, server.grpc_url,
                                                  clips[:n], SEQ_BASE + 100 * run)
                    tris.append(fps)
                    other.append(busy)
                    run += 1
                    stats = stats_delta(model_stats(server.grpc_url, models), before,
                                        n * args.frames / fps)
                    equal = equal and same_outputs(local, remote)
                seq, bat, tri = (statistics.median(x) for x in (seqs, bats, tris))
                rows.append({
                    "streams": n, "sequential_fps": seq, "batched_fps": bat, "triton_fps": tri,
                    "batched_over_sequential": bat / seq, "triton_over_batched": tri / bat,
                    "sequential_runs": seqs, "batched_runs": bats, "triton_runs": tris,
                    "outputs_equal": equal,
                    "other_cpu_share_max": None if None in other else max(other),
                    "other_cpu_share_runs": other,
                    "in_process_frames_per_call": {g: summary["stages"][g]["batch"]
                                                   for g in ("feature", "flow", "task")},
                    "in_process_stage_s": {g: summary["stages"][g]["total_s"]
                                           for g in ("feature", "flow", "task")},
                    "in_process_wall_last_s": summary["wall_s"],
                    "triton_wall_last_s": n * args.frames / tris[-1],
                    "server_stats_last_run": stats})
        finally:
            backend.close()
            server.stop()
    load.append(os.getloadavg()[0])
    report(args, rows, h, w, k, repo_args, load)
    return 0 if all(r["outputs_equal"] for r in rows) else 1


def report(args, rows: list[dict], h: int, w: int, k: int, repo_args: list[str],
           load: list[float]) -> None:
    print(f"onnxruntime-cpu, {args.engine_dir}, {h}x{w}, {args.frames} frames a stream, fixed "
          f"K={k}, {args.threads} ORT threads per stage on both sides, median of "
          f"{args.repeats} runs each; Triton: `dff-serve {' '.join(repo_args)}`; "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f} before, {load[1]:.2f} after")
    inline = args.stages == "inline"
    shown = ("dff",) if inline else MODELS
    print(f"{'streams':>8}{'sequential':>12}{'batched':>10}{'triton':>9}{'bat/seq':>10}"
          f"{'tri/bat':>9}{'others':>8}   frames per execution {'/'.join(shown)}; dff "
          + ("compute (share of wall)" if inline else "compute, BLS overhead (share of wall)"))
    for r in rows:
        s = r["server_stats_last_run"]
        per = "/".join(f"{s[m]['frames_per_execution']:.1f}" for m in shown)
        print(f"{r['streams']:>8}{r['sequential_fps']:>12.1f}{r['batched_fps']:>10.1f}"
              f"{r['triton_fps']:>9.1f}{r['batched_over_sequential']:>9.2f}x"
              f"{r['triton_over_batched']:>8.2f}x{others(r['other_cpu_share_max']):>8}   {per}; "
              f"{s['dff']['compute_share_of_wall']:.0%}"
              + ("" if inline else f", {s['bls_overhead']['share_of_wall']:.0%}")
              + ("" if r["outputs_equal"] else "   OUTPUTS DIFFER"))
    where(rows[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine_dir": args.engine_dir, "frames": args.frames, "key_interval": k,
                       "threads": args.threads, "stages": args.stages, "size": [h, w],
                       "repeats": args.repeats,
                       "cpus": os.cpu_count(), "load_average": load,
                       "repository_command": ["dff-serve", *repo_args], "rows": rows}, f,
                      indent=2)


def others(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def where(r: dict) -> None:
    """Where the last Triton run of the largest N spent its time, next to the in-process run."""
    s, local = r["server_stats_last_run"], r["in_process_stage_s"]
    head = (f"{r['streams']} streams, last runs: Triton {r['triton_wall_last_s']:.2f} s wall, "
            f"the dff model busy {s['dff']['compute_s']:.2f} s")
    tail = (f"In process {r['in_process_wall_last_s']:.2f} s wall: "
            + ", ".join(f"{m} {local[m]:.2f}" for m in STAGE_MODELS)
            + f" s (together {sum(local.values()):.2f} s)")
    if "bls_overhead" not in s:  # inline: the graph runs are inside the dff model's compute
        print(f"{head} (graph runs included, no stage models). {tail}")
        return
    moved = sum(s[m]["compute_input_s"] + s[m]["compute_output_s"] for m in STAGE_MODELS)
    print(f"{head}; its stage calls "
          + ", ".join(f"{m} {s[m]['compute_s']:.2f}" for m in STAGE_MODELS)
          + f" s (of which {moved:.2f} s copying tensors in and out of the stage processes), "
          f"BLS work besides them {s['bls_overhead']['seconds']:.2f} s. {tail}")


if __name__ == "__main__":
    sys.exit(main())
