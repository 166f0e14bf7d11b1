"""The tokenizer half of a GGUF file, read from the tokenizer transformers itself would run.

The source is ``AutoTokenizer.from_pretrained``'s fast tokenizer serialised
back to JSON, not ``tokenizer.json`` as stored: transformers 5 rebuilds the
pipeline of known classes (a Llama tokenizer's Prepend normaliser becomes a
Metaspace pre-tokenizer), converts a lone SentencePiece ``tokenizer.model``,
and decides BOS/EOS itself, so add-BOS/EOS and the space prefix are read from
what the tokenizer *does* on a probe. This runs in a child process (with
torch hidden from transformers, which would otherwise import it) while the
parent plans the tensors, so the parent stays small.

Two llama.cpp tokenizer models are written:

``gpt2``  byte-level BPE: tokens and merges as HF stores them, plus
          ``tokenizer.ggml.pre``, the llama.cpp pre-tokenizer whose split
          regexes and merge rule equal the HF ones (table ``PRE_TOKENIZERS``).
``llama`` SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Phi-3,
          Gemma). llama.cpp merges the adjacent pair whose result scores
          highest, so each token scores minus the rank of the merge that
          makes it, which reproduces HF's merge order. llama.cpp puts the
          dummy-prefix space before every stretch of text; transformers'
          Metaspace pre-tokenizer only where its prepend scheme says (and never
          before text that starts with a space), so the scheme is written under
          ``edgepack.tokenizer.prepend_scheme`` for edgepack's runtime to apply.

Added tokens that transformers lets swallow the whitespace beside them
(``lstrip``/``rstrip``, Phi-3's chat tokens) are listed under
``edgepack.tokenizer.lstrip_tokens``/``rstrip_tokens`` for the same reason:
llama.cpp takes those flags only from model-name rules of its own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidModelError, UnsupportedArchitectureError
from ..gguf_header import LSTRIP_TOKENS, PREPEND_SCHEME, RSTRIP_TOKENS

# Split regexes as they appear in HF tokenizer.json files.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# (HF pre-tokenizer steps, BPE ignore_merges) -> the llama.cpp tokenizer.ggml.pre with the same
# regexes and merge rule (llama.cpp src/llama-vocab.cpp, the pre-type switch).
PRE_TOKENIZERS: dict[tuple[tuple[str, ...], bool], str] = {
    ((GPT2_SPLIT,), False): "gpt-2",  # GPT-2, Phi-2
    (("digits", GPT2_SPLIT), False): "smollm",  # SmolLM/SmolLM2, StarCoder: digits split one by one first
    ((LLAMA3_SPLIT,), True): "llama-bpe",  # Llama 3.x
    ((QWEN2_SPLIT,), False): "qwen2",  # Qwen2, Qwen2.5, Qwen3
}

# gguf.TokenType values, as llama.cpp reads them
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SUPPORTED = ["byte-level BPE", "BPE with byte fallback (SentencePiece)"]


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]  # bos/eos/unk/pad -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    prepend_scheme: str | None  # transformers' Metaspace rule where llama.cpp's differs
    lstrip: list[int]  # added tokens that swallow the whitespace before / after them
    rstrip: list[int]
    chat_template: str | list[dict[str, str]] | None

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        # edgepack's own keys before the token list: the runtime stops reading there (gguf_header.VOCAB_START)
        if self.prepend_scheme:
            writer.add_string(PREPEND_SCHEME, self.prepend_scheme)
        for key, ids in ((LSTRIP_TOKENS, self.lstrip), (RSTRIP_TOKENS, self.rstrip)):
            if ids:
                writer.add_array(key, ids)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(tid)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.model == "llama":
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


class VocabJob:
    """Reads a checkpoint's tokenizer with transformers in a child process; ``result`` collects it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dir = tempfile.TemporaryDirectory(prefix="edgepack-vocab-")
        self._out = Path(self._dir.name) / "facts.json"
        cmd = [sys.executable, "-m", __name__, str(path), str(self._out)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def result(self, n_vocab: int) -> Vocab:
        """Wait for the child; raises InvalidModelError or UnsupportedArchitectureError (see ``build_vocab``)."""
        try:
            _, err = self._proc.communicate()
            if self._proc.returncode != 0:
                last = (err.strip().splitlines() or ["no output"])[-1]
                raise InvalidModelError(
                    f"{self.path}: transformers cannot load its tokenizer ({last}): add tokenizer.json or tokenizer.model"
                )
            facts = json.loads(self._out.read_text())
        finally:
            self._dir.cleanup()
        return build_vocab(facts, n_vocab, self.path)

    def cancel(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate()
        self._dir.cleanup()


def read_facts(path: Path) -> dict:
    """What transformers' tokenizer for ``path`` is and does (runs in the child)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        return {"class": type(tok).__name__, "tokenizer": None}
    plain = tok("a", add_special_tokens=False)["input_ids"]
    return {
        "class": type(tok).__name__,
        "tokenizer": json.loads(tok.backend_tokenizer.to_str()),
        "specials": {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")},
        "probe_plain": plain,
        "probe_full": tok("a", add_special_tokens=True)["input_ids"],
        "probe_pieces": tok.convert_ids_to_tokens(plain),
        "chat_template": tok.chat_template,
    }


def build_vocab(facts: dict, n_vocab: int, path: Path) -> Vocab:
    """The GGUF vocabulary, padded with unused tokens to the embedding's ``n_vocab`` rows.

    Raises InvalidModelError when the tokenizer has more tokens than the
    embedding, UnsupportedArchitectureError for a tokenizer llama.cpp cannot
    reproduce (Unigram, WordPiece, no tokenizers backend, an unknown pre-tokenizer).
    """
    spec = facts["tokenizer"]
    if spec is None:
        raise UnsupportedArchitectureError(f"{facts['class']} tokenizer without a tokenizers backend", _SUPPORTED)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedArchitectureError(f"{model.get('type')} tokenizer", _SUPPORTED)
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= n_vocab:
        raise InvalidModelError(
            f"{path}: the tokenizer has {max(by_id) + 1} tokens but the embedding only {n_vocab} rows: the checkpoint is inconsistent"
        )
    spm = _uses_metaspace(spec)
    if spm and not model.get("byte_fallback"):
        raise UnsupportedArchitectureError("SentencePiece-style BPE without byte fallback", _SUPPORTED)
    tokens, types = [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:  # embedding rows past the tokenizer (vocabularies padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(TOKEN_CONTROL if added[i]["special"] else TOKEN_USER_DEFINED)
        else:
            tokens.append(text)
            types.append(_spm_type(text, model.get("unk_token")) if spm else TOKEN_NORMAL)
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    specials = {k: v for k, v in facts["specials"].items() if isinstance(v, int) and 0 <= v < n_vocab}
    plain, full = facts["probe_plain"], facts["probe_full"]
    template = facts["chat_template"]
    prefix = spm and bool(plain) and facts["probe_pieces"][0].startswith("\u2581")
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    return Vocab(
        model="llama" if spm else "gpt2",
        pre=None if spm else detect_pre(spec),
        tokens=tokens,
        types=types,
        scores=_spm_scores(tokens, pairs) if spm else None,
        merges=[] if spm else [" ".join(p) for p in pairs],
        special_ids=specials,
        add_bos=len(full) > len(plain) and full[0] == specials.get("bos"),
        add_eos=len(full) > len(plain) and full[-1] == specials.get("eos"),
        add_space_prefix=prefix,
        prepend_scheme=_metaspace_scheme(spec.get("pre_tokenizer")) if prefix else None,
        lstrip=sorted(i for i, a in added.items() if a.get("lstrip")),
        rstrip=sorted(i for i, a in added.items() if a.get("rstrip")),
        chat_template=template,
    )


def detect_pre(spec: dict) -> str:
    """The llama.cpp pre-tokenizer equal to the HF one; raises UnsupportedArchitectureError if none is."""
    hint = "llama.cpp would split text differently from transformers, so edgepack refuses to write this tokenizer."
    normalizer = spec.get("normalizer")
    if normalizer not in (None, {"type": "NFC"}):
        raise UnsupportedArchitectureError(f"byte-level BPE with a {normalizer.get('type')} normalizer", ["none", "NFC"], hint)
    steps = _pre_steps(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get((steps, bool(spec["model"].get("ignore_merges"))))
    if pre is None:
        shown = " + ".join(s if len(s) < 40 else s[:37] + "..." for s in steps) or "none"
        raise UnsupportedArchitectureError(f"byte-level BPE pre-tokenizer [{shown}]", sorted(set(PRE_TOKENIZERS.values())), hint)
    return pre


def _pre_steps(pre: dict | None) -> tuple[str, ...]:
    """A pre-tokenizer as its sequence of splits: regexes, 'digits', or the JSON of anything else."""
    if pre is None:
        return ()
    kind = pre["type"]
    if kind == "Sequence":
        return tuple(s for p in pre["pretokenizers"] for s in _pre_steps(p))
    if kind == "ByteLevel" and not pre.get("add_prefix_space"):
        return (GPT2_SPLIT,) if pre.get("use_regex", True) else ()
    if kind == "Digits" and pre.get("individual_digits"):
        return ("digits",)
    if kind == "Split" and pre.get("behavior") == "Isolated" and not pre.get("invert") and "Regex" in pre["pattern"]:
        return (pre["pattern"]["Regex"],)
    return (json.dumps(pre, sort_keys=True),)


def _uses_metaspace(spec: dict) -> bool:
    """SentencePiece style: the normaliser or a Metaspace pre-tokenizer turns spaces into U+2581."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return "\u2581" in text


def _metaspace_scheme(pre: dict | None) -> str | None:
    """A Metaspace pre-tokenizer's prepend scheme ("first", "always"); None without one (a Prepend normaliser is llama.cpp's rule)."""
    if not pre:
        return None
    if pre.get("type") == "Sequence":
        return next(filter(None, map(_metaspace_scheme, pre["pretokenizers"])), None)
    if pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") in ("first", "always"):
        return pre.get("prepend_scheme", "always")
    return None


def _spm_type(text: str, unk: str | None) -> int:
    if _BYTE_TOKEN.fullmatch(text):
        return TOKEN_BYTE
    return TOKEN_UNKNOWN if text == unk else TOKEN_NORMAL


def _spm_scores(tokens: list[str], pairs: list[list[str]]) -> list[float]:
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(pairs):
        rank.setdefault(a + b, r)
    floor = -float(len(pairs) + 1)  # multi-character tokens no merge makes are never preferred
    return [-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else floor) for t in tokens]


def main(argv: list[str]) -> int:
    """Child entry point: ``python -m edgepack.converters.gguf_vocab CHECKPOINT OUT.json``."""
    # Tokenizers need no torch; hiding it makes transformers skip its import (3x less CPU, 6x less memory).
    sys.modules["torch"] = None  # type: ignore[assignment]
    Path(argv[1]).write_text(json.dumps(read_facts(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
