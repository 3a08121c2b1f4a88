"""The TensorRT backend: dff-build's engines through TensorRT's Python API on the buffer layer.

One engine and one IExecutionContext per stage (feature, flow_key where the export caches its
key frame, flow, task), the engines picked for
this GPU and TensorRT version by `engines.compat.select_engines`. Every I/O tensor is bound with
`set_tensor_address` to device memory from runtime/buffers.py: outputs from pools (allocated
once per shape, a buffer reused only when no handle to it is left, so the key frame's features
stay put), frames staged through the pinned ring, `execute_async_v3` on the ring's compute
stream, every task output (the manifest's `task.outputs`) back by async D2H into pinned
slots. With `cuda_graph=True` the non-key path (flow + task) is captured into a CUDA graph over
fixed buffers and replayed, captured again when the input shapes change.

dff-build's engines embed the FlowWarp kernel (TensorRT's AOT plugin): the runtime never
registers the Python plugin (its creator would make a JIT plugin with no implementation); it
only checks that this machine's driver loads the embedded PTX (the entry's `ptx_isa`).

TensorRT and cuda-python are imported when a TrtBackend is made; `engine_tensors` and
`_Stage` only call the engine's methods, so tests drive them with a stand-in.
"""

from __future__ import annotations

import contextlib
import gc
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from dff.export.manifest import FLOW_GRAPH, flow_sources, keyed, load_manifest
from dff.runtime.backends import (
    OPTIONAL_OUTPUTS,
    OUTPUTS,
    Backend,
    BackendError,
    FlowOutputs,
    check_names,
    graph_outputs,
    task_spec,
)
from dff.runtime.buffers import (
    BufferPool,
    CudaMemory,
    DeviceArray,
    DeviceBuffer,
    Memory,
    PinnedRing,
    StreamTimer,
    Timer,
    check,
    split_rows,
    stack_rows,
)

if TYPE_CHECKING:
    import tensorrt as trt

# TensorRT DataType names -> numpy (the types dff's graphs use, and their neighbours)
DTYPES = {"FLOAT": "float32", "HALF": "float16", "UINT8": "uint8", "INT8": "int8",
          "INT32": "int32", "INT64": "int64", "BOOL": "bool"}


def require_tensorrt() -> str:
    """TensorRT's version, or one BackendError saying what is missing."""
    from dff.plugins.find_tensorrt import find_tensorrt

    trt, why = find_tensorrt()
    if trt is None:
        raise BackendError(f"--backend tensorrt needs TensorRT ({why}): pip install tensorrt "
                           "on a machine with an NVIDIA GPU, or use --backend onnxruntime-cuda")
    return str(trt.__version__)


def check_ptx_isa(chosen: dict[str, dict[str, Any]], engine_dir: str | os.PathLike[str],
                  precision: str) -> None:
    """Refuse an engine whose embedded FlowWarp PTX (its entry's `ptx_isa`) this machine's GPU
    driver cannot load: the driver of the machine that built it may have been newer."""
    from dff.plugins import kernel

    driver = kernel.driver_cuda_version()
    d = os.fspath(engine_dir).rstrip("/") or "."
    rebuild = f"`dff-build {d}/ --{precision}`"
    for entry in chosen.values():
        isa = entry.get("ptx_isa")
        if isa is None or driver is None:
            continue
        parts = str(isa).split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise BackendError(f"{d}/manifest.json: engine {entry['file']} has ptx_isa {isa!r}, "
                               f"not 'major.minor'; rebuild with {rebuild}")
        if not kernel.driver_loads_ptx((int(parts[0]), int(parts[1])), driver):
            raise BackendError(f"{d}/{entry['file']} embeds FlowWarp PTX of ISA {isa}, which this "
                               f"GPU driver (CUDA {driver[0]}.{driver[1]}) cannot load: update the "
                               f"driver, or rebuild here with {rebuild} after {kernel.NVRTC_FIX}")


@dataclass(frozen=True)
class Tensor:
    """One I/O tensor of an engine."""

    name: str
    is_input: bool
    dtype: np.dtype


def engine_tensors(engine: trt.ICudaEngine, graph: str, path: Path,
                   outputs: list[str] | None = None) -> list[Tensor]:
    """The engine's I/O tensors, checked against the names DESIGN.md §3 fixes for `graph` and
    the `outputs` the runtime reads (default OUTPUTS[graph]; the task's from the manifest)."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name).name
        if dtype not in DTYPES:
            raise BackendError(f"{path}: tensor '{name}' is {dtype}, which dff-trt does not "
                               "bind; rebuild the engine with `dff-build` from dff-export's graphs")
        tensors.append(Tensor(name, engine.get_tensor_mode(name).name == "INPUT",
                              np.dtype(DTYPES[dtype])))
    check_names(path, graph, [t.name for t in tensors if t.is_input],
                [t.name for t in tensors if not t.is_input],
                "re-export and rebuild with this version's dff-export and dff-build", want=outputs)
    return tensors


class _Stage:
    """One engine and one execution context: `bind` sets the input shapes and every tensor's
    address (outputs from the stage's pools, or the given fixed buffers), `enqueue` runs it.
    `outputs`: what the runtime reads (engine_tensors); every output is bound regardless."""

    def __init__(self, graph: str, engine: trt.ICudaEngine, memory: Memory, path: Path,
                 outputs: list[str] | None = None):
        self.graph, self.path, self.engine = graph, path, engine
        self.tensors = {t.name: t for t in engine_tensors(engine, graph, path, outputs)}
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{path}: TensorRT could not make an execution context (out of "
                               "GPU memory?)")
        self.pools = {n: BufferPool(memory) for n, t in self.tensors.items() if not t.is_input}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def bind(self, inputs: dict[str, DeviceArray],
             fixed: dict[str, DeviceBuffer] | None = None) -> dict[str, DeviceArray]:
        context = self.context
        for name, x in inputs.items():
            want = self.tensors[name].dtype
            if x.dtype != want:
                raise TypeError(f"{self.graph} input {name} is {x.dtype}, the engine wants {want}")
            if self._shapes.get(name) != x.shape:
                if not context.set_input_shape(name, x.shape):
                    raise BackendError(f"{self.path}: input {name} of shape {list(x.shape)} is "
                                       "outside the engine's profile (manifest.json 'profile'); "
                                       "resize the video into it or re-export and rebuild")
                self._shapes[name] = x.shape
            self._address(name, x.ptr)
        outputs = {}
        for name, tensor in self.tensors.items():
            if tensor.is_input:
                continue
            dims = context.get_tensor_shape(name)
            shape = tuple(dims[i] for i in range(len(dims)))
            if min(shape, default=0) < 0:
                raise RuntimeError(f"{self.graph}: output {name} has shape {shape} after "
                                   "setting every input's shape")
            if fixed and name in fixed:
                y = fixed[name].ensure(shape, tensor.dtype).view()
            else:
                y = self.pools[name].take(shape, tensor.dtype)
            self._address(name, y.ptr)
            outputs[name] = y
        return outputs

    def _address(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):  # a bad name or a misaligned pointer
            raise RuntimeError(f"{self.path}: TensorRT refused the address {ptr:#x} of tensor "
                               f"{name} (its log above says why)")

    def enqueue(self, stream: int) -> None:
        if not self.context.execute_async_v3(stream):
            raise BackendError(f"{self.path}: TensorRT could not enqueue the {self.graph} engine "
                               "(its log above says why)")

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.context = self.engine = None  # type: ignore[assignment]


class _FlowTaskGraph:
    """flow + task as one CUDA graph over fixed buffers, captured once per input shape (after
    one plain run, which TensorRT needs after a shape change) and replayed. Its own task
    context, so that key frames' task runs cannot move the addresses it was captured with."""

    def __init__(self, memory: CudaMemory, flow: _Stage, task: _Stage, key_name: str):
        self.memory, self.flow, self.task = memory, flow, task
        self.names = [n for n, t in flow.tensors.items() if t.is_input]
        self.key_name = key_name  # the flow engine's key input: key_image or key_code
        self.inputs = {n: DeviceBuffer(memory) for n in self.names}
        # every output of both engines (probs too): the graph writes them all
        self.outputs = {n: DeviceBuffer(memory) for stage in (flow, task)
                        for n, t in stage.tensors.items() if not t.is_input}
        self.key: tuple | None = None
        self.graph = self.exec = None
        self._keys: tuple = ()  # weak references to the key image and features copied in
        self._handed: list[weakref.ref[DeviceArray]] = []

    def run(self, x: dict[str, DeviceArray], stream: Any) -> tuple[DeviceArray, ...]:
        """Copy the inputs into the graph's buffers, replay it; views of flow, scale, feat."""
        if any(ref() is not None for ref in self._handed):
            raise RuntimeError("cuda_graph=True: the previous flow's outputs are still held; "
                               "they are overwritten by this call (use them before it)")
        key = tuple(x[n].shape for n in self.names)
        keys = (x[self.key_name], x["key_feat"])
        fresh = key != self.key or tuple(ref() for ref in self._keys) != keys
        for name, src in x.items():
            if name == "image" or fresh:
                dst = self.inputs[name].ensure(src.shape, src.dtype)
                self.memory.copy(dst.ptr, src.ptr, src.nbytes, "d2d", stream)
        self._keys = tuple(weakref.ref(k) for k in keys)
        if key != self.key:
            self._capture(stream)
            self.key = key
        check(self.memory.rt.cudaGraphLaunch(self.exec, stream), "cudaGraphLaunch")
        out = tuple(self.outputs[n].view() for n in OUTPUTS["flow"] + OPTIONAL_OUTPUTS["flow"]
                    if n in self.outputs)
        self._handed = [weakref.ref(v) for v in out]
        return out

    def owns(self, feat: Any) -> bool:
        return isinstance(feat, DeviceArray) and feat.buffer is self.outputs["feat"]

    def _bind(self) -> None:
        inputs = {n: b.view() for n, b in self.inputs.items()}
        flow = self.flow.bind(inputs, fixed=self.outputs)
        self.task.bind({"feat": flow["feat"]}, fixed=self.outputs)

    def _capture(self, stream: Any) -> None:
        rt, handle = self.memory.rt, self.memory.stream_handle(stream)
        self._destroy()
        self._bind()
        self.flow.enqueue(handle)
        self.task.enqueue(handle)
        collecting = gc.isenabled()
        # Only the two enqueues may run inside the capture. Pausing the cycle collector keeps
        # it from running finalizers there (a ring slot's finalizer records an event); objects
        # freed by reference counting alone are not stopped by this, and none are made here.
        gc.disable()
        try:
            check(rt.cudaStreamBeginCapture(
                stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                "cudaStreamBeginCapture")
            try:
                self.flow.enqueue(handle)
                self.task.enqueue(handle)
            except BaseException:
                # end the broken capture unchecked, so its error does not hide this one
                err, graph = rt.cudaStreamEndCapture(stream)[:2]
                if graph is not None and int(err) == 0:
                    rt.cudaGraphDestroy(graph)
                raise
            self.graph = check(rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
            self.exec = check(rt.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")
        finally:
            if collecting:
                gc.enable()

    def _destroy(self) -> None:
        rt = self.memory.rt
        if self.exec is not None:
            check(rt.cudaGraphExecDestroy(self.exec), "cudaGraphExecDestroy")
        if self.graph is not None:
            check(rt.cudaGraphDestroy(self.graph), "cudaGraphDestroy")
        self.graph = self.exec = self.key = None

    def close(self) -> None:
        self._destroy()
        for buffer in (*self.inputs.values(), *self.outputs.values()):
            buffer.close()
        self.task.close()


class TrtBackend(Backend):
    """The Backend interface on TensorRT engines from `dff-build` (runtime/backends.py).

    Handles are DeviceArrays. `precision` picks the engine set (default: fp16 if built, else
    fp32, else int8);
    `cuda_graph` replays flow + task as a CUDA graph (its outputs are valid until the next
    `flow`); `timing` records per-stage GPU times, read with `stage_ms()`."""

    name = "tensorrt"
    overlaps_uploads = True  # upload() only enqueues H2D on the ring's upload stream

    def __init__(self, engine_dir: str | os.PathLike[str], *, device: int = 0,
                 precision: str | None = None, cuda_graph: bool = False, timing: bool = False,
                 memory: Memory | None = None):
        version = require_tensorrt()
        import tensorrt as trt
        from dff.engines.builder import device_info
        from dff.engines.compat import select_engines

        self.manifest = load_manifest(engine_dir)
        self.stride = int(self.manifest["stride"])
        self.profile = self.manifest["profile"]
        self.task_spec = task_spec(self.manifest, f"{engine_dir}/manifest.json")
        self.has_quality = "quality" in graph_outputs(self.manifest, "flow")
        gpu, cc = device_info(device)
        chosen = select_engines(self.manifest, gpu, cc, version, precision,
                                directory=engine_dir)
        # the flow sources whose graph has an engine here (select_engines: one at least)
        self.flow_sources = tuple(s for s in flow_sources(self.manifest)
                                  if FLOW_GRAPH[s] in chosen)
        if cuda_graph and "flow" not in chosen:
            raise BackendError(f"--useCudaGraph replays the learned flow graph, and "
                               f"{engine_dir} has no flow engine; drop --useCudaGraph")
        self.keyed = keyed(self.manifest) and "flow_key" in chosen  # (select_engines: with flow)
        self.precision = chosen["feature"]["precision"]
        check_ptx_isa(chosen, engine_dir, self.precision)
        self.memory = memory = memory or CudaMemory(device)
        if cuda_graph and not isinstance(memory, CudaMemory):
            raise ValueError("cuda_graph=True needs CudaMemory")
        self.timer = Timer(self.memory) if timing else None
        self._ring = PinnedRing(self.memory, timer=self.timer)
        self._stream = self.memory.stream_handle(self._ring.compute)
        # task outputs are copied to the host at once: one fixed buffer each is enough
        self._task_out = {n: DeviceBuffer(self.memory) for n in self.task_spec["outputs"]}
        self._stages: dict[str, _Stage] = {}
        self._pool = BufferPool(self.memory)  # rows split or stacked across streams
        self._graph: _FlowTaskGraph | None = None
        self.cuda_graph = cuda_graph  # StreamPipeline refuses it: one stream's replay
        self._open = True
        try:
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engines = {g: self._load(Path(engine_dir) / e["file"]) for g, e in chosen.items()}
            for graph, (engine, path) in engines.items():
                self._stages[graph] = _Stage(graph, engine, self.memory, path,
                                             graph_outputs(self.manifest, graph))
            if cuda_graph:
                task = _Stage("task", engines["task"][0], self.memory, engines["task"][1],
                              graph_outputs(self.manifest, "task"))
                assert isinstance(memory, CudaMemory)
                self._graph = _FlowTaskGraph(memory, self._stages["flow"], task, self.key_input)
        except BaseException:
            self.close()
            raise

    def _load(self, path: Path) -> tuple[trt.ICudaEngine, Path]:
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(f"{path}: TensorRT could not deserialize this engine (its log "
                               f"above says why); rebuild it with `dff-build {path.parent}/ "
                               f"--{self.precision}`")
        return engine, path

    def _span(self, name: str) -> Any:
        return self.timer.span(name, self._ring.compute) if self.timer else contextlib.nullcontext()

    def _input(self, value: Any, dtype: np.dtype) -> DeviceArray:
        if isinstance(value, DeviceArray):
            return value
        return self._ring.stage(np.ascontiguousarray(value, dtype=dtype))[1]

    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, DeviceArray]:
        stage = self._stages[graph]
        self.memory.activate()
        x = {name: self._input(v, stage.tensors[name].dtype) for name, v in feeds.items()}
        outputs = stage.bind(x, fixed=self._task_out if graph == "task" else None)
        with self._span(graph):
            stage.enqueue(self._stream)
        return outputs

    def feature(self, image: np.ndarray) -> Any:
        return self._run("feature", {"image": image})["feat"]

    def key(self, key_image: Any) -> Any:
        """The flow_key engine's key_code of the key image, where the export has it (`keyed`)."""
        if not self.keyed:
            return key_image
        return self._run("flow_key", {"key_image": key_image})["key_code"]

    def flow(self, image: np.ndarray, key_image: Any, key_feat: Any) -> FlowOutputs:
        feeds = {"image": image, self.key_input: key_image, "key_feat": key_feat}
        if self._graph is None:
            out = self._run("flow", feeds)
            return FlowOutputs(out["flow"], out["scale"], out["feat"], out.get("quality"))
        self.memory.activate()
        tensors = self._stages["flow"].tensors
        x = {name: self._input(v, tensors[name].dtype) for name, v in feeds.items()}
        with self._span("flow+task"):
            return FlowOutputs(*self._graph.run(x, self._ring.compute))

    def warp(self, key_feat: Any, flow: Any) -> Any:
        """The warp engine (warp.onnx): key_feat along a host flow (cells), scale 1."""
        if "warp" not in self._stages:
            return super().warp(key_feat, flow)
        return self._run("warp", {"key_feat": key_feat, "flow": flow})["feat"]

    def task(self, feat: Any) -> dict[str, np.ndarray]:
        """The task outputs by name (the manifest's `task.outputs`), host arrays."""
        names = self.task_spec["outputs"]
        if self._graph is not None and self._graph.owns(feat):  # computed with the flow
            device = [self._graph.outputs[n].view() for n in names]
        else:
            outputs = self._run("task", {"feat": feat})
            device = [outputs[n] for n in names]
        return dict(zip(names, self._ring.to_host_all(device)))

    def upload(self, image: Any) -> Any:
        if isinstance(image, DeviceArray):
            return image
        self.memory.activate()
        return self._ring.stage(np.ascontiguousarray(image))[1]

    def split(self, handle: Any) -> list[Any]:
        """A batch [N,...] as N DeviceArrays [1,...]: row views (each keeping the batch's
        buffer alive) when a row is ALIGN-aligned, else d2d copies (buffers.split_rows)."""
        self.memory.activate()
        return split_rows(self.upload(handle), self.memory, self._ring.compute, self._pool)

    def stack(self, handles: list[Any]) -> Any:
        """DeviceArrays [n_i,...] as one [sum n_i,...] by d2d copies on the compute stream into
        a pooled buffer (buffers.stack_rows); one handle as it is."""
        if len(handles) == 1:
            return handles[0]
        self.memory.activate()
        xs = [self.upload(h) for h in handles]
        return stack_rows(xs, self.memory, self._ring.compute, self._pool)

    def to_host(self, handle: Any) -> np.ndarray:
        return self._ring.to_host(handle) if isinstance(handle, DeviceArray) else np.asarray(handle)

    def device_timer(self) -> StreamTimer | None:
        """Events on the stream every engine runs on (CUDA memory only)."""
        cuda = self.memory.device_type == "cuda"
        return StreamTimer(self.memory, self._ring.compute) if cuda else None

    def stage_ms(self) -> dict[str, float]:
        """GPU ms of the latest run of each stage ("flow+task" for a CUDA graph replay), H2D
        and D2H; empty unless made with `timing=True`."""
        return self.timer.read() if self.timer else {}

    def synchronize(self) -> None:
        self._ring.synchronize()

    def close(self) -> None:
        """Free everything (idempotent); handles given out are invalid after it."""
        if not self._open:
            return
        self._open = False
        self._ring.synchronize()  # nothing in flight may use what is freed below
        if self._graph is not None:
            self._graph.close()
            self._graph = None
        for stage in self._stages.values():
            stage.close()
        self._stages = {}
        for owned in (*self._task_out.values(), self._pool, self._ring,
                      *([self.timer] if self.timer else [])):
            owned.close()
