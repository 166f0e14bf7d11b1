"""Speculative decoding with a draft model: the draft proposes, the target checks the proposal in one batch.

The draft (a small model with the target's vocabulary: ``edgepack convert --to draft:q8_0`` makes one)
runs on its own llama.cpp context and guesses up to ``DRAFT_K`` tokens one by one, stopping early when
its own top token is less likely than ``CONFIDENT``; the target reads its last token and the guesses in
one ``llama_decode`` and keeps what it agrees with (Leviathan et al., 2023; Chen et al., 2023):

- greedy: the longest prefix of the guesses that equals the target's own greedy picks, then the
  target's pick after it, so the answer is the one plain greedy decoding gives;
- sampled: guess ``x`` drawn from the draft's distribution ``q`` is kept with probability
  ``min(1, p(x) / q(x))`` (``p``: the target's); at the first refusal the token is drawn from
  ``max(0, p - q)`` renormalised, and after a fully kept proposal one more from ``p``. Every emitted token
  then follows ``p`` exactly (``accept``), where ``p`` and ``q`` are what the sampler chain makes of the
  logits (``distribution``: top-k, top-p, min-p, temperature, llama.cpp's order).

Both contexts keep the tokens their KV cache holds; after each check the rejected tail is cut from
both (``llama_memory_seq_rm``), and the draft reads what it missed at the start of its next proposal.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BackendError, UsageError
from . import llamacpp as lc

if TYPE_CHECKING:
    from .base import SamplingParams

DRAFT_K = 5  # most tokens one proposal holds
CONFIDENT = 0.5  # the draft stops proposing when its top token's probability falls below this


def distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The probabilities llama.cpp's chain (top-k -> top-p -> min-p -> temperature -> dist) draws from, for one logits row."""
    z = logits.astype(np.float64)
    keep = np.ones(z.shape, bool)
    if 0 < params.top_k < z.size:
        keep[np.argpartition(-z, params.top_k)[params.top_k :]] = False
    if params.top_p < 1.0 or params.min_p > 0:
        p = _softmax(np.where(keep, z, -np.inf))
        if params.top_p < 1.0:  # the smallest set of likeliest tokens whose mass reaches top_p (at least one)
            order = np.argsort(-p, kind="stable")
            cut = int(np.searchsorted(np.cumsum(p[order]), params.top_p)) + 1
            keep[order[cut:]] = False
        if params.min_p > 0:
            keep &= p >= params.min_p * p.max()
    return _softmax(np.where(keep, z / params.temperature, -np.inf))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def accept(p: np.ndarray, q: np.ndarray, guesses: list[int], rng: np.random.Generator) -> tuple[int, int]:
    """The standard acceptance rule: (guesses kept, the token after them).

    ``p`` holds the target's distributions after each guess's position and one more row (``len(guesses) + 1``),
    ``q`` the draft's for each guess. Guess i is kept with probability min(1, p_i(x) / q_i(x)); the first one
    refused is replaced by a draw from max(0, p_i - q_i) renormalised; when all are kept the next token comes
    from the last row of ``p``.
    """
    for i, x in enumerate(guesses):
        if rng.random() * q[i][x] < p[i][x]:  # u < p/q without dividing by a q of 0
            continue
        residual = np.maximum(p[i] - q[i], 0.0)
        total = residual.sum()
        # p <= q everywhere only when p == q, where x is never refused: take p itself then against rounding
        return i, int(rng.choice(residual.size, p=residual / total if total > 0 else p[i]))
    return len(guesses), int(rng.choice(p[-1].size, p=p[-1]))


class DraftModel:
    """A draft GGUF on its own llama.cpp context, checked against the target it drafts for.

    Raises UsageError when its vocabulary differs from the target's (different token ids would make every
    guess wrong) or it has more parameters than the target (it would cost more than it saves), InvalidModelError
    or BackendError when llama.cpp cannot load it.
    """

    def __init__(self, path: Path, target, n_ctx: int) -> None:
        ll = lc.ll
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UsageError(f"the draft {path} is not a GGUF file: give the .gguf of a draft, e.g. one `edgepack convert --to draft:q8_0` made")
        self.path = path
        self._tok = lc.Vocab(path)
        mp = lc.model_params(target.info.device)
        if overrides := lc._kv_overrides(self._tok.overrides()):
            mp.kv_overrides = overrides
        self.model = ll.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise BackendError(f"llama.cpp could not load the draft {path}{lc._recent_log()}: check it with `edgepack inspect {path}`")
        self.ctx = None
        try:
            self._tok.bind(self.model)
            self._check(target)
            cp = ll.llama_context_default_params()
            cp.n_ctx, cp.n_seq_max = n_ctx, 1
            cp.n_batch = cp.n_ubatch = min(n_ctx, 512)
            cp.n_threads = cp.n_threads_batch = target._threads.most
            cp.no_perf, cp.flash_attn_type = True, ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cp.op_offload = target.info.device != "cpu"
            self.ctx = ll.llama_init_from_model(self.model, cp)
            if not self.ctx:
                raise BackendError(f"llama.cpp could not create the draft's context of {n_ctx} tokens{lc._recent_log()}: try a smaller n_ctx")
        except BaseException:
            self.close()
            raise
        self.n_vocab = self._tok.n_tokens
        self.kv: list[int] = []  # the tokens in the draft's KV cache
        self._batch = ll.llama_batch_init(512, 0, 1)

    def _check(self, target) -> None:
        ll = lc.ll
        mine, theirs = self._tok, target._tok
        name = self.path.name
        if mine.n_tokens != theirs.n_tokens:
            raise UsageError(
                f"the draft {name} has a vocabulary of {mine.n_tokens} tokens, the target {theirs.n_tokens}: a draft must share the "
                "target's tokenizer; build one from the target with `edgepack convert MODEL --to draft:q8_0`"
            )
        differ = next((i for i in range(mine.n_tokens) if ll.llama_vocab_get_text(mine.ptr, i) != ll.llama_vocab_get_text(theirs.ptr, i)), None)
        if differ is not None:
            raise UsageError(
                f"the draft {name} and the target name token {differ} differently (another tokenizer): a draft must share the "
                "target's tokenizer; build one from the target with `edgepack convert MODEL --to draft:q8_0`"
            )
        n_draft, n_target = ll.llama_model_n_params(self.model), ll.llama_model_n_params(target._model)
        if n_draft > n_target:
            raise UsageError(
                f"the draft {name} has {n_draft / 1e6:.1f}M parameters, more than the target's {n_target / 1e6:.1f}M: it would cost more than "
                "it saves; use a smaller draft (`edgepack convert --to draft:q8_0 --draft-layers N`)"
            )

    def _decode(self, tokens: list[int], start: int, threads: int) -> None:
        """Feed ``tokens`` at positions ``start``.., logits for the last one only."""
        ll, b = lc.ll, self._batch
        for chunk in range(0, len(tokens), 512):
            part = tokens[chunk : chunk + 512]
            for j, t in enumerate(part):
                b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = t, start + chunk + j, 1, False
                b.seq_id[j][0] = 0
            b.logits[len(part) - 1] = True
            b.n_tokens = len(part)
            ll.llama_set_n_threads(self.ctx, threads, threads)
            if (rc := lc.decode(self.ctx, b)) != 0:
                self.reset()
                raise BackendError(f"llama_decode failed with code {rc} in the draft{lc._recent_log()}: try a smaller n_ctx")
        self.kv += tokens

    def propose(self, sequence: list[int], k: int, threads: int, params: SamplingParams | None, rng) -> tuple[list[int], list[np.ndarray]]:
        """Up to ``k`` guesses after ``sequence`` (all tokens so far, the last one not yet read by the target) and, when
        sampling (``params``), the draft distribution each was drawn from."""
        ll = lc.ll
        n = lc.shared_prefix(self.kv, sequence[:-1])  # re-read at least the last token: its logits start the guesses
        if not ll.llama_memory_seq_rm(ll.llama_get_memory(self.ctx), 0, n, -1):
            self.reset()
            n = 0
        del self.kv[n:]
        self._decode(sequence[n:], n, threads)
        guesses, dists = [], []
        while True:
            logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            if params is None:
                tok = int(logits.argmax())
                z = logits - logits[tok]
                confidence = 1.0 / np.exp(z).sum()
            else:
                q = distribution(logits, params)
                tok = int(rng.choice(q.size, p=q))
                confidence = q.max()
                dists.append(q)
            if confidence < CONFIDENT:  # a likely miss costs a draft pass and a wider check: stop here
                dists = dists[: len(guesses)]
                break
            guesses.append(tok)
            if len(guesses) == k:
                break
            self._decode([tok], len(self.kv), threads)
        return guesses, dists

    def reset(self) -> None:
        lc.ll.llama_memory_clear(lc.ll.llama_get_memory(self.ctx), True)
        self.kv.clear()

    def close(self) -> None:
        ll = lc.ll
        if getattr(self, "_batch", None) is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx is not None:
            ll.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            ll.llama_model_free(self.model)
            self.model = None
