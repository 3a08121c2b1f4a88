"""Fixtures that run Triton's real server on a repository of the tiny test export (imported by
tests/test_serve.py and tests/test_serve_client.py). Where the server cannot be installed or
started here, the tests that use them skip with the reason; with DFF_SERVE_REQUIRED=1 (CI,
which installs the server) they fail.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

K = 3  # the fixed schedule's key interval in the served repository
# the adaptive model's thresholds: on the tiny untrained export (mean flow 0.35-0.42 cells,
# scene differences up to 10 grey levels in 12 frames) each test fires on some frames
ADAPTIVE = {"max_mean_flow": 0.4, "scene_cut": 8.0}
ADAPTIVE_K = 6  # its max_interval
IDLE_S = 1.0  # the idle timeout of `dff_idle`


def unavailable(reason: str) -> None:
    """Skip with `reason`, or fail where the server is required."""
    if os.environ.get("DFF_SERVE_REQUIRED") == "1":
        pytest.fail(f"DFF_SERVE_REQUIRED=1 but {reason}")
    pytest.skip(reason)


def grpc_client_module():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as e:
        unavailable(f"tritonclient[grpc] is not importable ({e}); pip install 'dff-trt[serve]'")
    return grpcclient


@pytest.fixture(scope="module")
def triton_repo(engines, tmp_path_factory):
    """A repository with python stages, `dff` (fixed, K), `dff_adaptive` (ADAPTIVE),
    `dff_idle` (fixed, K, streams forgotten after IDLE_S), `dff_inline` (fixed, K, written
    with stages "inline": it runs the graphs itself, calling no stage model) and
    `dff_inline_broken` (as dff_inline, but its task graph is the feature graph, so every
    frame's task run fails)."""
    from dff.export.manifest import graph_path, load_manifest
    from dff.serve.repository import write_dff_model, write_repository

    repo = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(engines, repo, stages="python", key_interval=K, idle_s=30.0)
    for name in ("dff_inline", "dff_inline_broken"):
        write_repository(engines, repo, stages="inline", name=name, key_interval=K,
                         idle_s=30.0)
    manifest = load_manifest(engines)
    shutil.copyfile(graph_path(engines, manifest, "feature"),
                    repo / "dff_inline_broken" / "1" / graph_path(engines, manifest, "task").name)
    write_dff_model(engines, repo, name="dff_adaptive", schedule="adaptive",
                    key_interval=ADAPTIVE_K, thresholds=ADAPTIVE, idle_s=30.0)
    write_dff_model(engines, repo, name="dff_idle", key_interval=K, idle_s=IDLE_S)
    return repo


def start_server(repo, **kw):
    """A started TritonServer on `repo`, or a skip (fail if required) when no server binary
    can run here. A server that runs but fails on the repository is an error, not a skip."""
    from dff.serve.server import ServerUnavailable, TritonServer

    grpc_client_module()
    server = TritonServer(repo, **kw)
    try:
        server.start()
    except ServerUnavailable as e:
        unavailable(str(e))
    return server


def kill_and_restart(server) -> int:
    """SIGKILL `server`'s process by its PID (no clean shutdown: its sequences are lost), reap
    it and its stubs, and start it again on the same ports (the server must have been made
    with fixed ports). Returns the killed PID."""
    pid = server.pid
    os.kill(pid, signal.SIGKILL)
    server.stop()
    assert not pid_alive(pid), f"tritonserver pid {pid} still runs after SIGKILL"
    server.start()
    return pid


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def triton_server(triton_repo):
    """Triton on `triton_repo` with free ports on 127.0.0.1, stopped by its PID at the end."""
    server = start_server(triton_repo)
    pid = server.pid
    yield server
    server.stop()
    assert not pid_alive(pid), f"tritonserver pid {pid} still runs after stop()"


@pytest.fixture
def grpc_client(triton_server):
    client = grpc_client_module().InferenceServerClient(triton_server.grpc_url)
    yield client
    client.close()
