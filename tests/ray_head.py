"""A real, private Ray head for Ray Jobs tests: `ray start --head --block` from this venv on
127.0.0.1 with its own ports, temp dir and auth token, stopped by killing exactly its own
process tree (plain `ray stop` would stop every Ray on the machine, other people's too)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Head:
    address: str          # dashboard URL, what `raystages submit --address` takes
    gcs: str
    temp_dir: Path
    token_path: Path
    proc: subprocess.Popen

    def env(self, **extra) -> dict:
        """Environment of a client that holds this head's token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), **extra)
        return env


def start_head(num_cpus: int = 2, timeout: float = 180) -> Head:
    tmp = Path(tempfile.mkdtemp(prefix="rsj-", dir="/tmp"))  # short: Ray's socket paths
    token = tmp / "token"
    token.write_text(secrets.token_hex(16))
    (gcs, dash, agent_http, agent_grpc, metrics, renv_agent, client, node_mgr, obj_mgr) = free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The job's entrypoint runs with the head's PATH: this venv's python and raystages.
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv_agent}",
           f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
           f"--temp-dir={tmp}"]
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", tmp, token, proc)
    deadline = time.time() + timeout
    while True:
        try:
            req = urllib.request.Request(f"{head.address}/api/version",
                                         headers={"Authorization": f"Bearer {token.read_text()}"})
            urllib.request.urlopen(req, timeout=5).read()
            return head
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.time() > deadline:
                stop_head(head)
                raise RuntimeError(f"ray head did not start: {(tmp / 'head.log').read_text()[-3000:]}")
            time.sleep(1)


def stop_head(head: Head) -> None:
    """Kill the head's own process tree: its process group (GCS, raylet, dashboard) and the
    workers the raylet started (each in its own process group)."""
    import psutil

    try:
        tree = psutil.Process(head.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(head.proc.pid, sig)
        except ProcessLookupError:
            pass
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=wait)
        if not alive and head.proc.poll() is not None:
            break
    head.proc.wait(timeout=10)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
