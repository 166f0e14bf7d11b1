"""Tiny random models, one per supported architecture, built offline for tests.

``tiny_model(arch, path)`` writes a float32 transformers checkpoint (config,
safetensors, tokenizer, chat template) into ``path`` and returns it. Models
are a few MB: 2 layers, hidden size 64, grouped-query attention (4 query
heads, 2 key/value heads), random weights large enough that the top-1 token
is well separated, and norms/biases randomised too so that conversion
conventions (Gemma's ``1 + w`` norms, Qwen2's biases) are actually exercised.

Tokenizers: pass ``tokenizer=<folder>`` to copy a real one (the ``smollm2``
fixture gives SmolLM2's), or a kind name to build one offline from the
Python standard library's docstrings (cached per process):

``bpe-llama3``  byte-level BPE, Llama 3's split regex, merges ignored for whole words
``bpe-qwen2``   byte-level BPE, Qwen2's split regex (single digits), NFC normaliser
``spm-gemma``   SentencePiece BPE with byte fallback, no dummy prefix, BOS added (Gemma)
``spm-llama``   SentencePiece BPE with byte fallback and a dummy prefix, BOS added (Llama 2, Mistral, Phi-3)

Each architecture has a default kind close to what its real models ship.
"""

from __future__ import annotations

import atexit
import io
import shutil
import tempfile
from pathlib import Path

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
TOKENIZER_KINDS = ("bpe-llama3", "bpe-qwen2", "spm-gemma", "spm-llama")
DEFAULT_TOKENIZER = {
    "llama": "bpe-llama3",
    "mistral": "spm-llama",
    "qwen2": "bpe-qwen2",
    "qwen3": "bpe-qwen2",
    "gemma2": "spm-gemma",
    "gemma3": "spm-gemma",
    "phi3": "spm-llama",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "chat_template.jinja")

# A ChatML-style template of our own, so conversions have one to carry over.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Extra training lines so the small vocabularies hold some CJK pieces and emoji bytes.
_EXTRA_TEXT = [
    "模型转换以后需要检查分词结果是否一致。我们在本地运行小模型。",
    "你好，世界！今天的天气很好，我们一起去公园散步吧。",
    "表情符号 🙂 🚀 ✨ 也会出现在文本里。",
    "Numbers: 3.14159, 2024-11-27, 1,000,000 and 0x1F600.",
]

_built: dict[str, Path] = {}
_cache_dir: Path | None = None


def tiny_model(arch: str, path: str | Path, *, tokenizer: str | Path | None = None, seed: int = 0, **config) -> Path:
    """Write a tiny random float32 checkpoint of ``arch`` into ``path``; ``config`` overrides config fields."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"no tiny model for {arch!r}; known: {', '.join(ARCHS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(tokenizer) if isinstance(tokenizer, Path) else build_tokenizer(tokenizer or DEFAULT_TOKENIZER[arch])
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, path / name)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    fields = _config_fields(arch, len(tok), tok)
    fields.update(config)
    cfg = transformers.AutoConfig.for_model(_MODEL_TYPE[arch], **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomise(model, gemma=arch.startswith("gemma"))
    model.save_pretrained(path)
    return path


_MODEL_TYPE = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}


def _config_fields(arch: str, vocab: int, tok) -> dict:
    base = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "llama":
        base.update(tie_word_embeddings=True, rope_theta=50000.0)
    elif arch == "mistral":
        base.update(sliding_window=None)
    elif arch == "qwen2":
        base.update(tie_word_embeddings=True, rope_theta=1000000.0)
    elif arch == "qwen3":
        base.update(head_dim=32)  # wider than hidden/heads, as in the real Qwen3 models
    elif arch == "gemma2":
        base.update(
            tie_word_embeddings=True,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    elif arch == "gemma3":
        base.update(
            tie_word_embeddings=True,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            },
        )
    elif arch == "phi3":
        base.pop("head_dim")
        base.update(original_max_position_embeddings=256)
    return base


def _randomise(model, *, gemma: bool) -> None:
    """Weights ~ N(0, 0.2); norm scales around 1 (stored as w in Gemma's ``1 + w`` convention)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(0.0 if gemma else 1.0, 0.1)
            else:
                p.normal_(0.0, 0.2)


# -- tokenizers --------------------------------------------------------------------------------


def build_tokenizer(kind: str) -> Path:
    """Build (once per process) a small tokenizer of ``kind`` offline and return its folder."""
    global _cache_dir
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {', '.join(TOKENIZER_KINDS)}")
    if kind in _built:
        return _built[kind]
    if _cache_dir is None:
        _cache_dir = Path(tempfile.mkdtemp(prefix="edgepack-test-tokenizers-"))
        atexit.register(shutil.rmtree, _cache_dir, True)
    out = _cache_dir / kind
    if kind.startswith("bpe-"):
        _build_bpe(kind, out)
    else:
        _build_spm(kind, out)
    _built[kind] = out
    return out


def training_text() -> list[str]:
    from edgepack.converters import calibration

    return [t for _, t in calibration.load("builtin").samples] + _EXTRA_TEXT


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _build_bpe(kind: str, out: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    llama3 = kind == "bpe-llama3"
    if llama3:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(ignore_merges=llama3))
    if not llama3:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if llama3 else _QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(training_text(), trainer)
    if llama3:
        bos = specials[0]
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
                ),
            ]
        )
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=specials[1], pad_token=specials[1])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0])
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)


def _build_spm(kind: str, out: Path) -> None:
    import sentencepiece as spm
    import transformers

    gemma = kind == "spm-gemma"
    names = ("<pad>", "<eos>", "<bos>", "<unk>") if gemma else ("<pad>", "</s>", "<s>", "<unk>")
    user = ["<start_of_turn>", "<end_of_turn>"] if gemma else ["<|im_start|>", "<|im_end|>"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=1200,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=not gemma,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece=names[0],
        eos_piece=names[1],
        bos_piece=names[2],
        unk_piece=names[3],
        user_defined_symbols=user,
        num_threads=1,
        minloglevel=2,
    )
    src = out.with_name(out.name + "-src")
    src.mkdir(parents=True, exist_ok=True)
    (src / "tokenizer.model").write_bytes(buf.getvalue())
    cls = transformers.GemmaTokenizer if gemma else transformers.LlamaTokenizer
    hf = cls.from_pretrained(
        src, bos_token=names[2], eos_token=names[1], unk_token=names[3], pad_token=names[0], add_bos_token=True
    )
    hf.chat_template = GEMMA_TEMPLATE if gemma else CHAT_TEMPLATE
    hf.save_pretrained(out)
    shutil.copy2(src / "tokenizer.model", out / "tokenizer.model")


def gguf_bundle(root: Path, gguf: Path, steps: tuple[str, ...] = ()) -> Path:
    """A bundle named ``smollm2-135m`` at ``root`` whose one variant, ``gguf-q4_1``, is ``gguf`` (linked);
    ``steps`` are cache keys its manifest lists, as ``convert`` records them."""
    from edgepack.bundle import Bundle, Variant

    b = Bundle.create(root, "smollm2-135m", {"ref": "smollm2-135m"})
    target = root / "variants" / "gguf-q4_1" / "model.gguf"
    target.parent.mkdir(parents=True)
    try:
        target.hardlink_to(gguf)
    except OSError:
        shutil.copyfile(gguf, target)
    b.add_variant(Variant("gguf-q4_1", "gguf", "llama.cpp", target.relative_to(root).as_posix(), [b.file_record(target)], 5.0))
    for key in steps:
        b.add_step({"stage": "test", "key": key})
    b.save()
    return root


def build_onnx(src: Path, out: Path) -> Path:
    """int4 CPU ONNX folder of the checkpoint at ``src`` through edgepack's ONNX stage (round-to-nearest)."""
    from edgepack.converters.onnx import OnnxConfig, OnnxStage
    from edgepack.stages import Artifact, Kind

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    OnnxStage().run(Artifact(Kind.HF, src), OnnxConfig(precision="int4"), tmp)
    tmp.rename(out)
    return out
