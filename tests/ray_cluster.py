"""A real Ray cluster on loopback for the executor tests and benchmarks: ``ray start --head`` and more nodes with
``ray start --address``, each in its own temp dir, stopped by killing exactly the processes under those dirs (``ray
stop`` would stop every Ray process on the machine).

Loopback only: Ray rewrites ``--node-ip-address=127.0.0.1`` to the machine's public address, and binds its servers to
127.0.0.1 only when the node address stays 127.0.0.1. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray keep the
loopback address for the head and for the driver (the code path Ray takes on macOS); the other nodes are started
through ``ray start`` with its localhost rewrite turned off, since that switch also refuses to add a node.

Independent of the user's ``~/.ray``: Ray turns token authentication on for a head started where
``~/.ray/auth_token`` exists (any ``ray.init()`` writes one) but not for the nodes and drivers that join it, so the
second node would be refused. Every node of this cluster, and its drivers (``env``), use token authentication with the
cluster's own token, a file in the head's temp dir (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the driver and the head keep 127.0.0.1 (see above)
_NODE = "import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
_COMMON = ["--object-store-memory=80000000", "--disable-usage-stats"]


class RayCluster:
    """Nodes of one cluster: ``address`` for RAY_ADDRESS, ``env`` for its drivers, ``add_node()``, ``kill(node)``, ``stop()``.

    ``node_env``: variables the head's processes get on top of this process's (its own EDGEPACK_HOME, say).
    """

    def __init__(self, cpus: int = 2, node_env: dict[str, str] | None = None) -> None:
        self.dirs: list[Path] = []
        self.cpus = cpus
        head = self._dir()
        token = head / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self.env = {**LOOPBACK_ENV, **self.auth}  # what a driver of this cluster runs with
        self._start(["-m", "ray.scripts.scripts", "start", "--head", "--port=0", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                     f"--temp-dir={head}"], {**self.env, **(node_env or {})})  # fmt: skip
        self.address = (head / "ray_current_cluster").read_text().strip()

    def add_node(self, wrap: list[str] = (), gpus: int = 0, node_env: dict[str, str] | None = None) -> Path:
        """Start one more node (its command run through ``wrap``, e.g. ``unshare ...``); its temp dir names it.

        ``gpus``: GPUs the node declares (Ray schedules by what a node declares, so a CPU machine can stand for a GPU node).
        ``node_env``: variables its processes get on top of this process's.
        """
        node = self._dir()
        args = ["-c", _NODE, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--temp-dir={node}", *([f"--num-gpus={gpus}"] if gpus else [])]
        self._start(args, {**{k: "1" for k in LOOPBACK_ENV}, **self.auth, **(node_env or {})}, wrap)
        return node

    @contextmanager
    def driver(self, monkeypatch) -> Iterator[RayCluster]:
        """This process as a driver of the cluster: RAY_ADDRESS set, Ray keeping the loopback address and using the
        cluster's token (see above); undone at the end."""
        for k, v in self.env.items():
            monkeypatch.setenv(k, v)
        if constants := sys.modules.get("ray._private.ray_constants"):  # imported before: what the variable would have set
            monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", False)
        monkeypatch.setenv("RAY_ADDRESS", self.address)
        _reread_auth()
        yield self
        monkeypatch.undo()
        _reread_auth()

    def processes(self, node: Path) -> list[psutil.Process]:
        """The node's processes (raylet, agents, workers): those naming its temp dir, and their children."""
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != os.getpid() and any(str(node) in a for a in p.info["cmdline"] or ()):
                found[p.pid] = p
                for c in _children(p):
                    found[c.pid] = c
        return list(found.values())

    def raylet(self, node: Path) -> psutil.Process:
        return next(p for p in self.processes(node) if p.name() == "raylet")

    def kill(self, node: Path) -> None:
        """kill -9 of every process of ``node``: the node is lost as if its machine died."""
        procs = self.processes(node)
        for p in procs:
            _signal(p)
        psutil.wait_procs(procs, timeout=10)

    def stop(self) -> None:
        for node in reversed(self.dirs):
            self.kill(node)
            shutil.rmtree(node, ignore_errors=True)

    def _dir(self) -> Path:
        d = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's unix sockets live below it
        self.dirs.append(d)
        return d

    def _start(self, args: list[str], env: dict[str, str], wrap: list[str] = ()) -> None:
        cmd = [*wrap, sys.executable, *args, *_COMMON, f"--num-cpus={self.cpus}"]
        r = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {r.stderr[-2000:]}")
        time.sleep(0.5)


def _reread_auth() -> None:
    """Ray reads RAY_AUTH_MODE when imported and keeps the first token it loads for the life of the process: read both
    again (as Ray does when it turns tokens on), or a driver of a second cluster in this process sends the first one's
    token and is refused."""
    if raylet := sys.modules.get("ray._raylet"):
        raylet.Config.initialize("")
        raylet.AuthenticationTokenLoader.instance().reset_cache()


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal(p: psutil.Process) -> None:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
