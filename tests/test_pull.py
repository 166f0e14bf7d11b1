"""Model sources: recipes with the PyPI fallback, local folders, GGUF files, hub ids offline, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgepack.converters.pull import check_safetensors, pull
from edgepack.errors import InvalidModelError, OfflineError, SourceNotFoundError


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_recipe_pulls_offline_through_pypi_fallback(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert (smollm2 / "model.safetensors").stat().st_size > 500_000_000  # float32, not the Q4_1 bytes
    tok = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert (smollm2 / "chat_template.jinja").is_file() or tok.get("chat_template")


@pytest.mark.slow
def test_local_folder_records_provenance(smollm2):
    art = pull(str(smollm2))
    assert art.meta["origin"] == f"local:{smollm2}"
    names = {f["path"] for f in art.meta["files"]}
    assert "model.safetensors" in names and "config.json" in names
    assert all(len(f["sha256"]) == 64 for f in art.meta["files"])


@pytest.mark.slow
def test_gguf_source_is_dequantized_and_cached(smollm2_gguf, tmp_path, logged):
    art = pull(str(smollm2_gguf))
    assert art.meta["origin"].startswith("gguf:")
    assert art.meta["revision"].startswith("sha256:")
    logged.clear()
    again = pull(str(smollm2_gguf))
    assert again.path == art.path and not any("dequantizing" in m for m in logged.messages)  # not twice


def test_hub_offline_without_cache_says_so():
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE is set"):
        pull("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_unknown_reference():
    with pytest.raises(SourceNotFoundError, match="no model at"):
        pull("not a model")


def test_folder_without_config(tmp_path):
    with pytest.raises(InvalidModelError, match="no config.json"):
        pull(str(tmp_path))


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidModelError, match="pass `allow_pickle` if you trust it"):
        pull(str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "edgepack", "pull", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "pass --allow-pickle if you trust it" in r.stderr  # the command line names its flag


def test_truncated_safetensors(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    f = tmp_path / "model.safetensors"
    save_file({"w": np.zeros((64, 64), dtype=np.float32)}, f)
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(InvalidModelError, match="truncated"):
        check_safetensors(f)
    f.write_bytes(b"\xff" * 16)
    with pytest.raises(InvalidModelError, match="not a valid safetensors"):
        check_safetensors(f)


def test_corrupt_gguf_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    r = _cli("pull", str(bad))
    assert r.returncode == 1
    assert "not a readable GGUF" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_offline_error_is_one_line():
    r = _cli("pull", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert r.returncode == 1
    assert r.stderr.startswith("error: HF_HUB_OFFLINE is set")
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_dequantizes_a_gguf_with_its_own_lines_only(smollm2_gguf, tmp_path):
    """No library progress bars (transformers' GGUF loader draws one with tqdm) between edgepack's lines."""
    r = _cli("pull", str(smollm2_gguf))
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("dequantizing SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "%|" not in r.stderr and "it/s" not in r.stderr, r.stderr
