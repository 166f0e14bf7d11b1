"""Logits from real llama.cpp for the converter tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def llama_logits(path: Path, ids: list[int], n_ctx: int = 64) -> np.ndarray:
    """Every position's logits for ``ids`` (an f32 KV cache, so f32 files compare tightly with transformers)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )  # fmt: skip
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def random_ids(vocab: int, n: int = 24) -> list[int]:
    return [int(i) for i in np.random.default_rng(0).integers(10, vocab, n)]
