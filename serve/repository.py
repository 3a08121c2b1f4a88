"""Write a Triton model repository from an engine folder (DESIGN.md §9).

Four models (`dff` alone under `inline`): `feature`, `flow` and `task` (one per graph, dynamic
batching on each; and `flow_key` where the learned flow caches its key frame) and `dff`, the Python-backend BLS model that owns each stream's key frame
under the sequence batcher (serve/dff_model.py). The stage layout (`--stages`) is one of

- `python`: Python-backend stage models running the ONNX graphs on ONNX Runtime's CPU provider
  (serve/stage_model.py), for a Triton that has only the Python backend;
- `onnxruntime`: `onnxruntime_onnx` models with the graphs as `1/model.onnx`;
- `tensorrt`: `tensorrt_plan` models with the manifest's engines as `1/model.plan`;
- `inline`: no stage models: `dff` alone, running the three graphs (copied into `dff/1/`, named
  by its parameter `inline_graphs`) on ONNX Runtime CPU sessions in its own process, for a
  Python-only Triton without a BLS round trip between processes per stage call.

Configs follow Triton's model_configuration.md: tensor dims leave out the batch dimension
(`max_batch_size` > 0), a dynamic axis is -1, a per-frame scalar (detection's `num`) is dims
[1] reshaped to [].
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from dff.export.manifest import LEARNED, flow_sources, graph_path, load_manifest, stage_graphs
from dff.runtime.backends import graph_outputs, task_spec
from dff.runtime.scheduler import make_scheduler

from dff.errors import DffError

STAGE_BACKENDS = ("python", "onnxruntime", "tensorrt")  # the layouts with stage models
STAGES = (*STAGE_BACKENDS, "inline")
DTYPES = {"uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int32": "TYPE_INT32",
          "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32",
          "bool": "TYPE_BOOL"}
HERE = Path(__file__).resolve().parent
IDLE_S = 10.0  # default idle timeout of a stream: then Triton and the dff model forget it


class RepositoryError(DffError):
    """A repository that cannot be written from this engine folder."""


def _dims(shape: list[Any]) -> tuple[list[int], bool]:
    """(Triton dims without the batch axis, whether it is a per-frame scalar)."""
    rest = [-1 if isinstance(d, str) else int(d) for d in shape[1:]]
    return (rest, False) if rest else ([1], True)


def tensor_text(spec: dict[str, Any], where: str) -> str:
    """One input or output entry of a config.pbtxt from a manifest tensor {name, dtype,
    shape}."""
    if spec["dtype"] not in DTYPES:
        raise RepositoryError(f"{where}: tensor {spec['name']!r} has dtype {spec['dtype']!r}, "
                              f"which this writer does not map to Triton (it maps "
                              f"{', '.join(DTYPES)})")
    dims, scalar = _dims(spec["shape"])
    text = (f'  {{ name: "{spec["name"]}" data_type: {DTYPES[spec["dtype"]]} '
            f'dims: [ {", ".join(map(str, dims))} ]')
    return text + (" reshape: { shape: [ ] } }" if scalar else " }")


def _params(values: dict[str, Any]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(str(v))} }} }}\n'
                   for k, v in values.items())


def stage_config(manifest: dict, graph: str, stages: str, max_batch: int,
                 threads: int = 1, where: str = "manifest.json") -> str:
    """config.pbtxt of stage model `graph` ("feature", "flow" or "task")."""
    spec = manifest["graphs"][graph]
    outputs = spec["outputs"]
    if graph == "task":  # what the runtime reads, in the manifest's order
        names = task_spec(manifest, where)["outputs"]
        outputs = [next(o for o in outputs if o["name"] == n) for n in names]
    head = {"python": 'backend: "python"',
            "onnxruntime": 'platform: "onnxruntime_onnx"\ndefault_model_filename: "model.onnx"',
            "tensorrt": 'platform: "tensorrt_plan"\ndefault_model_filename: "model.plan"'}[stages]
    kind = {"python": "KIND_CPU", "onnxruntime": "KIND_AUTO", "tensorrt": "KIND_GPU"}[stages]
    text = (f'name: "{graph}"\n{head}\nmax_batch_size: {max_batch}\n'
            "input [\n" + ",\n".join(tensor_text(t, where) for t in spec["inputs"]) + "\n]\n"
            "output [\n" + ",\n".join(tensor_text(t, where) for t in outputs) + "\n]\n"
            "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
            f"instance_group [ {{ count: 1 kind: {kind} }} ]\n")
    if stages == "python":
        text += _params({"graph": spec["file"], "threads": threads})
    return text


def dff_config(manifest: dict, *, name: str = "dff", max_batch: int, stage_batch: int,
               schedule: str, key_interval: int, thresholds: dict[str, float],
               max_streams: int, idle_s: float, queue_delay_us: int,
               where: str = "manifest.json", key_budget: float | None = None,
               inline_graphs: dict[str, str] | None = None, threads: int = 1) -> str:
    """config.pbtxt of the BLS model: input `image` uint8 [H,W,3], the task's outputs per
    frame and `is_key` bool [1], under the sequence batcher (oldest strategy). With
    `inline_graphs` ({graph: file in its version folder}) it runs those graphs itself on
    `threads` ONNX Runtime threads each, else it calls the stage models."""
    task = manifest["graphs"]["task"]["outputs"]
    names = task_spec(manifest, where)["outputs"]
    outputs = [next(o for o in task if o["name"] == n) for n in names]
    image = {"name": "image", "dtype": "uint8", "shape": ["N", "H", "W", 3]}
    is_key = {"name": "is_key", "dtype": "bool", "shape": ["N", 1]}
    control = ("    {{ name: \"{0}\" control [ {{ kind: CONTROL_SEQUENCE_{0} "
               "int32_false_true: [ 0, 1 ] }} ] }}")
    # what a client (dff-run --server) needs besides the outputs: the task and its classes
    params = {"task": task_spec(manifest, where)["kind"],
              "class_names": json.dumps(list(manifest["class_names"])),
              "schedule": schedule, "key_interval": key_interval,
              "thresholds": json.dumps(thresholds), "key_budget": json.dumps(key_budget),
              "stride": manifest["stride"],
              "profile": json.dumps(manifest["profile"]), "stage_max_batch": stage_batch}
    if inline_graphs:
        params |= {"inline_graphs": json.dumps(inline_graphs), "threads": threads}
    else:
        params |= {f"{g}_model": g for g in stage_graphs(manifest)}
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            f"input [\n{tensor_text(image, where)}\n]\n"
            "output [\n" + ",\n".join(tensor_text(t, where) for t in (*outputs, is_key))
            + "\n]\n"
            "sequence_batching {\n"
            f"  max_sequence_idle_microseconds: {round(idle_s * 1e6)}\n"
            "  control_input [\n" + control.format("START") + ",\n"
            + control.format("END") + ",\n"
            '    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID '
            "data_type: TYPE_UINT64 } ] }\n  ]\n"
            f"  oldest {{ max_candidate_sequences: {max_streams} "
            f"preferred_batch_size: [ {max_batch} ] "
            f"max_queue_delay_microseconds: {queue_delay_us} }}\n}}\n"
            "instance_group [ { count: 1 kind: KIND_CPU } ]\n" + _params(params))


def pick_engines(manifest: dict, engine_dir: Path, precision: str | None) -> dict[str, dict]:
    """One engines entry per graph, all of one precision (`precision`, else the first that
    every graph has), for tensorrt_plan models; refuses an ambiguous or missing set."""
    from dff.engines.naming import PRECISIONS, build_command

    entries = [e for e in manifest.get("engines", {}).values() if isinstance(e, dict)]
    fix = f"build them with `{build_command(str(engine_dir), precision)}`"
    for p in (precision,) if precision else PRECISIONS:
        chosen = {g: [e for e in entries if e.get("graph") == g and e.get("precision") == p]
                  for g in stage_graphs(manifest)}
        if all(chosen.values()):
            many = {g: [e["file"] for e in found] for g, found in chosen.items() if len(found) > 1}
            if many:
                raise RepositoryError(f"{engine_dir}/manifest.json: more than one {p} engine "
                                      f"per graph ({many}, built for different GPUs); copy "
                                      "the engine folder of the serving GPU's build")
            return {g: found[0] for g, found in chosen.items()}
    want = precision or " or ".join(PRECISIONS)
    raise RepositoryError(f"{engine_dir}/manifest.json: no complete set of {want} TensorRT "
                          f"engines ({', '.join(stage_graphs(manifest))}) for --stages tensorrt; {fix}")


def _check_free(paths: list[Path], force: bool) -> None:
    busy = [p for p in paths if p.exists()]
    if busy and not force:
        raise RepositoryError(f"{busy[0]} exists; pass --force to replace the models "
                              f"{', '.join(p.name for p in paths)} in {busy[0].parent}")
    for path in busy:
        shutil.rmtree(path)


def write_stage_models(engine_dir: str | os.PathLike[str], repo_dir: str | os.PathLike[str], *,
                       stages: str = "python", max_batch: int | None = None, threads: int = 1,
                       precision: str | None = None, force: bool = False) -> int:
    """Write `feature`, `flow` and `task` (and `flow_key`, where the export has it) into
    `repo_dir`; returns their max_batch_size
    (`max_batch`, default the manifest profile's largest batch)."""
    engine_dir, repo = Path(engine_dir), Path(repo_dir)
    if stages not in STAGE_BACKENDS:
        raise RepositoryError(f"stage models {stages!r}: choose one of "
                              f"{', '.join(STAGE_BACKENDS)} (`inline` has none: write it with "
                              "write_repository or write_dff_model(inline=True))")
    manifest = load_manifest(engine_dir)
    where = str(engine_dir / "manifest.json")
    profile_batch = int(manifest["profile"]["max"][0])
    batch = max_batch or profile_batch
    if stages == "tensorrt" and batch > profile_batch:
        raise RepositoryError(f"--max-batch {batch}: the engines' profile ends at batch "
                              f"{profile_batch} ({where} 'profile.max'); re-export with a "
                              "larger --max-shape or lower --max-batch")
    if stages == "tensorrt":
        files = {g: engine_dir / e["file"]
                 for g, e in pick_engines(manifest, engine_dir, precision).items()}
    else:
        files = {g: graph_path(engine_dir, manifest, g) for g in stage_graphs(manifest)}
    _check_free([repo / g for g in files], force)
    for graph in files:
        version = repo / graph / "1"
        version.mkdir(parents=True)
        (repo / graph / "config.pbtxt").write_text(
            stage_config(manifest, graph, stages, batch, threads, where))
        target = {"python": files[graph].name, "onnxruntime": "model.onnx",
                  "tensorrt": "model.plan"}[stages]
        shutil.copyfile(files[graph], version / target)
        if stages == "python":
            shutil.copyfile(HERE / "stage_model.py", version / "model.py")
    return batch


def write_dff_model(engine_dir: str | os.PathLike[str], repo_dir: str | os.PathLike[str], *,
                    name: str = "dff", schedule: str = "fixed", key_interval: int | None = None,
                    thresholds: dict | None = None, key_budget: float | None = None,
                    max_batch: int | None = None, max_streams: int = 16, idle_s: float = IDLE_S,
                    queue_delay_us: int = 1000, inline: bool = False, threads: int = 1,
                    force: bool = False) -> dict[str, Any]:
    """Write the BLS model `name` (its schedule: make_scheduler's, `key_budget` a budget per
    stream) into `repo_dir`, calling the stage models there, or with `inline` running the
    graphs itself (copied into `name/1/`, `threads` ONNX Runtime threads a session); returns
    {name, schedule, key_interval, max_batch}."""
    engine_dir, repo = Path(engine_dir), Path(repo_dir)
    manifest = load_manifest(engine_dir, verify_hashes=inline)  # inline copies the graphs
    where = str(engine_dir / "manifest.json")
    batch = max_batch or int(manifest["profile"]["max"][0])
    k = key_interval or int(manifest["key_interval"])
    thresholds = dict(thresholds or {})
    scheduler = make_scheduler(schedule, k, int(manifest["stride"]),  # refuse bad ones here
                               key_budget=key_budget, **dict(thresholds))
    if getattr(scheduler, "needs_quality", False) \
            and "quality" not in graph_outputs(manifest, "flow"):
        raise RepositoryError(f"--schedule learned: {engine_dir}/flow.onnx has no `quality` "
                              "output; add a quality head with `python -m dff.models.quality "
                              "MODEL.pth -o MODEL_quality.pth` and export that")
    if not (max_streams >= 1 and idle_s > 0 and math.isfinite(idle_s)):
        raise RepositoryError(f"max_streams {max_streams} must be ≥ 1 and the idle timeout "
                              f"{idle_s} s above 0")
    files = ({g: graph_path(engine_dir, manifest, g) for g in stage_graphs(manifest)}
             if inline else {})
    _check_free([repo / name], force)
    version = repo / name / "1"
    version.mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(dff_config(
        manifest, name=name, max_batch=batch, stage_batch=batch, schedule=schedule,
        key_interval=k, thresholds=thresholds, max_streams=max_streams, idle_s=idle_s,
        queue_delay_us=queue_delay_us, where=where, key_budget=key_budget,
        inline_graphs={g: f.name for g, f in files.items()}, threads=threads))
    shutil.copyfile(HERE / "dff_model.py", version / "model.py")
    for path in files.values():
        shutil.copyfile(path, version / path.name)
    return {"name": name, "schedule": schedule, "key_interval": k, "max_batch": batch}


def write_repository(engine_dir: str | os.PathLike[str], repo_dir: str | os.PathLike[str], *,
                     stages: str = "python", max_batch: int | None = None, threads: int = 1,
                     precision: str | None = None, force: bool = False,
                     **dff: Any) -> dict[str, Any]:
    """The stage models and the `dff` model (keyword arguments of write_dff_model) in
    `repo_dir`, or with stages "inline" the `dff` model alone, running the graphs itself; other
    folders there are left alone. Returns a summary."""
    if stages not in STAGES:
        raise RepositoryError(f"--stages {stages!r}: choose one of {', '.join(STAGES)}")
    manifest = load_manifest(engine_dir, verify_hashes=False)
    if LEARNED not in flow_sources(manifest):
        raise RepositoryError(f"{engine_dir}: this export has no learned flow graph (flow "
                              "sources: " + ", ".join(flow_sources(manifest)) + "), and the "
                              "Triton dff model runs the learned flow only; serve an export "
                              "with a flow graph, or run it with `dff-run --flow dis`")
    name = dff.get("name", "dff")
    models = [name] if stages == "inline" else [*stage_graphs(manifest), name]
    if not force:  # all of them free before anything is written
        _check_free([Path(repo_dir) / n for n in models], False)
    if stages == "inline":
        summary = write_dff_model(engine_dir, repo_dir, max_batch=max_batch, inline=True,
                                  threads=threads, force=force, **dff)
    else:
        batch = write_stage_models(engine_dir, repo_dir, stages=stages, max_batch=max_batch,
                                   threads=threads, precision=precision, force=force)
        summary = write_dff_model(engine_dir, repo_dir, max_batch=batch, force=force, **dff)
    return {"repository": str(repo_dir), "stages": stages, "models": models, **summary}
