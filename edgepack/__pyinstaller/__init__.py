"""PyInstaller hooks for apps that embed edgepack: ``pyinstaller app.py`` finds them through the ``pyinstaller40``
entry point, so a frozen app carries edgepack's backends, llama.cpp's shared libraries and onnxruntime-genai's."""

from __future__ import annotations

from pathlib import Path


def get_hook_dirs() -> list[str]:
    return [str(Path(__file__).parent)]
