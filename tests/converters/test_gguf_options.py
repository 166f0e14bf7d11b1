"""GGUF options end to end: `edgepack convert` flags reach the file llama.cpp loads; size targets fit; bad values stop first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from llama_logits import llama_logits, random_ids

from edgepack.bundle import Bundle
from edgepack.convert import convert
from edgepack.errors import UsageError
from models import tiny_model

# Rows that divide into 256-wide blocks (so K-quants apply without fallback), an untied head, room for 512-token windows.
WIDE = dict(hidden_size=256, intermediate_size=512, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("wide") / "hf", **WIDE)


def edgepack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True)


def types_of(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def vocab_of(hf: Path) -> int:
    return json.loads((hf / "config.json").read_text())["vocab_size"]


def test_quantizer_flags_reach_the_file(wide, tmp_path):
    out = tmp_path / "b"
    r = edgepack(
        "convert", str(wide), "--to", "gguf:Q4_K_M,gguf:q8_0", "-o", str(out), "--no-report", "--calibration-tokens", "512",
        "--tensor-type", r"blk\.1\.attn_v=q8_0", "--tensor-type", "ffn_down=q5_k", "--output-type", "q8_0", "--token-embedding-type", "q4_0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "gguf:q8_0 does not use --calibration-tokens, --output-type, --tensor-type, --token-embedding-type" in r.stderr
    bundle = Bundle.open(out, verify=True)
    q4 = bundle.variant("gguf-q4_k_m")
    types = types_of(out / q4.path)
    assert types["blk.1.attn_v.weight"] == "Q8_0" and types["blk.0.attn_v.weight"] != "Q8_0"
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == "Q5_K"
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_0"
    assert types["blk.0.ffn_up.weight"] == "Q4_K"  # the rest keeps Q4_K_M's own mix
    assert q4.meta["imatrix"]["chunks"] == 1  # --calibration-tokens 512: one window
    assert [s["stage"] for s in bundle.data["steps"]] == ["gguf-write", "imatrix", "quantize", "gguf-write"]
    assert set(types_of(out / bundle.variant("gguf-q8_0").path).values()) == {"F32", "Q8_0"}  # the writer's, untouched
    assert np.isfinite(llama_logits(out / q4.path, random_ids(vocab_of(wide)))).all()


def test_target_size_makes_a_measured_mix_within_the_budget(wide, tmp_path):
    plain = convert(str(wide), "gguf:Q4_K_M", tmp_path / "plain", options={"calibration_tokens": 512})
    size = plain.variant("gguf-q4_k_m").meta["bytes"]
    out = tmp_path / "t"
    r = edgepack("convert", str(wide), "--to", "gguf:Q4_K_M", "--target-size", str(size), "--calibration-tokens", "512", "-o", str(out), "--no-report")
    assert r.returncode == 0, r.stderr
    bundle = Bundle.open(out, verify=True)
    (variant,) = bundle.variants
    assert variant.id == f"gguf-q4_k_m-{round(size / 1e6, 2):g}mb"
    path = out / variant.path
    assert size - 64_000 < path.stat().st_size <= size
    chosen = variant.meta["target"]["types"]
    types = types_of(path)
    assert all(types[name] == kind for name, kind in chosen.items()) and len(set(chosen.values())) > 1
    assert [s["stage"] for s in bundle.data["steps"]] == ["gguf-write", "imatrix", "sensitivity", "quantize"]
    assert [s["cached"] for s in bundle.data["steps"][:2]] == [True, True]  # shared with the plain Q4_K_M
    assert (out / "calibration" / "sensitivity.json").is_file() and (out / "calibration" / "imatrix.dat").is_file()
    assert np.isfinite(llama_logits(path, random_ids(vocab_of(wide)))).all()

    # bits per weight, restricted types, and a user's importance matrix (sensitivity is measured under it)
    opts = {"target_bpw": "5.5", "target_types": "q4_k,q6_k,q8_0", "imatrix": str(out / "calibration" / "imatrix.dat")}
    b = convert(str(wide), "gguf:Q4_K_M", tmp_path / "bpw", options=opts)
    v = b.variant("gguf-q4_k_m-5.5bpw")
    assert v.meta["bits_per_weight"] <= 5.5 and set(v.meta["target"]["types"].values()) <= {"Q4_K", "Q6_K", "Q8_0"}
    assert [s["stage"] for s in b.data["steps"]] == ["gguf-write", "sensitivity", "quantize"]


def test_a_target_the_smallest_types_miss_is_refused_before_measuring(wide, tmp_path, logged):
    with pytest.raises(UsageError, match="the smallest types allowed still need .* raise the target size"):
        convert(str(wide), "gguf:Q4_K_M", tmp_path / "b", options={"target_size": "300KB"})
    assert [m.split(":")[0] for m in logged.messages if ": done in" in m] == ["gguf-write"]  # no imatrix, no sensitivity


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--target-size", "12XB"], "--target-size: size '12XB' not understood"),
        (["--target-size", "0"], "--target-size: size '0': give a size above zero"),
        (["--target-bpw", "many"], "--target-bpw 'many': give bits per weight"),
        (["--target-size", "100MB", "--target-bpw", "4"], "give --target-size or --target-bpw, not both"),
        (["--target-types", "q4_k"], "--target-types lists the types a size target may use"),
        (["--target-size", "100MB", "--target-types", "q4_k,q9_k"], "--target-types: unknown tensor type 'q9_k'"),
        (["--tensor-type", "attn_v"], "--tensor-type 'attn_v': write PATTERN=TYPE"),
        (["--tensor-type", "attn_v=q9"], "--tensor-type 'attn_v=q9': unknown tensor type 'q9'"),
        (["--tensor-type", "(=q8_0"], "--tensor-type '(=q8_0': '(' is not a regular expression"),
        (["--output-type", "q7"], "--output-type: unknown tensor type 'q7'"),
        (["--token-embedding-type", "x"], "--token-embedding-type: unknown tensor type 'x'"),
        (["--calibration-tokens", "100"], "--calibration-tokens '100': give a number of tokens of at least 512"),
        (["--calibration", "/nonexistent/text.txt"], "--calibration '/nonexistent/text.txt': no such file"),
        (["--calibration", "hf:wikitext"], "--calibration 'hf:wikitext': write hf:DATASET[:CONFIG]:SPLIT:COLUMN"),
        (["--imatrix", "/nonexistent/imatrix.dat"], "--imatrix /nonexistent/imatrix.dat: no such file"),
        (["--imatrix", "x.dat", "--no-imatrix"], "give --imatrix PATH or --no-imatrix, not both"),
        (["--no-imatrix", "--to", "gguf:IQ2_XS"], "--no-imatrix: IQ2_XS cannot be made without an importance matrix"),
        (["--to", "gguf:q8_0", "--output-type", "f16"], "--output-type: none of gguf:q8_0 uses it (options of gguf: variants)"),
        (["--to", "gguf:Q4_K_M,gguf:Q3_K_S", "--target-size", "90MB"], "a size target makes one mix"),
    ],
)
def test_bad_values_are_one_line_before_any_work(tmp_path, flags, message):
    """The model does not exist: a check that ran after the pull would fail on it instead."""
    args = flags if "--to" in flags else [*flags, "--to", "gguf:Q4_K_M"]
    r = edgepack("convert", "/nonexistent/model", *args, "-o", str(tmp_path / "b"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: {message}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_an_imatrix_file_that_is_not_one_is_refused_up_front(tmp_path):
    bad = tmp_path / "imatrix.dat"
    bad.write_bytes(b"\x00\x01")
    r = edgepack("convert", "/nonexistent/model", "--to", "gguf:Q4_K_M", "--imatrix", str(bad), "-o", str(tmp_path / "b"))
    assert r.returncode == 1 and r.stderr.startswith(f"error: {bad} is not a llama.cpp imatrix.dat file"), r.stderr
    assert not (tmp_path / "b").exists()


def test_python_options_are_checked_before_any_work(tmp_path):
    """Python callers see the option names they passed, not the command line's flags."""
    with pytest.raises(UsageError, match="`target_size`: size 'big' not understood") as e:
        convert("/nonexistent/model", "gguf:Q4_K_M", tmp_path / "b", options={"target_size": "big"})
    assert e.value.option == "target_size"
    with pytest.raises(UsageError, match="`calibration_tokens` 'lots'"):
        convert("/nonexistent/model", "gguf:Q4_K_M", tmp_path / "b", options={"calibration_tokens": "lots"})
    with pytest.raises(UsageError, match="`colour`: none of gguf:Q4_K_M uses it"):
        convert("/nonexistent/model", "gguf:Q4_K_M", tmp_path / "b", options={"colour": "blue"})
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_smollm2_target_size_fits_and_runs(smollm2, tmp_path):
    """--target-size 100MB on the real SmolLM2 (Q4_K_M is 105.5 MB): the file fills the budget, and llama.cpp agrees with the reference.

    Q4_1/Q5_1 are left out: this reference is dequantized from a Q4_1 GGUF, so an all-Q4_1 file (98.4 MB) costs nothing
    and the planner would stop there.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.converters import calibration

    out = tmp_path / "b"
    types = "q2_k,q3_k,iq3_s,iq4_xs,q4_k,q5_k,q6_k,iq4_nl,q4_0,q5_0,q8_0,f16"
    r = edgepack(
        "convert", str(smollm2), "--to", "gguf:Q4_K_M", "--target-size", "100MB", "--target-types", types,
        "--calibration-tokens", "1024", "-o", str(out), "--no-report",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (variant,) = Bundle.open(out).variants
    assert variant.id == "gguf-q4_k_m-100mb"
    path = out / variant.path
    assert 99_500_000 < path.stat().st_size <= 100_000_000
    assert len(variant.meta["target"]["chosen"]) > 1

    # 256 tokens of held-out text (the builtin eval split, which calibration never sees)
    ids = calibration.token_stream(calibration.load("builtin", "eval"), AutoTokenizer.from_pretrained(smollm2), chat=False, max_tokens=256)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(path, ids, n_ctx=256, f32_cache=False)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8  # gguf_quality.py's mixes near this size: 0.87-0.93 over 3,072 tokens
