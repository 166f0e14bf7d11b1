"""A tmux driver for the tests that run edgepack's chat in a real terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path


class Tmux:
    """One detached tmux session on a private socket, so the server inherits this test's environment."""

    def __init__(self, socket: Path, name: str = "chat") -> None:
        self.base = ["tmux", "-S", str(socket), "-f", "/dev/null"]  # no user config
        self.name = name

    def __call__(self, *args: str) -> str:
        # COLUMNS/LINES, when some tool exported them, would override the pane's real size
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=True, env=env).stdout

    def start(self, command: str, width: int = 110, height: int = 36) -> None:
        self("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), command)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", self.name, *keys)

    def alive(self) -> bool:
        return subprocess.run([*self.base, "has-session", "-t", self.name], capture_output=True).returncode == 0

    def wait_for(self, condition, what: str, timeout: float = 180.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.screen()
            if condition(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{self.screen()}")

    def ask(self, question: str = "What is the capital of France?") -> str:
        """Type a question into the chat and wait for the answer's stats beside ``ready``; returns the screen."""
        self.keys(question, "Enter")
        return self.wait_for(lambda s: re.search(r"\d\.\d tok/s +ready", s), "the answer")

    def save(self, stem: Path) -> dict:
        """The chat's ``/save STEM``; returns the transcript it wrote to STEM.json."""
        self.keys(f"/save {stem}", "Enter")
        self.wait_for(lambda s: "saved" in s, "the transcript to be saved", timeout=30)
        return json.loads(stem.with_suffix(".json").read_text())

    def exited(self, timeout: float = 30.0) -> bool:
        """Whether the session's command ended within ``timeout``."""
        end = time.monotonic() + timeout
        while self.alive() and time.monotonic() < end:
            time.sleep(0.2)
        return not self.alive()

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)
