"""dff.serve: the model repository's configs, and DFF on Triton's real server (no mock of
Triton anywhere): concurrent streams equal in-process runs frame by frame, batched across
streams; bad requests get their own error. Fixtures in tests/triton_fixture.py."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import triton_fixture
from dff.data.synthetic import make_clip
from dff.export.manifest import load_manifest, sha256_file, write_manifest
from dff.runtime.scheduler import make_scheduler
from dff.serve.repository import RepositoryError, write_repository, write_stage_models
from dff.serve.server import ServerError
from triton_fixture import (
    ADAPTIVE,
    ADAPTIVE_K,
    IDLE_S,
    K,
    grpc_client_module,
    pid_alive,
    start_server,
    unavailable,
)

# the real server's fixtures
triton_repo = triton_fixture.triton_repo
triton_server = triton_fixture.triton_server
grpc_client = triton_fixture.grpc_client

FRAMES, H, W = 12, 64, 96


def model_config(path):
    """config.pbtxt parsed with Triton's own ModelConfig schema (unknown fields raise)."""
    from google.protobuf import text_format

    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    return text_format.Parse(path.read_text(), pb.ModelConfig())


# --- the repository, no server ----------------------------------------------------------------

def test_python_repository_has_the_four_models_with_batching(engines, tmp_path):
    summary = write_repository(engines, tmp_path / "repo", key_interval=4)
    assert summary["models"] == ["feature", "flow", "task", "dff"]
    for stage in ("feature", "flow", "task"):
        config = model_config(tmp_path / "repo" / stage / "config.pbtxt")
        assert config.backend == "python" and config.max_batch_size == 2  # profile max N
        assert config.HasField("dynamic_batching")
        graph = config.parameters["graph"].string_value
        assert (tmp_path / "repo" / stage / "1" / graph).is_file()
        assert (tmp_path / "repo" / stage / "1" / "model.py").is_file()
    flow = model_config(tmp_path / "repo" / "flow" / "config.pbtxt")
    assert [(i.name, list(i.dims)) for i in flow.input] == [
        ("image", [3, -1, -1]), ("key_image", [3, -1, -1]), ("key_feat", [16, -1, -1])]
    dff = model_config(tmp_path / "repo" / "dff" / "config.pbtxt")
    seq = dff.sequence_batching
    assert seq.HasField("oldest") and seq.oldest.max_candidate_sequences == 16
    assert seq.max_sequence_idle_microseconds == 10_000_000
    assert sorted(c.name for c in seq.control_input) == ["CORRID", "END", "START"]
    assert [(o.name, list(o.dims)) for o in dff.output] == [("labels", [-1, -1]),
                                                            ("is_key", [1])]
    assert list(dff.input[0].dims) == [-1, -1, 3]
    assert dff.parameters["key_interval"].string_value == "4"


def test_onnxruntime_repository_carries_the_graphs_as_model_onnx(engines, tmp_path):
    write_repository(engines, tmp_path / "repo", stages="onnxruntime")
    manifest = load_manifest(engines)
    for stage in ("feature", "flow", "task"):
        config = model_config(tmp_path / "repo" / stage / "config.pbtxt")
        assert config.platform == "onnxruntime_onnx" and not config.backend
        assert config.default_model_filename == "model.onnx"
        copied = tmp_path / "repo" / stage / "1" / "model.onnx"
        assert sha256_file(copied) == manifest["graphs"][stage]["sha256"]
    task = model_config(tmp_path / "repo" / "task" / "config.pbtxt")
    assert [(o.name, list(o.dims)) for o in task.output] == [("labels", [-1, -1])]


def test_tensorrt_repository_takes_one_engine_set_of_the_manifest(engines, tmp_path):
    folder = tmp_path / "engines"
    shutil.copytree(engines, folder)
    manifest = load_manifest(folder)
    with pytest.raises(RepositoryError, match="no complete set .*`dff-build"):
        write_repository(folder, tmp_path / "none", stages="tensorrt")
    for graph in ("feature", "flow", "task"):  # stand-ins: the writer copies, never parses
        for precision in ("fp16", "fp32"):
            plan = folder / f"{graph}_{precision}.plan"
            plan.write_bytes(f"{graph} {precision}".encode())
            manifest["engines"][plan.stem] = {"file": plan.name, "sha256": sha256_file(plan),
                                              "graph": graph, "precision": precision}
    write_manifest(folder / "manifest.json", manifest)
    write_repository(folder, tmp_path / "repo", stages="tensorrt", precision="fp32")
    for graph in ("feature", "flow", "task"):
        config = model_config(tmp_path / "repo" / graph / "config.pbtxt")
        assert config.platform == "tensorrt_plan" and config.max_batch_size == 2
        assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
        assert (tmp_path / "repo" / graph / "1" / "model.plan").read_bytes() == \
            f"{graph} fp32".encode()
    with pytest.raises(RepositoryError, match="profile ends at batch 2"):
        write_repository(folder, tmp_path / "big", stages="tensorrt", max_batch=4)


def test_inline_repository_is_the_dff_model_alone_with_the_graphs_beside_it(engines, tmp_path,
                                                                             capsys):
    from dff.commands.serve import main

    repo = tmp_path / "repo"
    (repo / "feature").mkdir(parents=True)  # a stage model's folder is not in its way
    assert main(["repo", str(engines), str(repo), "--stages", "inline", "--threads", "2",
                 "-k", "4"]) == 0
    assert "wrote dff (inline stages, batch 2" in capsys.readouterr().out
    assert sorted(p.name for p in repo.iterdir()) == ["dff", "feature"]
    assert not any((repo / "feature").iterdir())
    config = model_config(repo / "dff" / "config.pbtxt")
    assert config.backend == "python" and config.sequence_batching.HasField("oldest")
    params = {k: v.string_value for k, v in config.parameters.items()}
    graphs = json.loads(params["inline_graphs"])
    assert sorted(graphs) == ["feature", "flow", "task"]
    manifest = load_manifest(engines)
    for graph, name in graphs.items():
        assert sha256_file(repo / "dff" / "1" / name) == manifest["graphs"][graph]["sha256"]
    assert sorted(p.name for p in (repo / "dff" / "1").iterdir()) == \
        sorted([*graphs.values(), "model.py"])
    assert (params["threads"], params["stage_max_batch"], params["key_interval"]) == \
        ("2", "2", "4")
    assert not any(k.endswith("_model") for k in params)  # no stage model to call
    with pytest.raises(RepositoryError, match="`inline` has none"):
        write_stage_models(engines, tmp_path / "stages", stages="inline")


def test_detection_outputs_keep_their_rows_and_a_scalar_num(detection_engines, tmp_path):
    write_repository(detection_engines, tmp_path / "repo", stages="onnxruntime")
    dff = model_config(tmp_path / "repo" / "dff" / "config.pbtxt")
    dims = {o.name: (list(o.dims), o.HasField("reshape")) for o in dff.output}
    assert dims == {"boxes": ([100, 4], False), "scores": ([100], False),
                    "classes": ([100], False), "num": ([1], True), "is_key": ([1], False)}


def test_an_existing_model_is_replaced_only_with_force(engines, tmp_path):
    write_repository(engines, tmp_path / "repo")
    with pytest.raises(RepositoryError, match="exists; pass --force"):
        write_repository(engines, tmp_path / "repo")
    (tmp_path / "repo" / "other").mkdir()
    write_repository(engines, tmp_path / "repo", force=True, schedule="per-frame")
    assert (tmp_path / "repo" / "other").is_dir()  # not ours: left alone


def test_repo_command_writes_and_refuses_in_one_line(engines, tmp_path, capsys):
    from dff.commands.serve import main

    assert main(["repo", str(engines), str(tmp_path / "repo"), "-k", "5"]) == 0
    assert "wrote feature, flow, task, dff (python stages, batch 2" in capsys.readouterr().out
    assert main(["repo", str(engines), str(tmp_path / "repo")]) == 1
    assert "exists; pass --force" in capsys.readouterr().err


# --- the real server ---------------------------------------------------------------------------

def clip(seed: int) -> np.ndarray:
    return make_clip(seed, FRAMES, H, W).frames


def reference(engines, frames, scheduler) -> list[tuple[np.ndarray, bool]]:
    """The in-process run: Pipeline on ONNX Runtime, batch 1."""
    from dff.runtime.loop import Pipeline
    from dff.runtime.ort_backend import OrtBackend

    backend = OrtBackend(engines)
    try:
        return [(r.labels, r.is_key) for r in Pipeline(backend, scheduler).run(frames)]
    finally:
        backend.close()


def infer(client, model, frame, sid, start=False, end=False):
    g = grpc_client_module()
    image = g.InferInput("image", [1, *frame.shape], g.np_to_triton_dtype(frame.dtype))
    image.set_data_from_numpy(frame[None])
    return client.infer(model, [image], sequence_id=sid, sequence_start=start,
                        sequence_end=end, client_timeout=60)


def run_streams(server, model, clips, bad=None) -> dict[int, dict]:
    """One thread and gRPC client per clip (sequence id 100 + i), all at once. `bad` (i, t,
    frame): stream i sends `frame` before its frame t and records the error."""
    g = grpc_client_module()
    results: dict[int, dict] = {}

    def stream(i: int, frames: np.ndarray) -> None:
        out: dict = {"labels": [], "is_key": [], "errors": []}
        results[i] = out
        client = g.InferenceServerClient(server.grpc_url)
        try:
            for t, frame in enumerate(frames):
                if bad is not None and bad[:2] == (i, t):
                    try:
                        infer(client, model, bad[2], 100 + i)
                    except g.InferenceServerException as e:
                        out["errors"].append(str(e))
                r = infer(client, model, frame, 100 + i, t == 0, t == len(frames) - 1)
                out["labels"].append(r.as_numpy("labels")[0])
                out["is_key"].append(bool(r.as_numpy("is_key")[0, 0]))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            out["failed"] = repr(e)
        finally:
            client.close()

    threads = [threading.Thread(target=stream, args=(i, c)) for i, c in enumerate(clips)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a stream client hung"
    failed = {i: r["failed"] for i, r in results.items() if "failed" in r}
    assert not failed, failed
    return results


def stats(client, model) -> tuple[int, int]:
    """(execution_count, inference_count) of `model` so far."""
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(s.get("execution_count", 0)), int(s.get("inference_count", 0))


def assert_streams_equal(results, clips, engines, scheduler_of):
    for i, frames in enumerate(clips):
        want = reference(engines, frames, scheduler_of())
        got = results[i]
        assert got["is_key"] == [k for _, k in want], f"stream {i}: key frames"
        for t, (labels, _) in enumerate(want):
            assert got["labels"][t].shape == (H, W) and got["labels"][t].dtype == np.uint8
            np.testing.assert_array_equal(got["labels"][t], labels,
                                          err_msg=f"stream {i}, frame {t}")


@pytest.mark.parametrize("model", ["dff", "dff_inline"])  # BLS to python stages; inline
def test_concurrent_streams_equal_in_process_runs_and_are_batched(
        triton_server, grpc_client, engines, model):
    clips = [clip(s) for s in range(3)]
    bad_size = clip(9)[0][:, :80]  # 80x64: a valid size, but not this stream's
    before = {m: stats(grpc_client, m) for m in (model, "task")}
    results = run_streams(triton_server, model, clips, bad=(1, 4, np.ascontiguousarray(bad_size)))
    assert len(results[1]["errors"]) == 1
    assert "sequence 101: frame 80x64, but it started at 96x64" in results[1]["errors"][0]
    for r in results.values():
        assert r["is_key"] == [t % K == 0 for t in range(FRAMES)]
    assert_streams_equal(results, clips, engines, lambda: make_scheduler("fixed", K))
    runs, frames = (np.subtract(stats(grpc_client, model), before[model]))
    assert frames == 3 * FRAMES + 1  # the refused frame was an inference too
    assert runs < frames, f"no batching across streams: {runs} executions of {frames} frames"
    task_runs, task_frames = np.subtract(stats(grpc_client, "task"), before["task"])
    if model == "dff_inline":  # it ran the graphs in its own process
        assert task_frames == 0, "the inline model called the task stage model"
    else:
        assert task_frames == 3 * FRAMES and task_runs <= runs  # one task call per batch at most


def test_adaptive_streams_equal_in_process_runs(triton_server, engines):
    clips = [clip(s) for s in range(3)]

    def scheduler():
        return make_scheduler("adaptive", ADAPTIVE_K, 16, **ADAPTIVE)

    reasons = {}
    for frames in clips:  # the schedule really takes each branch on these clips
        s = scheduler()
        reference(engines, frames, s)
        for reason, n in s.stats()["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    assert reasons["flow"] and reasons["scene_cut"] and reasons["max_interval"]
    results = run_streams(triton_server, "dff_adaptive", clips)
    assert not any(results[i]["is_key"][1:] == [True] * (FRAMES - 1) for i in results)
    assert_streams_equal(results, clips, engines, scheduler)


def test_detection_streams_equal_in_process_runs(detection_engines, tmp_path):
    from dff.runtime.loop import Pipeline
    from dff.runtime.ort_backend import OrtBackend

    write_repository(detection_engines, tmp_path / "repo", key_interval=K)
    clips = [clip(s)[:6] for s in range(2)]
    server = start_server(tmp_path / "repo")
    g = grpc_client_module()
    try:
        client = g.InferenceServerClient(server.grpc_url)
        served = []
        for t in range(6):  # the two streams in turns, on one client
            for i, frames in enumerate(clips):
                served.append((i, infer(client, "dff", frames[t], 200 + i, t == 0, t == 5)))
    finally:
        server.stop()
    backend = OrtBackend(detection_engines)
    want = {i: list(Pipeline(backend, make_scheduler("fixed", K)).run(c))
            for i, c in enumerate(clips)}
    backend.close()
    seen = {0: 0, 1: 0}
    for i, r in served:
        ref = want[i][seen[i]]
        seen[i] += 1
        num = int(r.as_numpy("num")[0, 0])
        assert num == int(ref.outputs["num"]) and bool(r.as_numpy("is_key")[0, 0]) == ref.is_key
        np.testing.assert_allclose(r.as_numpy("boxes")[0, :num], ref.outputs["boxes"], atol=1e-4)
        np.testing.assert_allclose(r.as_numpy("scores")[0, :num], ref.outputs["scores"],
                                   atol=1e-5)
        np.testing.assert_array_equal(r.as_numpy("classes")[0, :num], ref.outputs["classes"])
        assert (r.as_numpy("classes")[0, num:] == -1).all()  # padding rows, as exported
    assert sum(int(want[i][t].outputs["num"]) for i in want for t in range(6)) > 0


def test_bad_requests_get_an_error_of_their_own(triton_server, grpc_client):
    g = grpc_client_module()
    frame = clip(0)[0]
    with pytest.raises(g.InferenceServerException, match="must specify the START flag"):
        infer(grpc_client, "dff", frame, 7)  # Triton's own check: no such sequence
    with pytest.raises(g.InferenceServerException, match="data-type is 'FP32'.*expects 'UINT8'"):
        infer(grpc_client, "dff", frame.astype(np.float32), 7, start=True)
    with pytest.raises(g.InferenceServerException, match="not a multiple of the stride 16"):
        infer(grpc_client, "dff", np.ascontiguousarray(frame[:60]), 7, start=True)
    image = g.InferInput("image", [2, H, W, 3], "UINT8")
    image.set_data_from_numpy(np.stack([frame, frame]))
    with pytest.raises(g.InferenceServerException, match="must specify batch-size 1"):
        grpc_client.infer("dff", [image], sequence_id=7, sequence_start=True)
    r = infer(grpc_client, "dff", frame, 7, start=True)  # the id starts cleanly after all that
    assert r.as_numpy("is_key")[0, 0] and r.as_numpy("labels").shape == (1, H, W)
    r = infer(grpc_client, "dff", frame, 7, end=True)
    assert not r.as_numpy("is_key")[0, 0]
    with pytest.raises(g.InferenceServerException, match="must specify the START flag"):
        infer(grpc_client, "dff", frame, 7)  # ended


def test_a_failing_inline_graph_drops_its_stream_with_the_graphs_error(triton_server,
                                                                        grpc_client):
    g = grpc_client_module()
    frame = clip(0)[0]
    with pytest.raises(g.InferenceServerException, match=r"dff_inline_broken: sequence 8: "
                       r"graph 'task' failed: .*feat.*; its state is dropped, start it again"):
        infer(grpc_client, "dff_inline_broken", frame, 8, start=True)
    with pytest.raises(g.InferenceServerException, match="sequence 8 has no state here"):
        infer(grpc_client, "dff_inline_broken", frame, 8, end=True)


def test_a_vanished_stream_is_forgotten_after_the_idle_timeout(triton_server, grpc_client,
                                                               engines):
    g = grpc_client_module()
    gone, kept = clip(3), clip(4)
    for t in range(2):  # stream 300 vanishes after two frames, without END
        infer(grpc_client, "dff_idle", gone[t], 300, start=t == 0)
    served = []
    deadline = time.monotonic() + IDLE_S + 1.5
    t = 0
    while time.monotonic() < deadline:  # stream 301 goes on past 300's timeout
        r = infer(grpc_client, "dff_idle", kept[t % FRAMES], 301, start=t == 0)
        served.append((r.as_numpy("labels")[0], bool(r.as_numpy("is_key")[0, 0])))
        t += 1
        time.sleep(0.05)
    with pytest.raises(g.InferenceServerException, match="must specify the START flag"):
        infer(grpc_client, "dff_idle", gone[2], 300)
    log = triton_server.log_path.read_text()
    assert "dff_idle: sequence 300 idle for" in log  # the model freed its state
    assert "sequence 301 idle" not in log
    frames = np.stack([kept[i % FRAMES] for i in range(len(served))])
    want = reference(engines, frames, make_scheduler("fixed", K))
    assert [k for _, k in served] == [k for _, k in want]
    for (got, _), (labels, _) in zip(served, want):
        np.testing.assert_array_equal(got, labels)


def test_start_command_serves_until_sigterm(triton_repo):
    from dff.serve.server import ServerUnavailable, find_server

    try:
        find_server()
    except ServerUnavailable as e:
        unavailable(str(e))
    proc = subprocess.Popen([sys.executable, "-m", "dff.commands.serve", "start", str(triton_repo)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "tritonserver ready in" in line and "gRPC 127.0.0.1:" in line, \
            line + proc.stderr.read()
        server_pid = int(line.split("(pid ")[1].split(")")[0])
        assert pid_alive(server_pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "tritonserver stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not pid_alive(server_pid)


def test_a_repository_the_server_refuses_fails_with_its_log(triton_repo, tmp_path):
    repo = tmp_path / "broken"
    shutil.copytree(triton_repo / "task", repo / "task")
    config = repo / "task" / "config.pbtxt"
    config.write_text(config.read_text().replace('"graph"', '"missing"'))  # no graph parameter
    with pytest.raises(ServerError, match=r"exited with code \d+ before it was ready: .*"
                       r"KeyError: 'graph'.*failed to load all models \(log: .*server\.log\)") as failed:
        start_server(repo, timeout=60, log_path=str(tmp_path / "server.log"))
    assert "\n" not in str(failed.value)
