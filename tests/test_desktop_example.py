"""examples/desktop_chat.py, the tkinter window on the public API, in a real X server (Xvfb) on the real SmolLM2."""

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


@needs_x
@pytest.mark.slow
def test_the_desktop_example_answers_streams_and_stops(smollm2_gguf, display, tmp_path):
    from PIL import ImageGrab

    gguf_bundle(constants.bundles_dir() / "smollm2-135m", smollm2_gguf)
    env = {**os.environ, "DISPLAY": display}
    cmd = [sys.executable, str(EXAMPLE), "smollm2-135m", "--system", "Answer in one sentence."]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        lines = _events(proc)
        assert _wait(lines, "ready")["model"] == "smollm2-135m"

        def xdo(*args: str) -> None:
            subprocess.run(["xdotool", *args], env=env, check=True, timeout=30)

        xdo("search", "--sync", "--name", "edgepack chat", "windowfocus", "--sync")
        xdo("type", "--delay", "20", "What is the capital of France?")
        xdo("key", "Return")
        answer = _wait(lines, "answer")
        assert answer["finish_reason"] == "stop" and "Paris" in answer["text"], answer
        time.sleep(0.5)  # the window repaints after the event is printed
        shot = ImageGrab.grab(xdisplay=display)
        shot.save(tmp_path / "desktop_chat.png")
        assert len(set(shot.convert("L").getdata())) > 10  # text on the window, not a blank screen

        xdo("type", "--delay", "20", "Write a long story about a lighthouse keeper and the sea.")
        xdo("key", "Return")
        time.sleep(1.0)  # let it start streaming
        xdo("key", "Escape")
        stopped = _wait(lines, "answer")
        assert stopped["finish_reason"] == "cancelled", stopped
    finally:
        proc.terminate()
        proc.wait(30)
