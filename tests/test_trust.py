"""Signed bundles: keygen, sign, verify, and load(trusted_keys=...) refusing anything that differs from what was signed.

The bundles here are built by Bundle's own methods with small made-up files: verification reads bytes, not models,
so a refusal needs no backend. Loading a signed real model is in test_lineage.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgepack
from edgepack.bundle import Bundle
from edgepack.errors import BundleError, KeyFileError, SignatureError, UsageError
from edgepack.fsutil import sha256_file
from edgepack.report import render
from edgepack.stages import Artifact, Kind
from edgepack.trust import SIGNATURE, keygen, read_public_keys, sign, status, verify

GGUF = "variants/gguf-q4_k_m/model-Q4_K_M.gguf"


def make_bundle(root: Path, seed: int = 0) -> Bundle:
    """Two variants (a file and a folder) and a reference, placed the way convert places them."""
    src = root.parent / f"{root.name}-src"
    (src / "onnx").mkdir(parents=True)
    (src / "model-Q4_K_M.gguf").write_bytes(bytes((i * 7 + seed) % 256 for i in range(4096)))
    (src / "onnx" / "model.onnx").write_bytes(bytes((i * 3 + seed) % 256 for i in range(2048)))
    (src / "onnx" / "genai_config.json").write_text('{"model": {}}')
    ref = src / "ref"
    ref.mkdir()
    (ref / "config.json").write_text('{"model_type": "llama"}')
    (ref / "model.safetensors").write_bytes(b"\0" * 1000)
    files = [{"path": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(ref.iterdir())]
    b = Bundle.create(root, "demo", {"ref": "demo", "origin": "local:demo", "revision": None, "architecture": "llama", "files": files})
    b.keep_reference(ref)
    b.place_variant("gguf-q4_k_m", Artifact(Kind.GGUF, src / "model-Q4_K_M.gguf"), format="gguf", backend="llama.cpp", meta={}, bits_per_weight=4.9)
    b.place_variant("onnx-int4", Artifact(Kind.ONNX, src / "onnx"), format="onnx", backend="onnx", meta={}, bits_per_weight=4.5)
    b.save()
    return b


@pytest.fixture
def key(tmp_path) -> Path:
    path = tmp_path / "keys" / "acme.key"
    keygen(path, "Acme models")
    return path


@pytest.fixture
def signed(tmp_path, key) -> Path:
    b = make_bundle(tmp_path / "b")
    sign(b.root, key)
    return b.root


def _flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _refused(root: Path, pub: Path, path: str | None, match: str) -> None:
    """verify and load(trusted_keys=...) both refuse, naming ``path``; nothing is loaded."""
    with pytest.raises(SignatureError, match=match) as e:
        verify(root, pub)
    assert e.value.path == path
    with pytest.raises(SignatureError, match=match):
        edgepack.load(root, trusted_keys=pub)


def test_an_untouched_signed_bundle_verifies_and_names_its_signer(signed, key):
    v = verify(signed, Path(f"{key}.pub"))
    assert v.signer.name == "Acme models" and v.files == 5  # two variants' three files, the reference's two
    assert v.bytes == 4096 + 2048 + len('{"model": {}}') + len('{"model_type": "llama"}') + 1000
    assert verify(signed).signer.key_id == v.signer.key_id  # no trusted keys: any intact signature passes
    assert status(signed) == {"signer": "Acme models", "key_id": v.signer.key_id, "verified": True, "problem": None}


def test_a_flipped_byte_in_a_variant_file_is_named(signed, key):
    _flip(signed / GGUF)
    _refused(signed, Path(f"{key}.pub"), GGUF, f"{GGUF} differs from what Acme models .* signed \\(its sha256 differs\\)")


def test_a_flipped_byte_in_the_manifest_is_named(signed, key):
    manifest = signed / "edgepack.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"bits_per_weight": 4.9', '"bits_per_weight": 4.8'))  # one byte, still valid JSON
    _refused(signed, Path(f"{key}.pub"), "edgepack.json", "edgepack.json differs from what Acme models .* signed")
    _flip(manifest, at=0)  # `{` -> `z`: not JSON at all
    _refused(signed, Path(f"{key}.pub"), "edgepack.json", "edgepack.json of .* is not valid JSON")


def test_a_variant_folder_swapped_in_from_another_bundle_is_named(signed, key, tmp_path):
    other = make_bundle(tmp_path / "other", seed=1)
    shutil.rmtree(signed / "variants" / "onnx-int4")
    shutil.copytree(other.root / "variants" / "onnx-int4", signed / "variants" / "onnx-int4")
    _refused(signed, Path(f"{key}.pub"), "variants/onnx-int4/model.onnx", "variants/onnx-int4/model.onnx differs")


def test_an_extra_file_in_a_variant_folder_is_named(signed, key):
    (signed / "variants" / "onnx-int4" / "model.onnx.data").write_bytes(b"weights the runtime would read")
    _refused(signed, Path(f"{key}.pub"), "variants/onnx-int4/model.onnx.data", "a file the manifest does not list")


def test_a_truncated_file_is_named_before_anything_is_hashed(signed, key):
    with open(signed / GGUF, "r+b") as f:
        f.truncate(1000)
    _refused(signed, Path(f"{key}.pub"), GGUF, r"truncated: 1000 of 4096 bytes")


def test_a_changed_reference_file_is_named(signed, key):
    _flip(signed / "reference" / "model.safetensors", at=10)
    _refused(signed, Path(f"{key}.pub"), "reference/model.safetensors", "reference/model.safetensors differs")


def test_a_signer_nobody_trusts_is_refused(signed, tmp_path):
    stranger = tmp_path / "keys" / "stranger.key"
    keygen(stranger)
    _refused(signed, Path(f"{stranger}.pub"), None, r"signed by Acme models \(key [0-9a-f]{16}\), which is not among the trusted keys")


def test_a_bundle_re_signed_by_someone_else_is_refused(signed, key, tmp_path):
    """Tampering and signing again with one's own key does not pass as the maker's."""
    _flip(signed / GGUF)
    mallory = tmp_path / "keys" / "mallory.key"
    keygen(mallory, "Acme models")  # the same name, another key
    with pytest.raises(BundleError, match="does not match the manifest"):  # sign refuses files that differ from the manifest
        sign(signed, mallory)
    manifest = json.loads((signed / "edgepack.json").read_text())
    manifest["variants"][0]["files"][0]["sha256"] = sha256_file(signed / GGUF)
    (signed / "edgepack.json").write_text(json.dumps(manifest))
    sign(signed, mallory)
    assert verify(signed).signer.name == "Acme models"  # intact, but by whom: only trusted keys tell
    _refused(signed, Path(f"{key}.pub"), None, "not among the trusted keys")


def test_an_unsigned_bundle_loads_as_today_but_not_with_trusted_keys(tmp_path, key):
    b = make_bundle(tmp_path / "b")
    _refused(b.root, Path(f"{key}.pub"), None, "is not signed")
    assert status(b.root) is None
    assert "not signed" in render(b.data, None)["report.md"]


def test_a_manifest_path_leaving_the_bundle_is_refused_before_anything_is_read(signed, key):
    manifest = json.loads((signed / "edgepack.json").read_text())
    manifest["variants"][0]["files"][0]["path"] = "../../etc/passwd"
    (signed / "edgepack.json").write_text(json.dumps(manifest))
    for attempt in (lambda: verify(signed, Path(f"{key}.pub")), lambda: edgepack.load(signed, trusted_keys=Path(f"{key}.pub"))):
        with pytest.raises(BundleError, match="'../../etc/passwd' escapes the bundle"):
            attempt()


def test_a_manifest_without_a_file_record_is_named(signed, key):
    manifest = json.loads((signed / "edgepack.json").read_text())
    del manifest["variants"][1]["files"][0]["path"]
    (signed / "edgepack.json").write_text(json.dumps(manifest))
    _refused(signed, Path(f"{key}.pub"), "edgepack.json", "edgepack.json of .* lacks a file's path, size or hash")


def test_bad_keys_are_one_clear_line(signed, key, tmp_path):
    pub = Path(f"{key}.pub")
    with pytest.raises(KeyFileError, match="is a public key: sign with the private key"):
        sign(signed, pub)
    with pytest.raises(KeyFileError, match="that is a private key: trust its .pub file"):
        verify(signed, key)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError, match="is not a PEM private key"):
        sign(signed, garbage)
    with pytest.raises(KeyFileError, match="no key file at"):
        sign(signed, tmp_path / "missing.key")
    bad_pub = tmp_path / "bad.pub"
    bad_pub.write_text("# my keys\ned25519 AAAA too-short\n")
    with pytest.raises(KeyFileError, match=r"bad.pub, line 2 is not an Ed25519 public key"):
        read_public_keys(bad_pub)
    with pytest.raises(KeyFileError, match="no trusted key given"):
        verify(signed, [])
    with pytest.raises(UsageError, match="never overwrites"):
        keygen(key)
    assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_a_malformed_signature_file_is_named(signed, key):
    (signed / SIGNATURE).write_text('{"algorithm": "ed25519", "public_key": "!!", "signature": ""}')
    _refused(signed, Path(f"{key}.pub"), SIGNATURE, f"{SIGNATURE} of .* is malformed")


def test_bench_results_do_not_break_the_signature(signed, key):
    """The bench slot is measured wherever the bundle goes; the signature leaves it out."""
    b = Bundle.open(signed)
    b.record_bench({"variant": "gguf-q4_k_m", "device": "cpu"}, {"cpu": "elsewhere"})
    b.save()
    verify(signed, Path(f"{key}.pub"))


def test_the_report_shows_the_signer_and_whether_it_verified(signed):
    from edgepack.report import report

    md = report(signed).with_name("report.md").read_text()
    assert "signed by Acme models (key" in md and "verified: the manifest and every file are what was signed" in md
    _flip(signed / GGUF)
    md = report(signed).with_name("report.md").read_text()
    assert f"verification FAILED: {GGUF} differs" in md


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, timeout=120)


def test_cli_keygen_sign_verify_and_one_line_refusals(tmp_path):
    b = make_bundle(tmp_path / "b")
    key = tmp_path / "k" / "maker.key"
    made = _cli("keygen", str(key), "--name", "Maker")
    assert made.returncode == 0 and made.stdout.startswith("ed25519 ") and made.stdout.strip().endswith(" Maker")
    assert _cli("sign", str(b.root), "--key", str(key)).returncode == 0
    ok = _cli("verify", str(b.root), "--trusted", f"{key}.pub", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["signer"] == "Maker"
    _flip(b.root / GGUF)
    for args in (["verify", str(b.root), "--trusted", f"{key}.pub"], ["verify", str(b.root)],
                 ["serve", str(b.root), "--port", "0", "--trusted", f"{key}.pub"],
                 ["chat", str(b.root), "--trusted", f"{key}.pub"]):
        r = _cli(*args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"error: {GGUF} differs from what Maker") and len(r.stderr.strip().splitlines()) == 1
    bad = _cli("sign", str(b.root), "--key", f"{key}.pub")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "is a public key" in bad.stderr
