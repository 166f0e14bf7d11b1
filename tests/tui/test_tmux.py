"""The real ``edgepack chat`` command in a real terminal (tmux), on the real SmolLM2 GGUF, driven with send-keys and capture-pane."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tmux_driver import Tmux

pytestmark = pytest.mark.slow
needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux) so the terminal test cannot run")


@needs_tmux
def test_edgepack_chat_in_a_terminal(smollm2_gguf, tmp_path):
    edgepack = Path(sys.executable).with_name("edgepack")
    rc = tmp_path / "rc"
    cmd = f"{edgepack} chat {smollm2_gguf} --n-ctx 512 --temp 0 --max-tokens 16 --system 'Answer in one sentence.'; echo $? > {rc}"
    tmux = Tmux(tmp_path / "tmux.sock")
    tmux.start(cmd)
    try:
        tmux.wait_for(lambda s: "ready" in s and "llama.cpp" in s, "the model to load", timeout=60)
        screen = tmux.ask()
        assert "What is the capital of France?" in screen and "system prompt" in screen
        assert "Answer in one sentence." in screen and "tokens," in screen  # the answer's box and its stats
        tmux.keys("Up")  # history brings the question back
        tmux.wait_for(lambda s: s.count("What is the capital of France?") == 2, "the recalled input")
        tmux.keys("C-u")
        tmux.wait_for(lambda s: s.count("What is the capital of France?") == 1, "the input to clear", timeout=30)
        record = tmux.save(tmp_path / "chat")
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["messages"][1]["content"].strip() and record["model"]["backend"] == "llama.cpp"
        tmux.keys("C-q")
        assert tmux.exited() and rc.read_text().strip() == "0"
    finally:
        tmux.kill()


@needs_tmux
def test_convert_with_chat_opens_the_chat_on_the_new_bundle_in_a_terminal(smollm2, tmp_path):
    edgepack = Path(sys.executable).with_name("edgepack")
    rc, out = tmp_path / "rc", tmp_path / "bundle"
    cmd = f"{edgepack} convert {smollm2} --to gguf:q8_0 --no-report -o {out} --chat; echo $? > {rc}"
    tmux = Tmux(tmp_path / "tmux.sock")
    tmux.start(cmd)
    try:
        tmux.wait_for(lambda s: "ready" in s and "gguf-q8_0" in s, "the converted bundle to open in the chat", timeout=300)
        screen = tmux.ask()
        assert "What is the capital of France?" in screen and "tokens," in screen  # the question, and the answer's stats
        tmux.keys("C-q")
        assert tmux.exited() and rc.read_text().strip() == "0"
        assert (out / "edgepack.json").is_file()
    finally:
        tmux.kill()


def test_convert_with_chat_without_a_terminal_prints_the_bundle_and_skips_the_chat(tmp_path):
    """What CI's run of the README's main command sees: stdin is not a terminal, so no chat, exit 0, the bundle path on stdout."""
    from models import tiny_model

    src = tiny_model("llama", tmp_path / "tiny")
    edgepack = Path(sys.executable).with_name("edgepack")
    out = subprocess.run([str(edgepack), "convert", str(src), "--to", "gguf:f16", "--no-report", "-o", str(tmp_path / "b"), "--chat"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "b") and (tmp_path / "b" / "edgepack.json").is_file()


@needs_tmux
def test_chat_opens_a_bundle_by_its_name(smollm2_gguf, tmp_path):
    """What a user types after the README's main command: the name ``convert`` gave the bundle."""
    from models import gguf_bundle

    from edgepack import constants

    gguf_bundle(constants.bundles_dir() / "smollm2-135m", smollm2_gguf)
    edgepack = Path(sys.executable).with_name("edgepack")
    tmux = Tmux(tmp_path / "tmux.sock")
    tmux.start(f"{edgepack} chat smollm2-135m --n-ctx 512 --temp 0 --max-tokens 16 --system 'Answer in one sentence.'")
    try:
        tmux.wait_for(lambda s: "ready" in s and "gguf-q4_1" in s, "the named bundle to load", timeout=60)
        screen = tmux.ask()
        assert "Paris" in screen, screen
    finally:
        tmux.kill()


@needs_tmux
def test_chat_passes_batch_invariant_to_the_load_and_refuses_it_on_one_line(smollm2_gguf, tmp_path):
    """The chat only hands the flag to ``load``: the saved transcript's model says it; a quantized KV cache is refused on one line."""
    edgepack = Path(sys.executable).with_name("edgepack")
    tmux = Tmux(tmp_path / "tmux.sock")
    tmux.start(f"{edgepack} chat {smollm2_gguf} --batch-invariant --n-ctx 512 --temp 0 --max-tokens 8")
    try:
        tmux.wait_for(lambda s: "ready" in s and "llama.cpp" in s, "the model to load", timeout=60)
        tmux.ask()
        model = tmux.save(tmp_path / "chat")["model"]
        assert model["batch_invariant"] is True and model["kv_type"] == "f16", model
    finally:
        tmux.kill()

    rc = tmp_path / "rc"
    tmux = Tmux(tmp_path / "tmux2.sock")
    tmux.start(f"{edgepack} chat {smollm2_gguf} --batch-invariant --kv-type q8_0; echo $? > {rc}; sleep 60", width=400)
    try:
        screen = tmux.wait_for(lambda s: rc.is_file() and rc.read_text().strip(), "the chat to refuse", timeout=60)
        lines = [line for line in tmux.screen().splitlines() if line.strip()]
        assert rc.read_text().strip() == "2", screen
        assert len(lines) == 1 and lines[0].startswith("error: batch_invariant needs an f16 KV cache, not q8_0"), lines
    finally:
        tmux.kill()


def test_chat_refuses_to_run_without_a_terminal(smollm2_gguf):
    edgepack = Path(sys.executable).with_name("edgepack")
    out = subprocess.run([str(edgepack), "chat", str(smollm2_gguf)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and "needs an interactive terminal" in out.stderr and "Traceback" not in out.stderr
