"""Logits from real llama.cpp for the converter tests, loaded with the runtime's own model parameters.

The low-level API rather than ``llama_cpp.Llama``: the runtime turns llama.cpp's AMX weight buffers off where
they crash (``edgepack.runtime.llamacpp.model_params``), and ``Llama`` would load with them on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def llama_logits(path: Path, ids: list[int], n_ctx: int = 64, *, threads: int = 2, f32_cache: bool = True) -> np.ndarray:
    """Every position's logits for ``ids`` (by default an f32 KV cache, so f32 files compare tightly with transformers)."""
    import llama_cpp as ll

    from edgepack.runtime.llamacpp import model_params

    model = ll.llama_model_load_from_file(str(path).encode(), model_params("cpu"))
    assert model, f"llama.cpp could not load {path}"
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = max(n_ctx, len(ids)), max(n_ctx, len(ids)), max(n_ctx, len(ids))
    cp.n_threads = cp.n_threads_batch = threads
    # flash attention off, as llama_cpp.Llama loads: with it, a tiny f32 model's logits stray 1.7e-2 from transformers' (5e-3 without)
    cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if f32_cache:
        cp.type_k = cp.type_v = ll.GGML_TYPE_F32
    ctx = ll.llama_init_from_model(model, cp)
    batch = ll.llama_batch_init(len(ids), 0, 1)
    try:
        for i, tok in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        assert ll.llama_decode(ctx, batch) == 0, "llama_decode failed"
        n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
        return np.ctypeslib.as_array(ll.llama_get_logits(ctx), shape=(len(ids), n_vocab)).copy()
    finally:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)


def random_ids(vocab: int, n: int = 24) -> list[int]:
    return [int(i) for i in np.random.default_rng(0).integers(10, vocab, n)]
