"""Scale-out: nginx in front of several Triton servers (one per GPU), each stream kept on one
server (DESIGN.md §9).

Triton keeps a sequence's slot, and the `dff` model its key frame, on the server that saw its
START; it never forwards a request to another server. So the proxy must send every frame of a
stream to one server: the client names the stream in the gRPC metadata header `dff-stream`
(its sequence id, on every request) and nginx hashes that header consistently (ketama) onto
the servers, so adding or removing a server moves only the streams that hashed to it.

    python -m dff.serve.scaleout 10.0.0.1:8001 10.0.0.2:8001 --listen-port 8001 > nginx.conf
    nginx -p "$PWD" -c nginx.conf   # pid, logs and temporary files under the prefix
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from dff.runtime.remote import HEADER as STREAM_HEADER  # the key dff-run --server sets

from dff.errors import DffError

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})$")
_SIZE = re.compile(r"^\d+[kKmMgG]?$")


class ScaleoutError(DffError):
    """A server list or port that cannot go into the proxy's configuration."""


def _check_port(port: int, what: str) -> None:
    if not 1 <= int(port) <= 65535:
        raise ScaleoutError(f"{what} {port}: a TCP port is 1..65535")


def check_server(address: str) -> str:
    """`address` if it is HOST:PORT (a name, IPv4, or [IPv6]) with a valid port."""
    match = _ADDRESS.match(address.strip())
    if not match:
        raise ScaleoutError(f"server {address!r}: expected HOST:PORT of a Triton gRPC endpoint "
                            "(e.g. 10.0.0.1:8001 or [::1]:8001)")
    _check_port(int(match.group(2)), f"server {address}: port")
    return address.strip()


def header_variable(header: str = STREAM_HEADER) -> str:
    """nginx's variable for a request header: `$http_` + the name, lower case, - as _."""
    if not re.fullmatch(r"[A-Za-z0-9-]+", header):
        raise ScaleoutError(f"header {header!r}: use letters, digits and '-' only (nginx drops "
                            "headers with '_' by default)")
    return "$http_" + header.lower().replace("-", "_")


def nginx_config(servers: Sequence[str], listen_port: int, *, listen_host: str = "0.0.0.0",
                 header: str = STREAM_HEADER, max_body: str = "64m", keepalive: int = 32,
                 read_timeout_s: int = 300) -> str:
    """A complete nginx.conf (nginx ≥ 1.13.10, built with the http_v2 and grpc modules, as
    Debian's is) that listens for gRPC on `listen_host:listen_port` and passes each request
    to the Triton gRPC endpoint of `servers` (HOST:PORT each) that the consistent hash of its
    `header` picks. Paths are relative to nginx's prefix (`nginx -p DIR -c nginx.conf`).

    `max_body`: the largest request (nginx's default, 1m, is below one 600x1000 RGB frame);
    `keepalive`: idle connections kept open to each worker's upstreams, so requests reuse
    them; `read_timeout_s`: how long one answer may take."""
    if not servers:
        raise ScaleoutError("no servers: give at least one Triton gRPC endpoint HOST:PORT")
    checked = [check_server(s) for s in servers]
    duplicated = sorted({s for s in checked if checked.count(s) > 1})
    if duplicated:
        raise ScaleoutError(f"server {duplicated[0]} is listed twice; list each server once "
                            "(the hash already spreads streams evenly)")
    _check_port(listen_port, "listen port")
    if not _SIZE.match(max_body):
        raise ScaleoutError(f"max_body {max_body!r}: an nginx size, such as 64m")
    variable = header_variable(header)
    upstream = "\n".join(f"        server {s};" for s in checked)
    temp = "\n".join(f"    {kind}_temp_path {kind}_temp;"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    host = f"[{listen_host}]" if ":" in listen_host and not listen_host.startswith("[") \
        else listen_host
    return f"""\
# nginx in front of {len(checked)} Triton server(s), written by dff.serve.scaleout.
# Every frame of a stream carries the gRPC metadata `{header}: <sequence id>`; the
# consistent hash of that header picks the server, so a stream stays on the server that
# holds its sequence and key frame. Requests without it (health, metadata) hash to one server.
# If a server fails, its streams move to another, which answers their next frame with
# "must specify the START flag"; the client then starts the stream again from a key frame.
worker_processes auto;
pid nginx.pid;
error_log error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
{temp}

    upstream triton {{
        hash {variable} consistent;
{upstream}
        keepalive {int(keepalive)};
    }}

    server {{
        listen {host}:{int(listen_port)} http2;
        client_max_body_size {max_body};
        grpc_read_timeout {int(read_timeout_s)}s;
        grpc_send_timeout {int(read_timeout_s)}s;

        location / {{
            grpc_pass grpc://triton;
        }}
    }}
}}
"""


if __name__ == "__main__":
    from dff.commands.scaleout import main

    sys.exit(main())
