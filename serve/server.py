"""Start and stop Triton's server binary on a model repository (DESIGN.md §9).

The binary is `tritonserver` on PATH (a Triton install, its backends beside it), else the one
that `nvidia-pytriton` bundles (Python backend only). For the bundled one this module builds
the backend directory Triton needs, `python/{libtriton_python.so, triton_python_backend_stub}`
with the stub for this Python, in a cache folder, and puts the bundle's libraries and this
Python's libpython on LD_LIBRARY_PATH and this Python first on PATH (the stub runs the first
`python3` there, so the models see this environment's packages).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dff.errors import DffError

if TYPE_CHECKING:
    from typing_extensions import Self

INSTALL = ("pip install 'dff-trt[serve]' && pip install --no-deps nvidia-pytriton==0.7.0 "
           "(its server binary; it requires numpy<2, which the binary does not need)")
_ERROR_LINE = re.compile(r"^E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] (.*)$")
_NO_GPU_NOISE = ("CudaDriverHelper has not been initialized", "CUDA driver version is insufficient")
LOADER_ERRORS = ("error while loading shared libraries", "version `GLIBC", "cannot execute")


class ServerError(DffError):
    """Triton did not start, or not on this repository: the message has the log's last lines."""


class ServerUnavailable(ServerError):
    """No Triton server binary that can run here (missing, or its libraries cannot load)."""


@dataclass
class Binary:
    """A server binary and how to run it: its backend directory (None: the install's own)
    and the folders its libraries need on LD_LIBRARY_PATH."""

    path: Path
    backend_dir: Path | None
    library_path: list[Path]


def _pytriton_root() -> Path | None:
    """pytriton/tritonserver of an installed nvidia-pytriton, without importing pytriton
    (its __init__ needs packages the binary does not)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def shared_libpython() -> Path:
    """The folder of this Python's shared libpython, which the Python backend's stub links."""
    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir or not name \
            or not (Path(libdir) / name).exists():
        raise ServerUnavailable(
            f"{sys.executable} has no shared libpython (Py_ENABLE_SHARED is off), which "
            "Triton's Python backend stub links; use a Python built with --enable-shared "
            "(pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install 3.X)")
    return Path(libdir)


def cache_dir() -> Path:
    """Where built backend directories live: $DFF_SERVE_CACHE, else ~/.cache/dff-trt."""
    if os.environ.get("DFF_SERVE_CACHE"):
        return Path(os.environ["DFF_SERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dff-trt"


def build_backend_dir(bundle: Path, cache: Path | None = None) -> Path:
    """A backend directory for the bundled binary: the bundle's python backend with the stub
    for this Python, built once per bundle and Python version (atomically, by rename)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundle / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (bundle / "python_backend_stubs").glob("*"))
        raise ServerUnavailable(f"{bundle.parent}: no Python backend stub for Python {version} "
                                f"(it has {', '.join(have) or 'none'}); run with one of those")
    source = bundle / "backends" / "python"
    stat = stub.stat()
    key = hashlib.sha256(f"{bundle}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = (cache or cache_dir()) / f"triton-backends-py{version}-{key}"
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        shutil.copytree(source, tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "python" / stub.name)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "python" / "triton_python_backend_stub").is_file():
            raise  # else another process built it first
    return target


def find_server() -> Binary:
    """`tritonserver` on PATH, else nvidia-pytriton's bundled one; ServerUnavailable names the
    install command when there is neither."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Binary(Path(on_path), None, [])
    bundle = _pytriton_root()
    if bundle is None:
        raise ServerUnavailable(f"no tritonserver on PATH and no nvidia-pytriton installed; "
                                f"{INSTALL}")
    libs = [bundle.parents[1] / "nvidia_pytriton.libs", shared_libpython()]
    return Binary(bundle / "bin" / "tritonserver", build_backend_dir(bundle), libs)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path | None, lines: int = 4) -> str:
    """What a server log says went wrong, in one line: its last error lines (Triton's
    `E` lines, less the CUDA ones a machine without a GPU always logs), first line of each,
    then its last line; without errors, its last `lines` lines."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace") if path else ""
    except OSError:
        text = ""
    if not text:
        return "(no log)"
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    errors = []
    for line in kept:
        match = _ERROR_LINE.match(line)
        if match and not any(n in line for n in _NO_GPU_NOISE):
            message = match.group(1).strip('"').split("\\n")[0].strip()
            if message not in errors:
                errors.append(message)
    if not errors:
        return " | ".join(kept[-lines:]) or "(empty log)"
    return " | ".join([*errors[-lines + 1:], *kept[-1:]])


def _exited(pid: int) -> bool:
    """Whether child `pid` has exited, without reaping it (WNOWAIT)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class TritonServer:
    """One tritonserver process on `repository`: `start()` waits until /v2/health/ready says
    so (or raises ServerError with the log's tail), `stop()` sends SIGTERM, then SIGKILL after
    `grace` seconds. A context manager. Ports default to free ones."""

    def __init__(self, repository: str | os.PathLike[str], *, host: str = "127.0.0.1",
                 http_port: int | None = None, grpc_port: int | None = None,
                 timeout: float = 120.0, grace: float = 15.0, log_path: str | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.repository = Path(repository).resolve()
        self.host, self.timeout, self.grace = host, timeout, grace
        self._fixed_ports = (http_port, grpc_port)
        self._pick_ports()
        self.extra_args = tuple(extra_args)
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None  # made at launch when None
        self.process: subprocess.Popen | None = None
        self.started_s: float | None = None  # seconds from launch to ready

    def _pick_ports(self) -> None:
        self.http_port = self._fixed_ports[0] or free_port()
        self.grpc_port = self._fixed_ports[1] or free_port()
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        """Whether the server process is running (it is not reaped here)."""
        return self.process is not None and self.process.returncode is None \
            and not _exited(self.process.pid)

    @property
    def http_url(self) -> str:
        return f"{self._probe_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._probe_host}:{self.grpc_port}"

    @property
    def _probe_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self, binary: Binary) -> list[str]:
        args = [str(binary.path), f"--model-repository={self.repository}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false", "--exit-timeout-secs=5"]
        if binary.backend_dir is not None:
            args.append(f"--backend-directory={binary.backend_dir}")
        return args + list(self.extra_args)

    def start(self, tries: int = 3) -> None:
        """Launch and wait until ready; a free port taken by another process in between is
        picked again (`tries` times in all)."""
        for attempt in range(tries):
            try:
                return self._start()
            except ServerError as e:
                ours = [port for port, fixed in zip((self.http_port, self.grpc_port),
                                                    self._fixed_ports) if not fixed]
                if attempt == tries - 1 or not any(f":{port}' already in use" in str(e)
                                                   for port in ours):
                    raise
                self._pick_ports()

    def _start(self) -> None:
        if not self.repository.is_dir():
            raise ServerError(f"{self.repository}: no such model repository; write one with "
                              "`dff-serve repo ENGINE_DIR REPO_DIR`")
        binary = find_server()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if binary.library_path:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                [*map(str, binary.library_path), env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        launched = time.monotonic()
        with open(self.log_path, "wb") as log:
            try:
                self.process = subprocess.Popen(self.command(binary), stdout=log,
                                                stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=env,
                                                start_new_session=True)
            except OSError as e:
                raise ServerUnavailable(f"{binary.path}: cannot run it ({e})") from None
        try:
            self._wait_ready(launched)
        except BaseException:
            self.stop(keep_log=True)
            raise
        self.started_s = time.monotonic() - launched

    def _wait_ready(self, launched: float) -> None:
        assert self.process is not None
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            if _exited(self.process.pid):
                code = self.stop(keep_log=True)
                tail = log_tail(self.log_path)
                kind = ServerUnavailable if any(e in tail for e in LOADER_ERRORS) else ServerError
                raise kind(f"tritonserver exited with code {code} before it was ready: {tail} "
                           f"(log: {self.log_path})")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() - launched > self.timeout:
                raise ServerError(f"tritonserver (pid {self.pid}) was not ready after "
                                  f"{self.timeout:.0f} s: {log_tail(self.log_path)} "
                                  f"(log: {self.log_path})")
            time.sleep(0.1)

    def stop(self, keep_log: bool = False) -> int | None:
        """SIGTERM, then SIGKILL to the server's process group (its stubs) after `grace` s;
        returns the exit code (None if it never started). Idempotent."""
        proc = self.process
        if proc is None:
            return None
        if proc.returncode is None:  # not reaped yet, so its pid (and group) are still its own
            if not _exited(proc.pid):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            while not _exited(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            try:  # the server's own session: what is left of it, its stubs included
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        code = proc.wait()
        if self._own_log and not keep_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
        return code

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
