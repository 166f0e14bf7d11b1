"""examples/desktop_chat.py, the tkinter window on the public API, in a real X server (Xvfb) on the real SmolLM2:
run from the venv, and frozen by PyInstaller with edgepack's hooks and run outside it."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgepack import constants
from models import gguf_bundle

EXAMPLE = Path(__file__).parents[1] / "examples" / "desktop_chat.py"
needs_x = pytest.mark.skipif(
    shutil.which("Xvfb") is None or shutil.which("xdotool") is None,
    reason="Xvfb and xdotool are not installed (apt-get install xvfb xdotool), so the desktop example cannot run",
)


@pytest.fixture
def display():
    """A private Xvfb display, stopped after the test."""
    read, write = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "800x600x24", "-nolisten", "tcp"], pass_fds=(write,))
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()
    try:
        yield f":{number}"
    finally:
        xvfb.terminate()
        xvfb.wait(10)


def _events(proc: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(json.loads(line))

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait(lines: queue.Queue, event: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = lines.get(timeout=1)
        except queue.Empty:
            continue
        assert got["event"] != "error", got
        if got["event"] == event:
            return got
    raise AssertionError(f"no {event!r} event from the desktop example in {timeout} s")


def _ask(proc: subprocess.Popen, env: dict[str, str]) -> queue.Queue:
    """Wait for the window, type the question, check the answer; the event queue for more."""
    lines = _events(proc)
    assert _wait(lines, "ready")["model"] == "smollm2-135m"
    _xdo(env, "search", "--sync", "--name", "edgepack chat", "windowfocus", "--sync")
    _xdo(env, "type", "--delay", "20", "What is the capital of France?")
    _xdo(env, "key", "Return")
    answer = _wait(lines, "answer")
    assert answer["finish_reason"] == "stop" and "Paris" in answer["text"], answer
    return lines


def _xdo(env: dict[str, str], *args: str) -> None:
    subprocess.run(["xdotool", *args], env=env, check=True, timeout=30)


@needs_x
@pytest.mark.slow
def test_the_desktop_example_answers_streams_and_stops(smollm2_gguf, display, tmp_path):
    from PIL import ImageGrab

    gguf_bundle(constants.bundles_dir() / "smollm2-135m", smollm2_gguf)
    env = {**os.environ, "DISPLAY": display}
    cmd = [sys.executable, str(EXAMPLE), "smollm2-135m", "--system", "Answer in one sentence."]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        lines = _ask(proc, env)
        time.sleep(0.5)  # the window repaints after the event is printed
        shot = ImageGrab.grab(xdisplay=display)
        shot.save(tmp_path / "desktop_chat.png")
        assert len(set(shot.convert("L").getdata())) > 10  # text on the window, not a blank screen

        _xdo(env, "type", "--delay", "20", "Write a long story about a lighthouse keeper and the sea.")
        _xdo(env, "key", "Return")
        time.sleep(1.0)  # let it start streaming
        _xdo(env, "key", "Escape")
        stopped = _wait(lines, "answer")
        assert stopped["finish_reason"] == "cancelled", stopped
    finally:
        proc.terminate()
        proc.wait(30)


# What edgepack imports only to convert, evaluate or plot: a frozen app that runs bundles leaves it out.
CONVERT_ONLY = ("torch", "transformers", "accelerate", "safetensors", "sentencepiece", "ml_dtypes", "onnx", "onnx_ir",
                "gptqmodel", "optimum", "datasets", "pyarrow", "pandas", "matplotlib", "sacrebleu", "rouge_score", "scipy")  # fmt: skip


@needs_x
@pytest.mark.slow
def test_the_desktop_example_frozen_by_pyinstaller_answers_outside_the_venv(smollm2_gguf, display, tmp_path):
    pytest.importorskip("PyInstaller", reason="PyInstaller is in the test extra: pip install -e '.[all,test]'")
    repo = EXAMPLE.parents[1]
    # PyInstaller cannot follow an editable install's import hook: freeze from an installed wheel, as an app would
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)  # noqa: E731
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(repo))
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"), *map(str, (tmp_path / "wheel").glob("*.whl")))
    excludes = [a for m in CONVERT_ONLY for a in ("--exclude-module", m)]
    run(sys.executable, "-m", "PyInstaller", "--onedir", "--noconfirm", "--log-level", "WARN", "--name", "desktop_chat",
        "--distpath", str(tmp_path / "dist"), "--workpath", str(tmp_path / "build"), "--specpath", str(tmp_path),
        "--paths", str(tmp_path / "site"), *excludes, str(EXAMPLE))  # fmt: skip
    app = tmp_path / "dist" / "desktop_chat"
    assert (app / "desktop_chat").is_file() and not any(app.rglob("libtorch*"))
    gguf_bundle(tmp_path / "ephome" / "bundles" / "smollm2-135m", smollm2_gguf)
    home = tmp_path / "home"
    home.mkdir()
    env = {"DISPLAY": display, "HOME": str(home), "PATH": "/usr/bin:/bin"}  # no venv, no PYTHONPATH
    proc = subprocess.Popen([str(app / "desktop_chat"), "smollm2-135m", "--system", "Answer in one sentence."],
                            env={**env, "EDGEPACK_HOME": str(tmp_path / "ephome")}, cwd=home, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _ask(proc, env)
    finally:
        proc.terminate()
        proc.wait(30)
