from __future__ import annotations

import json
import os
import sys

import pytest

from edgepack.errors import UsageError
from edgepack.tui import transcript
from edgepack.tui.transcript import Conversation

MODEL = {"path": "/m/model.gguf", "backend": "llama.cpp", "device": "cpu", "n_ctx": 512, "name": "smollm2", "variant": "q4_k_m"}
SAMPLING = {"max_tokens": 64, "temperature": 0.0, "seed": None, "stop": []}
COMPLETION = {
    "text": "Paris.",
    "prompt_tokens": 20,
    "completion_tokens": 3,
    "finish_reason": "cancelled",
    "ttft_s": 0.1,
    "prefill_tokens_per_s": 200.0,
    "decode_tokens_per_s": 42.5,
    "wall_s": 0.2,
    "truncated_tokens": 0,
}


def conversation() -> Conversation:
    c = Conversation(system="Be brief.")
    c.ask("Capital of France? ünïcode ✓")
    c.answer("Paris.", {"variant": "q4_k_m", "completion": COMPLETION})
    return c


def test_messages_put_the_system_prompt_first_and_clear_keeps_it():
    c = conversation()
    assert c.messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France? ünïcode ✓"},
        {"role": "assistant", "content": "Paris."},
    ]
    c.clear()
    assert c.messages() == [{"role": "system", "content": "Be brief."}]
    c.system = ""
    assert c.messages() == []


def test_retract_gives_back_only_an_unanswered_question():
    c = conversation()
    assert c.retract() == "" and len(c.turns) == 2
    c.ask("again?")
    assert c.retract() == "again?" and len(c.turns) == 2


@pytest.mark.parametrize("arg", ["chat", "chat.md", "chat.json"])
def test_save_writes_the_pair_whatever_suffix_is_given(tmp_path, arg):
    md, js = transcript.save(conversation(), str(tmp_path / arg), MODEL, SAMPLING)
    assert (md, js) == (tmp_path / "chat.md", tmp_path / "chat.json")
    record = json.loads(js.read_text(encoding="utf-8"))
    assert record["schema"] == 1 and record["model"] == MODEL and record["sampling"] == SAMPLING
    assert record["messages"][0] == {"role": "user", "content": "Capital of France? ünïcode ✓", "meta": {}}
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# Chat with smollm2\n")
    assert "## System\n\nBe brief." in text and "## smollm2 (q4_k_m)\n\nParis." in text
    assert "*3 tokens, 42.5 tokens/s, stopped*" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "chat.md"]  # no partial files left


def test_save_into_a_folder_or_here_uses_a_timestamped_name(tmp_path, monkeypatch):
    md, js = transcript.save(conversation(), str(tmp_path), MODEL, SAMPLING)
    assert md.parent == tmp_path and md.name.startswith("edgepack-chat-") and js.exists()
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    md, js = transcript.save(conversation(), "  ", MODEL, SAMPLING)
    assert md.parent == tmp_path / "here" and md.exists() and js.exists()


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root can write anywhere")
def test_save_to_a_read_only_folder_raises_usage_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="cannot write the transcript"):
            transcript.save(conversation(), str(ro / "chat"), MODEL, SAMPLING)
    finally:
        ro.chmod(0o700)


def test_save_under_a_file_raises_usage_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="give another path"):
        transcript.save(conversation(), str(tmp_path / "f" / "chat"), MODEL, SAMPLING)
    assert (tmp_path / "f").read_text() == "x"


def test_transcript_does_not_import_textual():
    import subprocess

    code = "import sys, edgepack.tui.transcript, edgepack.tui.commands; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
