"""dff.serve.scaleout: the nginx configuration that keeps each stream on one of several Triton
servers. With nginx installed, two real Triton servers behind a real nginx: every frame of a
stream reaches the server holding its sequence, and the streams spread over both servers
(no mock of Triton or nginx)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from dff.data.synthetic import make_clip
from dff.runtime.scheduler import make_scheduler
from dff.serve.scaleout import STREAM_HEADER, ScaleoutError, header_variable, nginx_config
from dff.serve.server import free_port
from triton_fixture import K, grpc_client_module, pid_alive, start_server

from dff.commands.scaleout import main

STREAMS, FRAMES, H, W = 16, 4, 64, 96  # 16 streams: all on one of two servers with p = 2^-15
NO_NGINX = "nginx not installed (apt-get install nginx)"


# --- the configuration, no nginx --------------------------------------------------------------

def test_config_hashes_the_stream_header_onto_the_servers_in_order():
    text = nginx_config(["10.0.0.1:8001", "gpu2.local:8001", "[fd00::3]:8001"], 9000)
    lines = [line.strip() for line in text.splitlines()]
    upstream = lines[lines.index("upstream triton {") + 1:]
    assert upstream[:4] == ["hash $http_dff_stream consistent;", "server 10.0.0.1:8001;",
                            "server gpu2.local:8001;", "server [fd00::3]:8001;"]
    assert upstream[4].startswith("keepalive ")  # after the balancing method, as nginx needs
    assert "listen 0.0.0.0:9000 http2;" in lines
    assert "grpc_pass grpc://triton;" in lines
    assert "client_max_body_size 64m;" in lines  # nginx's 1m default is below a 600x1000 frame
    assert "pid nginx.pid;" in lines and "error_log error.log warn;" in lines  # under -p


def test_header_variable_is_nginx_spelling_of_the_header():
    assert STREAM_HEADER == "dff-stream"  # what dff-run --server sends (runtime/remote.py)
    assert header_variable() == "$http_dff_stream"
    assert header_variable("X-Camera-Id") == "$http_x_camera_id"
    with pytest.raises(ScaleoutError, match="letters, digits and '-' only"):
        header_variable("dff_stream")


@pytest.mark.parametrize(("servers", "port", "message"), [
    ([], 9000, "no servers"),
    (["10.0.0.1"], 9000, "expected HOST:PORT"),
    (["10.0.0.1:70000"], 9000, "port 70000: a TCP port is 1..65535"),
    (["a:1", "b:2", "a:1"], 9000, "server a:1 is listed twice"),
    (["a:1"], 0, "listen port 0"),
])
def test_bad_servers_or_ports_are_refused_with_the_fix(servers, port, message):
    with pytest.raises(ScaleoutError, match=message):
        nginx_config(servers, port)


def test_command_prints_the_config_or_one_error_line(capsys):
    assert main(["127.0.0.1:8001", "127.0.0.1:8002", "--listen-port", "9001"]) == 0
    out = capsys.readouterr().out
    assert "server 127.0.0.1:8002;" in out and "listen 0.0.0.0:9001 http2;" in out
    assert main(["127.0.0.1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dff.serve.scaleout: error: server '127.0.0.1': expected HOST:PORT")
    assert err.count("\n") == 1


# --- real nginx --------------------------------------------------------------------------------

def nginx_binary() -> str:
    path = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.skip(NO_NGINX)
    return path


def test_nginx_accepts_the_generated_config(tmp_path):
    nginx = nginx_binary()
    (tmp_path / "nginx.conf").write_text(nginx_config(["127.0.0.1:8001", "127.0.0.1:8002"],
                                                      free_port(), listen_host="127.0.0.1"))
    done = subprocess.run([nginx, "-t", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf")],
                          check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


class Nginx:
    """nginx in the foreground on `conf`, its pid, logs and temporary files in `prefix`."""

    def __init__(self, binary: str, prefix, conf: str, port: int):
        self.prefix, self.port = prefix, port
        (prefix / "nginx.conf").write_text(conf)
        self.process = subprocess.Popen(
            [binary, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        g = grpc_client_module()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, \
                f"nginx exited with {self.process.returncode}: {self.process.stderr.read()}"
            client = g.InferenceServerClient(f"127.0.0.1:{self.port}")
            try:
                if client.is_server_ready(client_timeout=2):
                    return
            except g.InferenceServerException:
                time.sleep(0.1)
            finally:
                client.close()
        raise AssertionError(f"nginx on port {self.port} did not pass a ready check in "
                             f"{timeout:.0f} s: {(self.prefix / 'error.log').read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # fast shutdown: the workers too
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process.stderr.close()


@pytest.fixture
def behind_nginx(engines, tmp_path):
    """Two Triton servers on one repository (fixed schedule, K) and nginx in front of their
    gRPC ports with the generated config; all three stopped by their PIDs at the end."""
    from dff.serve.repository import write_repository

    binary = nginx_binary()
    repo = tmp_path / "repo"
    write_repository(engines, repo, stages="python", key_interval=K, idle_s=60.0)
    servers = []
    proxy = None
    try:
        for _ in range(2):
            servers.append(start_server(repo))
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        port = free_port()
        proxy = Nginx(binary, prefix, nginx_config([s.grpc_url for s in servers], port,
                                                   listen_host="127.0.0.1"), port)
        proxy.wait_ready()
        yield servers, f"127.0.0.1:{port}"
    finally:
        pids = [s.pid for s in servers] + ([proxy.process.pid] if proxy else [])
        if proxy is not None:
            proxy.stop()
        for s in servers:
            s.stop()
        assert not any(pid_alive(p) for p in pids), f"still running: {pids}"


def infer(client, frame, sid, start=False, end=False, headers=None):
    g = grpc_client_module()
    image = g.InferInput("image", [1, *frame.shape], "UINT8")
    image.set_data_from_numpy(frame[None])
    r = client.infer("dff", [image], sequence_id=sid, sequence_start=start, sequence_end=end,
                     headers=headers, client_timeout=60)
    return r.as_numpy("labels")[0], bool(r.as_numpy("is_key")[0, 0])


def dff_inferences(url: str) -> int:
    g = grpc_client_module()
    client = g.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("dff", as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0))
    finally:
        client.close()


def reference(engines, frames) -> list[tuple[np.ndarray, bool]]:
    from dff.runtime.loop import Pipeline
    from dff.runtime.ort_backend import OrtBackend

    backend = OrtBackend(engines)
    try:
        return [(r.labels, r.is_key) for r in
                Pipeline(backend, make_scheduler("fixed", K)).run(frames)]
    finally:
        backend.close()


def test_each_stream_stays_on_one_server_and_streams_use_both(behind_nginx, engines):
    servers, proxy = behind_nginx
    g = grpc_client_module()
    clips = {5000 + i: make_clip(40 + i, FRAMES + 1, H, W).frames for i in range(STREAMS)}
    got: dict[int, list] = {sid: [] for sid in clips}
    failed: dict[int, str] = {}

    def stream(sid: int) -> None:  # frames 0..FRAMES-1 through nginx, no END yet
        client = g.InferenceServerClient(proxy)
        try:
            for t in range(FRAMES):
                got[sid].append(infer(client, clips[sid][t], sid, start=t == 0,
                                      headers={STREAM_HEADER: str(sid)}))
        except Exception as e:  # noqa: BLE001 - reported by the test
            failed[sid] = str(e)
        finally:
            client.close()

    before = [dff_inferences(s.grpc_url) for s in servers]
    threads = [threading.Thread(target=stream, args=(sid,)) for sid in clips]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a stream client hung"
    assert not failed, failed  # a frame sent to a server without its sequence is refused
    counts = [dff_inferences(s.grpc_url) - b for s, b in zip(servers, before)]

    # the last frame straight to each server, without START: only the server holding the
    # sequence takes it (and ends it); the other refuses, as it would a misrouted frame
    home: dict[int, int] = {}
    for sid, frames in clips.items():
        for n, server in enumerate(servers):
            client = g.InferenceServerClient(server.grpc_url)
            try:
                got[sid].append(infer(client, frames[FRAMES], sid, end=True))
                assert sid not in home, f"sequence {sid} lives on both servers"
                home[sid] = n
            except g.InferenceServerException as e:
                assert "must specify the START flag" in str(e)
            finally:
                client.close()
    assert sorted(home) == sorted(clips), "a stream's sequence is on neither server"
    on = [sum(1 for n in home.values() if n == i) for i in range(2)]
    assert counts == [FRAMES * on[0], FRAMES * on[1]]  # whole streams per server, no stray
    assert min(on) > 0, f"all {STREAMS} streams hashed to one server: {on}"
    for sid, frames in clips.items():  # and each is the in-process run, frame by frame
        want = reference(engines, frames)
        assert [k for _, k in got[sid]] == [k for _, k in want]
        for t, ((labels, _), (ref, _)) in enumerate(zip(got[sid], want)):
            np.testing.assert_array_equal(labels, ref, err_msg=f"stream {sid}, frame {t}")
