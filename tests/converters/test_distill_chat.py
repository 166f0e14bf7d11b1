"""Issue 6's last clause end to end: a pruned and healed SmolLM2 quantizes to Q4_K_M through the GGUF path and answers in the chat.

The healing here is a few steps (the quality bar is benchmarks/prune_distill.py's); what is
checked is that the student goes through the same converter and runtime as any model, in the
real ``edgepack chat`` in a real terminal (tmux, as tests/tui/test_tmux.py drives it).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import gguf
import pytest
from tmux_driver import Tmux

from edgepack.bundle import Bundle
from edgepack.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux) so the terminal test cannot run"),
]


def test_healed_student_quantizes_to_q4_k_m_and_answers_in_the_chat(smollm2, tmp_path):
    out = tmp_path / "bundle"
    main(["convert", str(smollm2), "--prune-layers", "6", "--distill", "--steps", "4", "--to", "gguf:Q4_K_M",
          "--calibration-tokens", "2048", "-o", str(out), "--no-report"])  # fmt: skip
    bundle = Bundle.open(out)
    stages = [s["stage"] for s in bundle.data["steps"]]
    assert stages[:2] == ["prune", "distill"] and stages[-1] == "quantize"
    (variant,) = bundle.variants
    assert variant.id == "gguf-q4_k_m"
    reader = gguf.GGUFReader(bundle.root / variant.path)
    assert reader.get_field("llama.block_count").contents() == 24  # the student, not the 30-block reference
    assert reader.get_field("general.file_type").contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M

    edgepack = Path(sys.executable).with_name("edgepack")
    tmux = Tmux(tmp_path / "tmux.sock")
    tmux.start(f"{edgepack} chat {out} --n-ctx 512 --temp 0 --max-tokens 24 --threads 1")
    try:
        tmux.wait_for(lambda s: "ready" in s and "llama.cpp" in s, "the student to load", timeout=60)
        tmux.ask()
        record = tmux.save(tmp_path / "chat")
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["messages"][1]["content"].strip()
        assert record["model"]["backend"] == "llama.cpp" and "gguf-q4_k_m" in record["model"]["path"]
    finally:
        tmux.kill()
