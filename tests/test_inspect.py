"""inspect on a checkpoint, a GGUF file, a bundle, and on things that are none of these."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgepack.errors import InvalidModelError, SourceNotFoundError
from edgepack.inspect import inspect_path


@pytest.mark.slow
def test_checkpoint(smollm2):
    info = inspect_path(smollm2)
    assert info["kind"] == "checkpoint"
    assert info["architecture"] == "llama"
    assert 134_000_000 < info["parameters"] < 136_000_000
    assert info["dtypes"] == {"F32": info["tensors"]}
    assert info["context_length"] == 8192
    assert info["tokenizer"] == "BPE" and info["chat_template"] is True


@pytest.mark.slow
def test_gguf(smollm2_gguf):
    info = inspect_path(smollm2_gguf)
    assert info["kind"] == "gguf" and info["architecture"] == "llama"
    assert info["file_type"] == "Q4_1"
    assert "Q4_1" in info["dtypes"]
    assert info["tokenizer"] == "gpt2" and info["chat_template"] is True
    assert 134_000_000 < info["parameters"] < 136_000_000


@pytest.mark.slow
def test_cli_json(smollm2_gguf):
    r = subprocess.run([sys.executable, "-m", "edgepack", "inspect", str(smollm2_gguf), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tensors"] > 200


def test_bad_paths(tmp_path):
    with pytest.raises(SourceNotFoundError):
        inspect_path(tmp_path / "missing")
    with pytest.raises(InvalidModelError, match="not a checkpoint folder"):
        inspect_path(tmp_path)
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(InvalidModelError, match="not a readable GGUF"):
        inspect_path(bad)
