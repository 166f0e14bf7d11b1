"""Lineage that stays true: a rerun that changes nothing leaves the manifest byte for byte as it was, each stage once;
no path of the converting machine in the manifest; a bundle moved elsewhere with the cache and the source gone still
evals, benches, reports, chats, and loads signed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from models import tiny_model

import edgepack
from edgepack import constants
from edgepack.trust import keygen, sign


def _edgepack(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.slow
def test_a_rerun_keeps_the_manifest_and_a_moved_bundle_needs_no_cache(tmp_path):
    src = tiny_model("llama", tmp_path / "tiny")
    out = tmp_path / "made" / "b"
    cmd = ["convert", str(src), "--to", "gguf:Q4_K_M", "--calibration-tokens", "512", "-o", str(out)]
    first = _edgepack(*cmd)
    manifest = (out / "edgepack.json").read_bytes()
    again = _edgepack(*cmd)  # every stage cached; eval and bench have nothing new to measure
    assert (out / "edgepack.json").read_bytes() == manifest
    assert "every variant is scored already" in again.stderr and "report: " in first.stderr

    data = json.loads(manifest)
    stages = [s["stage"] for s in data["steps"]]
    assert stages == ["gguf-write", "imatrix", "quantize"]  # once each, by cache key
    assert all(s["key"].startswith(s["stage"]) and not s["cached"] for s in data["steps"])
    quantize = data["steps"][2]["params"]
    assert quantize["imatrix"]["name"] == "imatrix.dat" and len(quantize["imatrix"]["sha256"]) == 64  # by content, not path
    text = manifest.decode()
    assert str(constants.home()) not in text and "reference_path" not in text
    assert text.count(str(src)) == 1 and data["source"]["ref"] == str(src)  # only the argument as it was typed
    assert data["source"]["origin"] == "local:tiny"
    report = (out / "report" / "report.md").read_text()
    assert sum(line.startswith("- **step**") for line in report.splitlines()) == 3
    other = tmp_path / "made" / "c"
    _edgepack(*cmd[:-1], str(other), "--no-report")  # a second bundle from the same cached stages
    reused = json.loads((other / "edgepack.json").read_text())["steps"]
    assert [(s["key"], s["cached"]) for s in reused] == [(s["key"], True) for s in data["steps"]]

    moved = tmp_path / "elsewhere" / "b"
    shutil.copytree(out, moved)  # a copy, as a download or another disk would give
    for gone in (constants.home(), out.parent, src):
        shutil.rmtree(gone)
    _edgepack("eval", str(moved), "--windows", "2", "--window-len", "64", "--prompts", "1", "--max-new-tokens", "4")
    _edgepack("bench", str(moved), "-n", "1", "--warmup", "0", "--prompt-tokens", "32", "--decode-tokens", "4")
    page = Path(_edgepack("report", str(moved)).stdout.strip())
    assert page.is_file() and "not signed" in page.with_name("report.md").read_text()
    with edgepack.load(moved, n_ctx=128) as s:
        assert s.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0).text is not None

    key = tmp_path / "keys" / "maker.key"
    keygen(key, "Maker")
    sign(moved, key)
    with edgepack.load(moved, n_ctx=128, trusted_keys=Path(f"{key}.pub")) as s:
        assert s.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0).text is not None
    assert "signed by Maker" in Path(_edgepack("report", str(moved)).stdout.strip()).with_name("report.md").read_text()
