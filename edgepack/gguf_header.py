"""Reading a GGUF header without gguf-py, and the header keys edgepack itself adds.

gguf-py's GGUFReader parses every tensor record and the whole vocabulary;
sizing a KV cache or choosing how to load a model needs a few scalars.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from .errors import InvalidModelError

# transformers' Metaspace prepend scheme ("first" or "always") of a SentencePiece-style vocabulary.
# llama.cpp has no key for it: its tokenizer puts the space before every stretch of text, so
# edgepack's runtime loads such a file without llama.cpp's prefix and applies this rule itself.
PREPEND_SCHEME = "edgepack.tokenizer.prepend_scheme"
# Ids of added tokens that swallow the whitespace before (lstrip) or after (rstrip) them in transformers.
# llama.cpp sets those flags only from its own model-name rules (Phi-3's), so the runtime applies these.
LSTRIP_TOKENS = "edgepack.tokenizer.lstrip_tokens"
RSTRIP_TOKENS = "edgepack.tokenizer.rstrip_tokens"

# The first long array of a GGUF edgepack writes: its own tokenizer keys come before it, so the
# runtime reads the header only that far (a 262k-token vocabulary takes ~0.2 s to skip).
VOCAB_START = "tokenizer.ggml.tokens"

# GGUF value types (gguf-py's GGUFValueType): struct format of each fixed-size one; 8 is string, 9 array
_GGUF_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: Path, *, stop_at: str | None = None) -> dict[str, Any]:
    """The scalar key/values (and short numeric arrays) of a GGUF header, skipping the long arrays.

    With ``stop_at``, only the keys before that one. Raises InvalidModelError.
    """

    def read(fmt: str):
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise InvalidModelError(f"{path} ends inside its GGUF header: re-download or re-convert it")
        return struct.unpack("<" + fmt, data)[0]

    def string() -> str:
        return f.read(read("Q")).decode("utf-8", "replace")

    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF" or read("I") < 2:
            raise InvalidModelError(f"{path} is not a GGUF file (v2 or later): re-download or re-convert it")
        read("Q")  # tensor count
        for _ in range(read("Q")):
            key = string()
            if key == stop_at:
                break
            vtype = read("I")
            if vtype in _GGUF_FIXED:
                out[key] = read(_GGUF_FIXED[vtype])
            elif vtype == 8:
                out[key] = string()
            elif vtype == 9:
                etype, count = read("I"), read("Q")
                if etype in _GGUF_FIXED and count <= 4096:
                    out[key] = [read(_GGUF_FIXED[etype]) for _ in range(count)]
                elif etype in _GGUF_FIXED:
                    f.seek(count * struct.calcsize("<" + _GGUF_FIXED[etype]), 1)
                elif etype == 8:
                    for _ in range(count):
                        f.seek(read("Q"), 1)
                else:
                    raise InvalidModelError(f"{path}: GGUF key {key} holds nested arrays, which edgepack does not read")
            else:
                raise InvalidModelError(f"{path}: GGUF key {key} has unknown value type {vtype}: re-convert it")
    return out
