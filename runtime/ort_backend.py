"""The `onnxruntime-cpu` and `onnxruntime-cuda` backends: the exported graphs on ONNX Runtime.

On the CPU, plain `run` with numpy arrays. On CUDA, IOBinding on the buffer layer
(runtime/buffers.py), so frames cross PCIe once and ONNX Runtime runs on the ring's compute
stream; `io_binding=True` runs that same code over HostMemory on the CPU, which is how the tests
exercise it. onnxruntime is imported when a backend opens.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import numpy as np
from dff.export.manifest import (
    FLOW_GRAPH,
    LEARNED,
    flow_sources,
    graph_path,
    key_grid,
    keyed,
    learned_graphs,
    load_manifest,
)
from dff.runtime import buffers
from dff.runtime.backends import (
    Backend,
    BackendError,
    FlowOutputs,
    check_names,
    graph_outputs,
    import_ort,
    task_spec,
)
from dff.runtime.buffers import DeviceArray, Memory

# RunOptions entry: "1" makes a run return without synchronising the execution provider's stream
NO_SYNC = "disable_synchronize_execution_providers"


class OrtBackend(Backend):
    """The exported graphs on ONNX Runtime. On the CPU, plain `run` with numpy arrays. On CUDA
    (or with `io_binding=True` on the CPU, over HostMemory, which tests that path here),
    IOBinding on the buffer layer (runtime/buffers.py): frames staged through a pinned ring,
    every input and output bound by pointer to device buffers the backend owns (outputs from
    pools: allocated once per shape, reused only when no handle to them is left, so the key
    frame's features survive later calls), ONNX Runtime running on the ring's compute stream;
    only the task outputs (the manifest's `task.outputs`, all bound) come back, by D2H into
    pinned memory. On CUDA a run returns once its kernels are queued (ONNX Runtime's
    end-of-run stream synchronisation is turned off), as TensorRT's enqueue does: everything
    after it is ordered on the same stream, and the ring's events say when results are on the
    host. Handles are DeviceArrays on CUDA and OrtValues
    over the same memory on the CPU. `int8` runs dff-build --int8's feature graph and measures
its kernels here against the graph's own error (`int8_check`, quantize.kernel_check)."""

    def __init__(self, engine_dir: str | os.PathLike[str], *, cuda: bool = False,
                 device: int = 0, threads: int = 0, io_binding: bool | None = None,
                 memory: Memory | None = None, int8: bool = False):
        ort = import_ort()
        self._ort = ort
        from onnxruntime.capi.onnxruntime_pybind11_state import (
            Fail,
            InvalidArgument,
            RuntimeException,
        )

        self._refused = (Fail, InvalidArgument, RuntimeException)  # a run's inputs refused
        self.manifest = load_manifest(engine_dir)
        self.stride = int(self.manifest["stride"])
        self.profile = self.manifest["profile"]
        self.task_spec = task_spec(self.manifest, f"{engine_dir}/manifest.json")
        self.has_quality = "quality" in graph_outputs(self.manifest, "flow")
        self.flow_sources = tuple(flow_sources(self.manifest))
        self.keyed = keyed(self.manifest) and LEARNED in self.flow_sources
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime-cpu"
        self.precision = "int8" if int8 else "fp32"
        self.device_type = "cuda" if cuda else "cpu"
        self.device_id = device
        self.io_binding = cuda if io_binding is None else io_binding
        self.sessions: dict[str, Any] = {}
        self.int8_check: dict[str, Any] | None = None  # int8: quantize.kernel_check's report
        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError(
                f"--backend onnxruntime-cuda: this onnxruntime {ort.__version__} has no "
                "CUDAExecutionProvider; `pip install onnxruntime-gpu` (built for your "
                "CUDA) or use --backend onnxruntime-cpu")
        self.memory: Memory | None = None
        self._run_options = ort.RunOptions()
        if cuda:  # return from a run without waiting for its kernels (see the class docstring)
            self._run_options.add_run_config_entry(NO_SYNC, "1")
        self.overlaps_uploads = self.io_binding  # uploads go through the pinned ring
        if self.io_binding:
            self.memory = memory or (buffers.CudaMemory(device) if cuda
                                     else buffers.HostMemory())
            if self.memory.device_type != self.device_type:
                raise ValueError(f"{self.name} binds {self.device_type} memory, got "
                                 f"{type(self.memory).__name__}")
            self._ring = buffers.PinnedRing(self.memory)
            self._pools: dict[tuple[str, str], buffers.BufferPool] = {}
            # task outputs are copied to the host at once: one buffer each is enough
            self._task_out = {name: buffers.DeviceBuffer(self.memory)
                              for name in self.task_spec["outputs"]}
            self._views: weakref.WeakKeyDictionary[Any, DeviceArray] = \
                weakref.WeakKeyDictionary()  # OrtValue handle -> the memory it views
        try:
            self._open_sessions(engine_dir, cuda, threads)
        except BaseException:
            self.close()
            raise

    def _open_sessions(self, engine_dir: str | os.PathLike[str], cuda: bool,
                       threads: int) -> None:
        ort = self._ort
        providers: list[Any] = ["CPUExecutionProvider"]
        if cuda:
            cuda_options = {"device_id": str(self.device_id)}
            if self.memory is not None:  # ONNX Runtime runs on the ring's compute stream
                handle = self.memory.stream_handle(self._ring.compute)
                cuda_options |= {"has_user_compute_stream": "1",
                                 "user_compute_stream": str(handle)}
            providers.insert(0, ("CUDAExecutionProvider", cuda_options))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(0, threads)
        options.inter_op_num_threads = 1
        # 4: fatal only; a failed run raises, and _run turns that into one line, so ONNX
        # Runtime's own log line of the same error would only precede it
        options.log_severity_level = 4
        # three sessions take turns: a finished one's spinning threads would steal the
        # cores of the next (measured: per-frame fps 87 -> 131 on 2 cores without spinning)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        flows = [g for s in self.flow_sources
                 for g in (learned_graphs(self.manifest) if s == LEARNED else [FLOW_GRAPH[s]])]
        for graph in ["feature", *flows, "task"]:
            path = graph_path(engine_dir, self.manifest, graph)
            fix = f"re-export with `dff-export MODEL.pth -o {engine_dir}`"
            if graph == "feature" and self.precision == "int8":
                from dff.engines.quantize import calibration_command, int8_graph

                path = int8_graph(engine_dir, self.manifest)
                fix = f"calibrate again with `{calibration_command(engine_dir)}`"
            try:
                session = ort.InferenceSession(os.fspath(path), options, providers=providers)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise BackendError(f"{path}: onnxruntime cannot load it ({first[:200]}); "
                                   f"{fix}") from e
            if cuda and session.get_providers()[0] != "CUDAExecutionProvider":
                raise BackendError(f"{path}: onnxruntime fell back to {session.get_providers()} "
                                   "(the CUDA provider failed to load: CUDA/cuDNN libraries "
                                   "missing or mismatched); fix the install or use "
                                   "--backend onnxruntime-cpu")
            check_names(path, graph, [i.name for i in session.get_inputs()],
                        [o.name for o in session.get_outputs()],
                        "re-export it with this version's dff-export",
                        want=graph_outputs(self.manifest, graph))
            self.sessions[graph] = session
        if self.precision == "int8":  # these kernels against the graph's own error
            from dff.engines.quantize import kernel_check

            self.int8_check = kernel_check(engine_dir, self.manifest, self.sessions["feature"],
                                           threads)

    def _run(self, graph: str, feeds: dict[str, Any]) -> list[Any]:
        """The graph's outputs (`graph_outputs` order): host arrays, or, with IOBinding,
        DeviceArrays over the backend's buffers. ONNX Runtime refusing the inputs (a size the
        graph cannot take) is a BackendError naming the graph, the shapes and the fix."""
        try:
            return self._run_graph(graph, feeds)
        except self._refused as e:
            shapes = ", ".join(f"{k} {'x'.join(map(str, getattr(v, 'shape', ())))}"
                               for k, v in feeds.items())
            # ONNX Runtime's message ends in the part a user can read, after the source line
            reason = ". ".join(" ".join(str(e).split()).split(". ")[-2:]) or type(e).__name__
            raise BackendError(
                f"{self.manifest['graphs'][graph]['file']} failed on {shapes} ({reason}); "
                "a model split from an ONNX file may need sides in multiples of more than its "
                "stride (32 for many detectors): --resize to such a size") from None

    def _run_graph(self, graph: str, feeds: dict[str, Any]) -> list[Any]:
        if self.memory is None:
            host = {k: self.to_host(v) for k, v in feeds.items()}
            return self.sessions[graph].run(graph_outputs(self.manifest, graph), host)
        self.memory.activate()
        where = (self.memory.device_type, self.memory.device_id)
        binding = self.sessions[graph].io_binding()
        inputs = {}
        for spec in self.manifest["graphs"][graph]["inputs"]:
            inputs[spec["name"]] = x = self._device(feeds[spec["name"]], spec["dtype"])
            binding.bind_input(spec["name"], *where, x.dtype, list(x.shape), x.ptr)
        outputs = []
        for name, (shape, dtype) in output_shapes(self.manifest, graph, inputs).items():
            if graph == "task":
                y = self._task_out[name].ensure(shape, dtype).view()
            else:
                pool = self._pools.setdefault((graph, name), buffers.BufferPool(self.memory))
                y = pool.take(shape, dtype)
            binding.bind_output(name, *where, y.dtype, list(y.shape), y.ptr)
            outputs.append(y)
        self.sessions[graph].run_with_iobinding(binding, self._run_options)
        return outputs

    def _device(self, value: Any, dtype: str | None) -> DeviceArray:
        """An input as device memory: a handle of ours as it is, a host array staged."""
        if isinstance(value, DeviceArray):
            return value
        if isinstance(value, self._ort.OrtValue):
            if value in self._views:
                return self._views[value]
            value = value.numpy()  # someone else's OrtValue: through the host, like an array
        return self._ring.stage(np.ascontiguousarray(value, dtype=dtype))[1]

    def _handle(self, x: DeviceArray) -> Any:
        if self.device_type == "cuda":
            return x
        host = buffers.host_view(x.ptr, x.shape, x.dtype)  # HostMemory: device memory is host
        value = self._ort.OrtValue.ortvalue_from_numpy(host)
        self._views[value] = x  # keeps the buffer taken while the handle lives
        return value

    def feature(self, image: np.ndarray) -> Any:
        feat = self._run("feature", {"image": image})[0]
        return feat if self.memory is None else self._handle(feat)

    def key(self, key_image: Any) -> Any:
        """flow_key.onnx's key_code of the key image, where the export has it (`keyed`)."""
        if not self.keyed:
            return key_image
        code = self._run("flow_key", {"key_image": key_image})[0]
        return code if self.memory is None else self._handle(code)

    def flow(self, image: np.ndarray, key_image: Any, key_feat: Any) -> FlowOutputs:
        out = self._run("flow", {"image": image, self.key_input: key_image,
                                 "key_feat": key_feat})
        if self.memory is not None:
            out = [self._handle(x) for x in out]
        return FlowOutputs(*out)  # graph_outputs' order: flow, scale, feat[, quality]

    def warp(self, key_feat: Any, flow: Any) -> Any:
        """warp.onnx: key_feat along a host flow [N,2,h,w] (cells), scale 1."""
        if "warp" not in self.sessions:
            return super().warp(key_feat, flow)
        feat = self._run("warp", {"key_feat": key_feat, "flow": flow})[0]
        return feat if self.memory is None else self._handle(feat)

    def task(self, feat: Any) -> dict[str, np.ndarray]:
        """The task outputs by name (the manifest's `task.outputs`), host arrays."""
        outputs = self._run("task", {"feat": feat})
        if self.memory is not None:  # every D2H queued, then one wait
            outputs = self._ring.to_host_all(outputs)
        return dict(zip(self.task_spec["outputs"], outputs))

    def upload(self, image: Any) -> Any:
        """Keep an array resident where the graphs run: with IOBinding staged into device
        memory (a handle), else the (contiguous) array itself."""
        if isinstance(image, (DeviceArray, self._ort.OrtValue)):
            return image
        image = np.ascontiguousarray(image)
        if self.memory is None:
            return image
        self.memory.activate()
        return self._handle(self._ring.stage(image)[1])

    def split(self, handle: Any) -> list[Any]:
        """A batch handle [N,...] as N handles [1,...]: numpy row views on the plain CPU path;
        with IOBinding, views of the device rows (copies where a row is not ALIGN-aligned,
        buffers.split_rows), each keeping the batch's buffer taken while it lives."""
        if self.memory is None:
            array = np.asarray(handle)
            return [array[i:i + 1] for i in range(len(array))]
        x = self._own(handle)
        pool = self._pools.setdefault(("split", ""), buffers.BufferPool(self.memory))
        return [self._handle(v) for v in buffers.split_rows(x, self.memory, self._ring.compute,
                                                            pool)]

    def stack(self, handles: list[Any]) -> Any:
        """Handles [n_i,...] as one [sum n_i,...] (one handle: as it is): np.concatenate on the
        plain CPU path; with IOBinding, d2d copies on the compute stream into a pooled buffer."""
        if len(handles) == 1:
            return handles[0]
        if self.memory is None:
            return np.concatenate([np.asarray(h) for h in handles])
        xs = [self._own(h) for h in handles]
        pool = self._pools.setdefault(("stack", ""), buffers.BufferPool(self.memory))
        return self._handle(buffers.stack_rows(xs, self.memory, self._ring.compute, pool))

    def _own(self, handle: Any) -> DeviceArray:
        """A handle as the device memory it is (a host array staged, in its own dtype)."""
        assert self.memory is not None
        self.memory.activate()
        if isinstance(handle, (DeviceArray, self._ort.OrtValue)):
            return self._device(handle, None)
        return self._ring.stage(np.ascontiguousarray(handle))[1]

    def to_host(self, handle: Any) -> np.ndarray:
        if isinstance(handle, DeviceArray):
            return self._ring.to_host(handle)
        return handle.numpy() if isinstance(handle, self._ort.OrtValue) else np.asarray(handle)

    def device_timer(self) -> buffers.StreamTimer | None:
        """Events on the stream the graphs run on (IOBinding on CUDA only)."""
        if self.memory is None or self.memory.device_type != "cuda":
            return None
        return buffers.StreamTimer(self.memory, self._ring.compute)

    def synchronize(self) -> None:
        """Wait for the streams: uploads, and on CUDA the queued runs."""
        if self.memory is not None:
            self._ring.synchronize()

    def close(self) -> None:
        """Wait for queued work, then drop the sessions (ONNX Runtime may hold the compute
        stream), then the buffers; handles given out are invalid after it. Idempotent."""
        if self.memory is not None and self.sessions:
            self._ring.synchronize()
        self.sessions.clear()
        if self.memory is not None:
            for owned in (*self._pools.values(), *self._task_out.values(), self._ring):
                owned.close()
            self._pools = {}


def output_shapes(manifest: dict, graph: str,
                  inputs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{output: (shape, dtype)} of `graph` (the outputs the runtime reads, `graph_outputs`)
    for inputs of these shapes, from the manifest's shapes: symbolic N, H, W, h, w (and K, C,
    should an export name them), or fixed sizes."""
    stride = int(manifest["stride"])
    first = (inputs["image"] if "image" in inputs else
             inputs["key_image"] if "key_image" in inputs else
             inputs["key_feat"] if "key_feat" in inputs else inputs["feat"]).shape
    n, hh, ww = first[0], first[2], first[3]
    if "image" not in inputs and "key_image" not in inputs:
        hh, ww = hh * stride, ww * stride
    sizes = {"N": n, "H": hh, "W": ww, "h": hh // stride, "w": ww // stride,
             "K": task_spec(manifest).get("max_detections"), "C": len(manifest["class_names"])}
    if keyed(manifest):
        sizes["hk"], sizes["wk"] = key_grid(manifest, hh, ww)
    specs = {o["name"]: o for o in manifest["graphs"][graph]["outputs"]}
    return {name: (tuple(sizes[d] if isinstance(d, str) else int(d)
                         for d in specs[name]["shape"]), specs[name]["dtype"])
            for name in graph_outputs(manifest, graph)}
