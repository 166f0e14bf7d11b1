"""The quantize stage: real llama.cpp quantization of tiny GGUFs, imatrix metadata, fallbacks, bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
from llama_logits import llama_logits

from edgepack.converters import quantize as qz
from edgepack.converters.ggml import ggml
from edgepack.converters.gguf import convert
from edgepack.converters.imatrix import Imatrix, ImatrixFile
from edgepack.errors import CalibrationError, EdgepackError, UsageError
from edgepack.stages import Artifact, Kind
from models import tiny_model

# Row lengths that divide into 256-wide blocks, so K-quants and IQ types apply without fallback.
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(HF folder, f32 GGUF) of a tiny llama whose weights take every block size."""
    root = tmp_path_factory.mktemp("wide")
    hf = tiny_model("llama", root / "hf", **WIDE)
    return hf, convert(hf, root / "model-f32.gguf", "f32").path


@pytest.fixture(scope="module")
def wide_imatrix(wide, tmp_path_factory):
    out = tmp_path_factory.mktemp("im")
    return Imatrix().run(Artifact(Kind.HF, wide[0]), Imatrix.Config(tokens=512, window=128), out).path


def quantize(src: Path, out: Path, **cfg) -> Artifact:
    out.mkdir(parents=True, exist_ok=True)
    return qz.Quantize().run(Artifact(Kind.GGUF, src), qz.Quantize.Config(**cfg), out)


def types_of(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def kv(path: Path, key: str):
    field = gguf.GGUFReader(path).get_field(key)
    return None if field is None else field.contents()


def test_type_tables_match_llama_cpp():
    import llama_cpp

    for name, value in qz.QUANT_TYPES.items():
        const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(llama_cpp, const) == value, name
    for name, value in qz.TENSOR_TYPES.items():
        assert ggml().name(value).upper() == name
    assert qz.file_type("q4_k") == "Q4_K_M"
    with pytest.raises(UsageError, match="unknown GGUF type 'Q9_X'"):
        qz.file_type("Q9_X")


def test_tensor_type_overrides():
    assert qz.parse_tensor_types(["attn_v=q8_0", r"blk\.[0-3]\.ffn_down=Q6_K"]) == [("attn_v", "Q8_0"), (r"blk\.[0-3]\.ffn_down", "Q6_K")]
    with pytest.raises(UsageError, match="PATTERN=TYPE"):
        qz.parse_tensor_types(["attn_v"])
    with pytest.raises(UsageError, match="unknown tensor type 'q9'"):
        qz.parse_tensor_types(["attn_v=q9"])


@pytest.mark.parametrize("kind, expect", [("Q4_K_M", {"Q4_K", "Q6_K"}), ("Q8_0", {"Q8_0"}), ("IQ4_XS", {"IQ4_XS"})])
def test_quantizes_and_llama_cpp_loads_it(wide, tmp_path, kind, expect):
    hf, src = wide
    art = quantize(src, tmp_path, type=kind)
    types = types_of(art.path)
    weights = {n: t for n, t in types.items() if n.startswith("blk.") and not n.endswith("norm.weight")}
    assert set(weights.values()) <= expect and expect & set(weights.values())
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert art.meta["fallbacks"] == [] and art.meta["bytes"] == art.path.stat().st_size
    assert kv(art.path, "general.file_type") == qz.QUANT_TYPES[kind]
    assert kv(art.path, "quantize.imatrix.file") is None
    ref = llama_logits(src, [1, 5, 9, 14, 3])
    got = llama_logits(art.path, [1, 5, 9, 14, 3])
    assert np.isfinite(got).all()
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.6  # quantized, still the same model


def test_imatrix_is_used_and_recorded(wide, wide_imatrix, tmp_path):
    _, src = wide
    art = quantize(src, tmp_path / "a", type="IQ2_XXS", imatrix=str(wide_imatrix))
    assert "IQ2_XXS" in set(types_of(art.path).values())
    im = ImatrixFile.load(wide_imatrix)
    assert kv(art.path, "quantize.imatrix.file") == "imatrix.dat"
    assert kv(art.path, "quantize.imatrix.dataset") == "builtin:calibration"
    assert kv(art.path, "quantize.imatrix.entries_count") == len(im.entries) == 14
    assert kv(art.path, "quantize.imatrix.chunks_count") == 4
    assert art.meta["imatrix"] == {"dataset": "builtin:calibration", "entries": 14, "chunks": 4}
    assert np.isfinite(llama_logits(art.path, [1, 2, 3])).all()
    # the imatrix changes the rounding: the same type without it gives different bytes
    plain = quantize(src, tmp_path / "b", type="Q4_K_M")
    weighted = quantize(src, tmp_path / "c", type="Q4_K_M", imatrix=str(wide_imatrix))
    assert plain.path.read_bytes()[-4096:] != weighted.path.read_bytes()[-4096:]


def test_types_needing_an_imatrix_refuse_without_one(wide, tmp_path):
    _, src = wide
    for kind in ("IQ2_XXS", "IQ1_S", "Q2_K_S"):
        with pytest.raises(UsageError, match="needs an importance matrix"):
            quantize(src, tmp_path, type=kind)
    with pytest.raises(UsageError, match="IQ2_XS needs an importance matrix"):
        quantize(src, tmp_path, type="Q4_K_M", tensor_types=["ffn_up=iq2_xs"])
    assert not list(tmp_path.iterdir())


def test_mismatched_imatrix_is_refused(wide, tmp_path):
    _, src = wide
    other = ImatrixFile({f"blk.{i}.{k}.weight": np.ones(64, np.float32) for i in range(2) for k in ("attn_q", "ffn_up")}, 1, "x")
    other.save(tmp_path / "other.dat")
    with pytest.raises(CalibrationError, match="made for another model"):
        quantize(src, tmp_path / "out", type="Q4_K_M", imatrix=str(tmp_path / "other.dat"))
    assert not list((tmp_path / "out").iterdir())


def test_bad_inputs(wide, tmp_path):
    _, src = wide
    with pytest.raises(UsageError, match="unknown GGUF type"):
        quantize(src, tmp_path, type="Q9_X")
    q8 = quantize(src, tmp_path / "q8", type="Q8_0")
    with pytest.raises(UsageError, match="already quantized"):
        quantize(q8.path, tmp_path / "again", type="Q4_K_M")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(EdgepackError, match="not a readable GGUF"):
        quantize(tmp_path / "junk.gguf", tmp_path / "j", type="Q4_K_M")


def test_overrides_and_fallbacks_are_reported(tmp_path):
    hf = tiny_model("llama", tmp_path / "hf")  # 64-wide rows: no 256-wide K-quant block fits
    src = convert(hf, tmp_path / "model-f16.gguf", "f16").path
    art = quantize(src, tmp_path / "q", type="Q4_K_M", tensor_types=["ffn_down=q8_0"], token_embedding_type="q8_0")
    types = types_of(art.path)
    assert art.path.name == "model-Q4_K_M.gguf"
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q8_0"
    fallbacks = {f["tensor"]: f for f in art.meta["fallbacks"]}
    assert fallbacks["blk.0.attn_q.weight"] == {"tensor": "blk.0.attn_q.weight", "columns": 64, "wanted": "Q4_K", "used": "Q5_0"}
    assert types["blk.0.attn_q.weight"] == "Q5_0"
    assert "blk.0.ffn_down.weight" not in fallbacks


def test_a_failed_write_leaves_no_file(wide, tmp_path):
    """A file-size limit makes llama.cpp's writes fail mid-file, as a full disk does."""
    _, src = wide
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import resource, signal
        from pathlib import Path
        from edgepack.converters.quantize import Quantize
        from edgepack.errors import EdgepackError
        from edgepack.stages import Artifact, Kind
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            Quantize().run(Artifact(Kind.GGUF, Path({str(src)!r})), Quantize.Config(type="Q8_0"), Path({str(out)!r}))
        except EdgepackError as e:
            print(type(e).__name__, e)
        """
    )
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.stdout.startswith(("BackendError", "DiskFullError")), proc.stdout + proc.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "phi3"])  # biases; tied head with no output tensor; fused qkv/gate_up
def test_own_imatrix_matches_the_writers_tensors(arch, tmp_path):
    hf = tiny_model(arch, tmp_path / "hf", tokenizer=None if arch == "qwen2" else "bpe-llama3")
    imat = Imatrix().run(Artifact(Kind.HF, hf), Imatrix.Config(tokens=128, window=64), tmp_path / "im").path
    src = convert(hf, tmp_path / "model-f16.gguf", "f16").path
    art = quantize(src, tmp_path / "q", type="Q4_K_M", imatrix=str(imat))
    assert kv(art.path, "quantize.imatrix.entries_count") == len(ImatrixFile.load(imat).entries)
    assert np.isfinite(llama_logits(art.path, [1, 2, 3])).all()


def test_embedding_types_ggml_cannot_make_are_refused(wide, wide_imatrix, tmp_path):
    _, src = wide
    with pytest.raises(UsageError, match="token_embd.weight cannot be IQ2_XXS"):
        quantize(src, tmp_path, type="Q4_K_M", imatrix=str(wide_imatrix), token_embedding_type="iq2_xxs")
