"""dff-run --server (runtime/remote.py, dff/commands/run.py) against Triton's real server (no
mock of Triton): its JSON Lines equal a local run's, every request carries `dff-stream`; the
server killed and restarted mid-stream, a client paused past the idle timeout, more streams
than candidate slots: every frame comes back once, in order, equal to local runs; bad inputs
get one line and exit 1. Fixtures in tests/triton_fixture.py (a vanished client that never
sends END is tests/test_serve.py's)."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from concurrent import futures

import numpy as np
import pytest
from dff.data.synthetic import make_clip
from dff.runtime.remote import (
    HEADER,
    SEQUENCE_GONE,
    RemoteStream,
    parse_address,
    response_outputs,
    sequence_gone,
    stream_frames,
)
from dff.runtime.scheduler import make_scheduler
from dff.runtime.video import open_video, write_synthetic_clip
from dff.runtime.writers import rle_decode
from dff.serve.server import free_port
from triton_fixture import (
    IDLE_S,
    K,
    grpc_client_module,
    kill_and_restart,
    pid_alive,
    start_server,
)

from dff.commands import run as cli

pytest.importorskip("onnxruntime")
pytest.importorskip("cv2", reason="video I/O needs opencv-python-headless")

H, W, T = 64, 96, 24
SLOTS = 2  # max_candidate_sequences of the served `dff`


def call(args):
    """(exit code, stdout, stderr) of dff-run's main(args)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def records(path):
    """A JSON Lines file's records without their times (which differ from run to run)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        assert set(row.pop("time_ms")) >= {"decode"}
    return rows


def local_jsonl(clip, out, engines):
    code, _, err = call([clip, "-e", engines, "-b", "onnxruntime", "-k", K, "--threads", 1,
                         "--json", out, "-q"])
    assert code == 0, err
    return records(out)


def reference(engines, frames):
    """(labels, is_key) per frame of the in-process run (fixed schedule, K)."""
    from dff.runtime.loop import Pipeline
    from dff.runtime.ort_backend import OrtBackend

    backend = OrtBackend(engines, threads=1)
    try:
        return [(r.labels, r.is_key)
                for r in Pipeline(backend, make_scheduler("fixed", K)).run(frames)]
    finally:
        backend.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("serve_client")


@pytest.fixture(scope="module")
def server(engines, root):
    """Triton with `dff` (K, SLOTS candidate sequences, idle 30 s) and `dff_idle` (K, idle
    IDLE_S), on fixed free ports so that a restart keeps them; stopped by its PID."""
    from dff.serve.repository import write_dff_model, write_repository

    repo = root / "repo"
    write_repository(engines, repo, key_interval=K, idle_s=30.0, max_streams=SLOTS)
    write_dff_model(engines, repo, name="dff_idle", key_interval=K, idle_s=IDLE_S)
    server = start_server(repo, http_port=free_port(), grpc_port=free_port())
    yield server
    pid = server.pid
    server.stop()
    assert not pid_alive(pid)


def clip_file(root, seed, frames=T):
    path = root / f"clip{seed}.mp4"
    if not path.exists():
        write_synthetic_clip(path, seed=seed, num_frames=frames, height=H, width=W)
    return path


class HeaderProxy:
    """A gRPC pass-through to `target` that records each call's method, `dff-stream` header
    and request bytes: what a hashing proxy in front of Triton would see."""

    def __init__(self, target: str):
        import grpc

        self.grpc, self.calls = grpc, []
        size = [("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.max_receive_message_length", 2**31 - 1)]
        self.upstream = grpc.insecure_channel(target, options=size)
        self.server = grpc.server(futures.ThreadPoolExecutor(4), options=size)
        self.server.add_generic_rpc_handlers((self,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def service(self, details):
        method = details.method

        def forward(request: bytes, context):
            header = dict(context.invocation_metadata()).get(HEADER)
            self.calls.append((method, header, request))
            try:
                return self.upstream.unary_unary(method)(request, timeout=60)
            except self.grpc.RpcError as e:
                context.abort(e.code(), e.details())

        return self.grpc.unary_unary_rpc_method_handler(forward)

    def close(self):
        self.server.stop(0)
        self.upstream.close()


# --- no server ---------------------------------------------------------------------------------

def test_addresses_and_refusals_are_read_as_the_client_needs():
    assert parse_address("127.0.0.1:8001") == "127.0.0.1:8001"
    assert parse_address("[::1]:8001") == "[::1]:8001"
    for bad in ("8001", "host:", ":8001", "host:0", "host:70000", "http://host:8001"):
        with pytest.raises(Exception, match="expected HOST:PORT"):
            parse_address(bad)
    # Triton's sequence batcher, then the dff model (serve/dff_model.py), in their words
    assert sequence_gone("inference request for sequence 5 to model 'dff' must specify the "
                         "START flag on the first request of the sequence")
    assert sequence_gone("dff: sequence 5 has no state here (ended, idle longer than 1 s, or "
                         "the server restarted); send its next frame with sequence_start=True "
                         f"{SEQUENCE_GONE}")
    assert not sequence_gone("dff: sequence 5: frame 80x64, but it started at 96x64")


def test_a_detection_response_is_cut_to_its_num_rows_as_locally():
    boxes = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    one = response_outputs({"boxes": boxes, "scores": np.array([[0.9, 0.5, 0.0]], np.float32),
                            "classes": np.array([[2, 1, -1]], np.int32),
                            "num": np.array([[2]], np.int32)})
    assert one["boxes"].shape == (2, 4) and one["classes"].tolist() == [2, 1]
    assert int(one["num"]) == 2


def test_bad_addresses_and_an_unreachable_server_get_one_line(root, engines):
    grpc_client_module()  # tritonclient, or a skip (a failure where the server is required)
    clip = clip_file(root, 1)
    out = root / "bad.jsonl"
    for address in ("nohost", "127.0.0.1:0", "127.0.0.1:port"):
        code, _, err = call([clip, "--server", address, "--json", out])
        assert code == 1 and err.count("\n") == 1 and "expected HOST:PORT" in err, err
    began = time.monotonic()
    code, _, err = call([clip, "--server", f"127.0.0.1:{free_port()}", "--server-timeout", 0.5,
                         "--json", out])
    assert code == 1 and err.count("\n") == 1, err
    assert "server not reachable for 0.5 s" in err and "Connection refused" in err
    assert time.monotonic() - began < 10
    assert not out.exists()
    with pytest.raises(SystemExit) as usage:  # a local option with --server: argparse's refusal
        call([clip, "--server", "127.0.0.1:8001", "-e", engines])
    assert usage.value.code == 2


# --- the real server ---------------------------------------------------------------------------

def test_a_server_run_writes_what_a_local_run_does_and_sends_dff_stream(server, root, engines):
    clip = clip_file(root, 2)
    want = local_jsonl(clip, root / "local2.jsonl", engines)
    proxy = HeaderProxy(server.grpc_url)
    try:
        out = root / "served2"
        code, stdout, err = call([clip, "--server", f"127.0.0.1:{proxy.port}", "--json",
                                  f"{out}.jsonl", "-o", f"{out}.mp4", "--summary",
                                  f"{out}.json", "--sequence-id", 2**62 + 7])
    finally:
        proxy.close()
    assert code == 0, err
    assert "on dff at 127.0.0.1:" in stdout and "key frames: 8 of 24; sequences: 1" in stdout
    got = records(root / "served2.jsonl")
    assert [r["frame"] for r in got] == list(range(T))
    assert [r["key"] for r in got] == [t % K == 0 for t in range(T)]
    assert got == want  # labels (run-length codes), key flags and class counts, frame by frame
    with open_video(root / "served2.mp4") as video:
        assert video.frame_count == T and video.size == (H, W)
    summary = json.loads((root / "served2.json").read_text())
    assert summary["sequence_ids"] == [2**62 + 7] and summary["restarts"] == []
    assert summary["task"] == "segmentation" and summary["key_interval"] == K
    infers = [(h, req) for m, h, req in proxy.calls if m.endswith("/ModelInfer")]
    assert len(infers) == T
    from tritonclient.grpc import service_pb2

    for header, raw in infers:  # every request: its own sequence id in the header
        request = service_pb2.ModelInferRequest.FromString(raw)
        assert header == str(2**62 + 7) == str(request.parameters["sequence_id"].int64_param)


def test_the_server_killed_and_restarted_resumes_from_a_key_frame(server, engines):
    frames = make_clip(11, 40, H, W).frames
    killed, restarted = threading.Event(), []

    def kill_and_start_again():
        time.sleep(0.05)
        killed.set()
        restarted.append(kill_and_restart(server))  # SIGKILL, then the same ports again

    def source():
        for t, frame in enumerate(frames):
            if t == 8:
                threading.Thread(target=kill_and_start_again, daemon=True).start()
            if t == 20:
                assert killed.wait(30)
            yield frame

    warned, results = [], []
    stream = RemoteStream(server.grpc_url, "dff", timeout=90, warn=warned.append)
    try:
        summary = stream_frames(stream, source(), results.append)
    finally:
        stream.close()
    assert restarted, "the server was not restarted"
    assert [r.index for r in results] == list(range(40))  # none lost, none twice, in order
    (restart,) = summary["restarts"]
    r = restart["frame"]
    assert 7 <= r <= 20, r
    assert len(warned) == 1 and warned[0].startswith(f"dff-run: frame {r}: ")
    assert "lost the server" in warned[0] or "no state for sequence" in warned[0]
    assert len(set(summary["sequence_ids"])) == 2
    assert summary["sequence_ids"][1] == restart["sequence_id"]
    want = reference(engines, frames[:r]) + reference(engines, frames[r:])  # a key frame at r
    assert [x.is_key for x in results] == [k for _, k in want]
    assert results[r].is_key and [t for t in range(40) if results[t].is_key] == \
        [t for t in range(r) if t % K == 0] + list(range(r, 40, K))
    for t, (x, (labels, _)) in enumerate(zip(results, want)):
        np.testing.assert_array_equal(x.outputs["labels"], labels, err_msg=f"frame {t}")


def test_a_client_idle_past_the_timeout_goes_on_in_a_new_sequence(server, engines):
    frames = make_clip(12, 12, H, W).frames

    def source():
        for t, frame in enumerate(frames):
            if t == 5:  # the client reads one frame ahead: the pause falls before frame 4
                time.sleep(IDLE_S + 1.0)
            yield frame

    warned, results = [], []
    stream = RemoteStream(server.grpc_url, "dff_idle", warn=warned.append)
    try:
        summary = stream_frames(stream, source(), results.append)
    finally:
        stream.close()
    assert [r.index for r in results] == list(range(12))
    assert [x["frame"] for x in summary["restarts"]] == [4]
    assert len(warned) == 1 and "frame 4: the server has no state for sequence" in warned[0]
    want = reference(engines, frames[:4]) + reference(engines, frames[4:])
    assert [x.is_key for x in results] == [k for _, k in want]
    for x, (labels, _) in zip(results, want):
        np.testing.assert_array_equal(x.outputs["labels"], labels)


def test_more_streams_than_slots_wait_and_none_is_dropped(server, root, engines):
    n, frames = 2 * SLOTS, 40
    clips = [clip_file(root, 20 + i, frames) for i in range(n)]
    codes: dict[int, object] = {}

    def stream(i: int) -> None:
        try:
            codes[i] = cli.main([str(clips[i]), "--server", server.grpc_url, "-q", "--json",
                                 str(root / f"slots{i}.jsonl"), "--summary",
                                 str(root / f"slots{i}.json")])
        except BaseException as e:  # noqa: BLE001 - reported below
            codes[i] = repr(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    assert codes == dict.fromkeys(range(n), 0)
    waited = 0
    for i, clip in enumerate(clips):
        assert json.loads((root / f"slots{i}.json").read_text())["restarts"] == []
        rows = [json.loads(line) for line in (root / f"slots{i}.jsonl").read_text()
                .splitlines()]
        first, rest = rows[0]["time_ms"]["request"], [r["time_ms"]["request"] for r in rows[1:]]
        waited += first > 5 * float(np.median(rest))  # for a slot: while a stream ran through
        got = records(root / f"slots{i}.jsonl")
        assert got == local_jsonl(clip, root / f"slots_local{i}.jsonl", engines), f"stream {i}"
        assert len(got) == frames and rle_decode(got[-1]["labels"]).shape == (H, W)
    assert waited >= n - SLOTS, f"only {waited} of {n} streams waited for a slot"
