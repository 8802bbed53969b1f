"""A throw-away single-node Ray head with a job server, for tests, benchmarks and demos.

Why not `ray start` / `ray stop`: `ray stop` stops *every* Ray process on the machine (other
clusters and a test session's embedded Ray included). This starts `ray start --head --block` in
its own process group on free ports and a private temp dir, and stops exactly that group.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalHead:
    """``with LocalHead(num_cpus=2) as head: head.dashboard_url ...``"""

    num_cpus: int = 2
    start_timeout_s: float = 60.0
    env: dict = field(default_factory=dict)
    _proc: subprocess.Popen | None = None
    _temp_dir: str | None = None
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def child_env(self) -> dict:
        """Environment for CLI commands against this head: the interpreter's bin dir first on
        PATH (so a job's `python` is the one that has bmray's dependencies)."""
        bin_dir = os.path.dirname(sys.executable)
        env = dict(os.environ, **self.env)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env.pop("RAY_ADDRESS", None)
        # Ray 2.60 enables token auth on a head whenever ~/.ray/auth_token exists (any earlier
        # ray.init() writes it); clients then need the mode set as well as the token.
        if os.path.exists(os.path.expanduser("~/.ray/auth_token")):
            env.setdefault("RAY_AUTH_MODE", "token")
        return env

    def start(self) -> "LocalHead":
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self._temp_dir = tempfile.mkdtemp(prefix="bmray_head_")
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        # Every port free-picked: another Ray on this machine (an embedded one, a test session)
        # holds the defaults, and a dashboard agent that cannot bind means "no agent to submit
        # job" later.
        ports = [f"--{name}={_free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "ray-client-server-port", "node-manager-port",
            "object-manager-port")]
        cmd = [ray_cli, "start", "--head", "--block", f"--port={self.gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--temp-dir={self._temp_dir}", f"--num-cpus={self.num_cpus}",
               "--disable-usage-stats", *ports]
        self._proc = subprocess.Popen(cmd, env=self.child_env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_for_job_server()
        return self

    def _wait_for_job_server(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited with code {self._proc.returncode}")
            request = urllib.request.Request(f"{self.dashboard_url}/api/jobs/",
                                             headers=self._auth_header())
            try:
                with urllib.request.urlopen(request, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Ray head did not start within {self.start_timeout_s:.0f} s")

    @staticmethod
    def _auth_header() -> dict:
        token = os.path.expanduser("~/.ray/auth_token")
        if not os.path.exists(token):
            return {}
        with open(token) as fh:
            return {"Authorization": f"Bearer {fh.read().strip()}"}

    def stop(self) -> None:
        """SIGTERM the head's process group, SIGKILL what is left after a grace period."""
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(10.0)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:  # gcs_server and raylet may outlive the `ray start --block` parent
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc = None
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> "LocalHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
