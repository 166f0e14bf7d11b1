"""``Loader``: switching a bundle's variants on the real llama.cpp backend, with the fallback when a variant does not load."""

from __future__ import annotations

import shutil

import pytest

from edgepack.bundle import Bundle, Variant
from edgepack.errors import BackendError, UsageError
from edgepack.runtime import Loader


@pytest.fixture
def bundle(smollm2_gguf, tmp_path):
    """Variant "good" is the real SmolLM2 GGUF; "bad" is a file llama.cpp refuses (a GGUF header, then nothing)."""
    root = tmp_path / "bundle"
    b = Bundle.create(root, "smollm2-135m", {"ref": str(smollm2_gguf), "origin": "file", "files": []})
    good = root / "variants" / "good" / "model.gguf"
    bad = root / "variants" / "bad" / "model.gguf"
    good.parent.mkdir(parents=True)
    bad.parent.mkdir(parents=True)
    try:
        good.hardlink_to(smollm2_gguf)
    except OSError:
        shutil.copyfile(smollm2_gguf, good)
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(4096))
    for vid, path in (("good", good), ("bad", bad)):
        b.add_variant(Variant(vid, "gguf", "llama.cpp", path.relative_to(root).as_posix(), [b.file_record(path)], 5.0))
    b.save()
    return root


@pytest.mark.slow
def test_switch_loads_frees_and_falls_back(bundle):
    loader = Loader(bundle, n_ctx=256, threads=1)
    assert [v.id for v in loader.variants] == ["good", "bad"] and loader.first is None
    first, error = loader.switch(None, loader.first)
    assert error is None and first.info.variant == "good"  # load's own pick: the manifest's first
    again, error = loader.switch(first, "bad")
    assert isinstance(error, BackendError)
    assert first._model is None  # llama.cpp's model freed
    assert again is not first and again.info.variant == "good"  # and the old variant loaded again
    assert again.generate("The capital of France is", max_tokens=2, temperature=0).completion_tokens >= 1
    again.close()


@pytest.mark.slow
def test_nothing_loaded_when_the_first_variant_fails(bundle):
    session, error = Loader(bundle, variant="bad", threads=1).switch(None, "bad")
    assert session is None and isinstance(error, BackendError)


def test_a_single_file_has_no_variants_and_bad_settings_fail_on_open(smollm2_gguf):
    loader = Loader(smollm2_gguf, backend="onnx")
    assert loader.variants == []
    with pytest.raises(UsageError, match="backend='onnx'"):  # the backend asked for steers the first pick
        loader.open(None)
