"""Time the FlowWarp CUDA kernel against the PyTorch warp and a plain device-to-device copy.

    python benchmarks/bench_flow_warp.py [--channels 1024] [--batch 1] [--maps 38x63,68x120]
        [--dtypes fp16,fp32] [--warmUp 20] [--iterations 200] [--plugin-ptx] [--json FILE]

For each map and dtype, all in one run on one GPU: the kernel; the PyTorch path
(`dff.models.warp.flow_warp`: grid construction, grid_sample, multiply); and a copy
(`Tensor.copy_`, a cudaMemcpyAsync) of a buffer half the size of the kernel's compulsory
traffic, so that it reads and writes the same number of bytes. Times are GPU time from CUDA
events, median over --iterations samples of LAUNCHES launches each, with the stream queued up
behind a GPU sleep so Python's launch overhead is not timed. Bandwidth counts compulsory traffic
only (feat, flow and scale read once, out written once); on maps that fit the L2 cache both
kernel and copy run from it. The kernel is NVRTC's PTX for this GPU, or with --plugin-ptx the
sm_80 PTX that TensorRT engines embed (`dff.plugins.trt_plugin.PTX_ARCH`).

Exit status: 0 after measuring; 2, with one line saying why, when there is no CUDA GPU or
cuda-python (`pip install dff-trt[gpu]`) is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys

LAUNCHES = 10  # launches per timed sample
SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU sleep ahead of each sample, to queue its launches


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--maps", default="38x63,68x120", help="HxW feature maps, comma-separated")
    p.add_argument("--dtypes", default="fp16,fp32")
    p.add_argument("--warmUp", type=int, default=20, help="untimed launches first")
    p.add_argument("--iterations", type=int, default=200, help="timed samples")
    p.add_argument("--plugin-ptx", action="store_true",
                   help="time the PTX TensorRT engines embed (sm_80) instead of this GPU's")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p.parse_args(argv)


def device_time_us(torch, fn, warmup: int, iterations: int) -> float:
    """Median GPU time of one call of `fn` (which enqueues work on the current stream)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iterations):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        for _ in range(LAUNCHES):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / LAUNCHES)
    return statistics.median(samples)


def load_kernel(kernel, device: int, plugin_ptx: bool = False):
    """FlowWarpKernel with NVRTC's PTX (the plugin's sm_80 PTX if `plugin_ptx`), or nvcc's
    where the NVRTC library is missing."""
    from dff.errors import DffError

    if plugin_ptx:
        from dff.plugins.trt_plugin import PTX_ARCH

        warp = kernel.FlowWarpKernel(device, ptx=kernel.compile_ptx(PTX_ARCH))
        warp.arch = PTX_ARCH
        return warp
    try:
        return kernel.FlowWarpKernel(device)
    except DffError:
        if shutil.which("nvcc") is None:
            raise
        return kernel.FlowWarpKernel(device, ptx=kernel.compile_ptx_nvcc("sm_80"))


def measure(torch, warp, shape, dtype, args) -> dict:
    from dff.models.warp import flow_warp

    n, c, h, w = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    feat = torch.rand(shape, device="cuda", generator=gen, dtype=dtype) * 2 - 1
    flow = (torch.rand((n, 2, h, w), device="cuda", generator=gen, dtype=torch.float32) - 0.5)
    flow = (flow * 8).to(dtype)  # within ±4 cells, a few cells outside at the edges
    scale = torch.rand(shape, device="cuda", generator=gen, dtype=dtype) + 0.5
    out = torch.empty_like(feat)
    stream = torch.cuda.current_stream().cuda_stream
    name = str(dtype).removeprefix("torch.")

    def run_kernel():
        warp(feat.data_ptr(), flow.data_ptr(), scale.data_ptr(), out.data_ptr(), n, c, h, w,
             dtype=name, stream=stream)

    def run_torch():
        return flow_warp(feat, flow, scale)

    traffic = (3 * feat.numel() + flow.numel()) * feat.element_size()
    src = torch.empty(traffic // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    with torch.inference_mode():
        kernel_us = device_time_us(torch, run_kernel, args.warmUp, args.iterations)
        torch_us = device_time_us(torch, run_torch, args.warmUp, args.iterations)
        copy_us = device_time_us(torch, lambda: dst.copy_(src), args.warmUp, args.iterations)
        run_kernel()
        diff = (out.float() - run_torch().float()).abs().max().item()
    kernel_gbps = traffic / kernel_us / 1e3
    copy_gbps = 2 * src.numel() / copy_us / 1e3
    return {"map": f"{h}x{w}", "dtype": "fp16" if dtype == torch.float16 else "fp32",
            "shape": list(shape), "bytes": traffic, "kernel_us": kernel_us,
            "torch_us": torch_us, "speedup_vs_torch": torch_us / kernel_us,
            "copy_us": copy_us, "kernel_gbps": kernel_gbps, "copy_gbps": copy_gbps,
            "bandwidth_vs_copy": kernel_gbps / copy_gbps, "max_abs_diff_vs_torch": diff}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_flow_warp: needs PyTorch with CUDA", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_flow_warp: no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    from dff.plugins import kernel

    from dff.errors import DffError

    device = torch.cuda.current_device()
    torch.cuda.init()
    try:
        warp = load_kernel(kernel, device, args.plugin_ptx)
    except DffError as e:
        print(f"bench_flow_warp: {e}", file=sys.stderr)
        return 2
    dtypes = {"fp16": torch.float16, "fp32": torch.float32}
    maps = [tuple(int(v) for v in m.split("x")) for m in args.maps.split(",")]
    results = [measure(torch, warp, (args.batch, args.channels, h, w), dtypes[d], args)
               for h, w in maps for d in args.dtypes.split(",")]
    warp.close()

    gpu = torch.cuda.get_device_name(device)
    print(f"FlowWarp on {gpu} (PTX {warp.arch}), N={args.batch} C={args.channels}: median GPU "
          f"time of {args.iterations} samples x {LAUNCHES} launches")
    print(f"{'map':>8} {'dtype':>5} {'kernel us':>10} {'torch us':>9} {'speedup':>8} "
          f"{'GB/s':>7} {'copy GB/s':>9} {'vs copy':>8} {'max|diff|':>9}")
    for r in results:
        print(f"{r['map']:>8} {r['dtype']:>5} {r['kernel_us']:10.1f} {r['torch_us']:9.1f} "
              f"{r['speedup_vs_torch']:7.2f}x {r['kernel_gbps']:7.0f} {r['copy_gbps']:9.0f} "
              f"{r['bandwidth_vs_copy']:8.2f} {r['max_abs_diff_vs_torch']:9.1e}")
    if args.json:
        report = {"device": gpu, "ptx_arch": warp.arch, "torch": torch.__version__,
                  "batch": args.batch, "channels": args.channels, "iterations": args.iterations,
                  "launches_per_sample": LAUNCHES, "warm_up": args.warmUp, "results": results}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
