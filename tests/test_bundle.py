"""Bundle manifests: sizes checked on open, hashes with verify, paths confined to the bundle."""

from __future__ import annotations

import json

import pytest

from edgepack.bundle import Bundle, Variant
from edgepack.errors import BundleError
from edgepack.fsutil import atomic_path


def _bundle(tmp_path):
    b = Bundle.create(tmp_path / "b", "demo", {"ref": "x"})
    f = b.root / "variants" / "gguf-q8_0" / "model.gguf"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"0123456789")
    b.add_variant(Variant("gguf-q8_0", "gguf", "llama.cpp", "variants/gguf-q8_0/model.gguf", [b.file_record(f)], 8.5))
    b.save()
    return b, f


def test_roundtrip(tmp_path):
    b, _ = _bundle(tmp_path)
    again = Bundle.open(b.root, verify=True)
    assert again.name == "demo"
    v = again.variant("gguf-q8_0")
    assert v.bytes == 10 and v.bits_per_weight == 8.5
    data = json.loads((b.root / "edgepack.json").read_text())
    assert data["schema"] == 1 and data["variants"][0]["files"][0]["path"] == "variants/gguf-q8_0/model.gguf"


def test_size_mismatch_detected_on_open(tmp_path):
    b, f = _bundle(tmp_path)
    f.write_bytes(b"short")
    with pytest.raises(BundleError, match="truncated or was replaced"):
        Bundle.open(b.root)


def test_hash_mismatch_needs_verify(tmp_path):
    b, f = _bundle(tmp_path)
    f.write_bytes(b"9876543210")
    Bundle.open(b.root)  # same size: only --verify notices
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(b.root, verify=True)


def test_escaping_path_refused(tmp_path):
    b, _ = _bundle(tmp_path)
    data = json.loads((b.root / "edgepack.json").read_text())
    data["variants"][0]["files"][0]["path"] = "../../etc/passwd"
    (b.root / "edgepack.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="escapes the bundle"):
        Bundle.open(b.root)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.open(tmp_path)
    (tmp_path / "edgepack.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(tmp_path)


def test_unknown_variant_lists_known(tmp_path):
    b, _ = _bundle(tmp_path)
    with pytest.raises(BundleError, match="gguf-q8_0"):
        b.variant("onnx-int4")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_reported_and_cleaned(tmp_path):
    import errno

    from edgepack.errors import DiskFullError

    target = tmp_path / "model.gguf"
    with pytest.raises(DiskFullError, match="free space"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
