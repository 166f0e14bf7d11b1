"""A real ``edgepack serve`` process for the server tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(model, tmp_path, *extra: str):
    """Run ``edgepack serve`` until /health answers; yields (base url, process); killed on exit."""
    port = _free_port()
    log = tmp_path / f"serve-{port}.log"
    env = {**os.environ, "EDGEPACK_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "edgepack", "serve", str(model), "--port", str(port), "--threads", "1", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server not healthy after 120 s:\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="session")
def edgepack_serve():
    """``with edgepack_serve(model, tmp_path, *flags) as (base_url, process):`` a real server on a free loopback port."""
    return _server
