"""Bundles by name (``edgepack list``/``rm``, every command taking a name) and threads that follow the machine's load."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgepack
from edgepack import constants
from edgepack.bundle import Bundle
from edgepack.errors import BundleError, SourceNotFoundError
from edgepack.eval import as_bundle
from edgepack.runtime.threads import Governor
from models import gguf_bundle

EDGEPACK = str(Path(sys.executable).with_name("edgepack"))


@pytest.fixture
def named(smollm2_gguf) -> Path:
    """The real SmolLM2 GGUF as the bundle ``smollm2-135m`` in this test's edgepack home, where ``convert`` puts it."""
    return gguf_bundle(constants.bundles_dir() / "smollm2-135m", smollm2_gguf)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEPACK, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=cwd, timeout=300)


def test_load_and_every_command_take_a_bundle_name(named):
    with edgepack.load("smollm2-135m", threads=1, n_ctx=256) as s:
        assert s.info.bundle == named and s.info.variant == "gguf-q4_1"
    assert as_bundle("smollm2-135m").root == named  # eval's and bench's way in
    r = _cli("run", "smollm2-135m", "The capital of France is", "--raw", "--temp", "0", "--max-tokens", "8")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    r = _cli("inspect", "smollm2-135m", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["path"] == str(named), r.stderr
    r = _cli("recommend", "smollm2-135m", "--ram", "1GiB", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["options"][0]["variant"] == "gguf-q4_1", r.stderr
    r = _cli("report", "smollm2-135m")
    assert r.returncode == 0 and Path(r.stdout.strip()).is_file() and Path(r.stdout.strip()).is_relative_to(named), r.stderr
    r = _cli("bench", "smollm2-135m", "--prompt-tokens", "16", "--decode-tokens", "8", "-n", "1", "--warmup", "0", "--threads", "1", "--json")
    assert r.returncode == 0 and "gguf-q4_1@cpu" in Bundle.open(named).data["bench"]["runs"], r.stderr


def test_a_recipe_not_yet_converted_says_the_command_and_an_unknown_name_lists_the_bundles(named):
    r = _cli("chat", "gemma3-270m")
    assert r.returncode == 2  # chat first refuses a pipe; run takes one
    r = _cli("run", "gemma3-270m", "hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: 'gemma3-270m' has not been converted yet: run `edgepack convert gemma3-270m` first (it makes the bundle gemma3-270m)"
    r = _cli("eval", "nosuch")
    assert r.returncode == 1 and "no model at 'nosuch'" in r.stderr and "bundles here: smollm2-135m" in r.stderr
    with pytest.raises(SourceNotFoundError, match="bundles here: smollm2-135m"):
        edgepack.load("nosuch")


def test_a_local_folder_wins_over_a_bundle_of_the_same_name_and_the_error_says_so(named, tmp_path):
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "notes.txt").write_text("not a model")
    r = _cli("run", "smollm2-135m", "hi", cwd=tmp_path)
    assert r.returncode == 2 and "is not a bundle folder" in r.stderr and "Traceback" not in r.stderr
    assert f"the folder smollm2-135m here was used, not the bundle of that name: give its path, {named}" in r.stderr


def test_list_shows_each_bundle_and_its_variants(named, smollm2_gguf):
    gguf_bundle(constants.bundles_dir() / "second", smollm2_gguf)
    (constants.bundles_dir() / "broken").mkdir()
    (constants.bundles_dir() / "broken" / "edgepack.json").write_text("{")
    r = _cli("list", "--json")
    assert r.returncode == 0, r.stderr
    found = {b["name"]: b for b in json.loads(r.stdout)}
    assert set(found) == {"smollm2-135m", "second", "broken"}
    v = found["smollm2-135m"]["variants"][0]
    assert (v["id"], v["format"], v["bytes"]) == ("gguf-q4_1", "gguf", smollm2_gguf.stat().st_size)
    assert v["kld"] is None and v["decode_tokens_per_s"] is None  # not measured yet
    assert "not valid JSON" in found["broken"]["error"]
    r = _cli("list")
    assert r.returncode == 0 and re.search(r"smollm2-135m +│ gguf-q4_1 +│ gguf +│ +\d+\.\d", r.stdout), r.stdout


def test_rm_is_refused_while_loaded_then_removes_the_bundle_and_its_unshared_cache_entries(smollm2_gguf):
    root = gguf_bundle(constants.bundles_dir() / "a", smollm2_gguf, steps=("shared-1", "only-a-2"))
    gguf_bundle(constants.bundles_dir() / "b", smollm2_gguf, steps=("shared-1",))
    for key in ("shared-1", "only-a-2"):
        (constants.stages_dir() / key).mkdir(parents=True)
        (constants.stages_dir() / key / "out.bin").write_bytes(b"x" * 1000)
    with edgepack.load("a", threads=1, n_ctx=64):
        r = _cli("rm", "a")
        assert r.returncode == 1 and "is loaded by a running edgepack" in r.stderr and root.is_dir()
    r = _cli("rm", "a", "--cache")
    assert r.returncode == 0, r.stderr
    assert "and 1 cache entries" in r.stdout
    assert not root.exists() and not (constants.stages_dir() / "only-a-2").exists() and (constants.stages_dir() / "shared-1").is_dir()
    r = _cli("rm", "a")
    assert r.returncode == 1 and r.stderr.startswith("error: no bundle named 'a'") and "bundles here: b" in r.stderr
    with pytest.raises(BundleError):
        Bundle.open(root)


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _settle(gov: Governor, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        gov.update()
        time.sleep(0.02)
    return gov.update()


def test_the_thread_count_follows_what_other_processes_leave_free():
    cpus = os.cpu_count() or 1
    if cpus < 2:
        pytest.skip("one CPU: there is no fewer threads to pick")
    gov = Governor(cpus)
    procs = _busy(cpus)  # every CPU taken by someone else
    try:
        assert _settle(gov, 1.0) < cpus
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert _settle(gov, 1.5) == cpus  # the machine is free again
    fixed = Governor(cpus, fixed=True)
    procs = _busy(cpus)
    try:
        assert _settle(fixed, 0.5) == cpus  # a count the caller chose stays
    finally:
        for p in procs:
            p.kill()
            p.wait()
