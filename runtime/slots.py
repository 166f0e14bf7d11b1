"""Continuous batching on llama.cpp: ``n`` generations share one model (``Session.slots``, ``edgepack serve --parallel``).

One context holds one sequence per slot (llama.cpp's sequence ids; its cells split
evenly, as llama-server's ``-np`` splits ``-c``). One thread runs the steps, and a step
is one ``llama_decode`` of a batch holding the next token of every slot that is
answering and, in the room left (``n_batch``), the next part of prompts being read,
logits on only where a token is sampled: the mix llama-server builds. A request joins
between steps and leaves as soon as it ends, is cancelled or its reader lets go; a long
prompt holds the others back by one chunk per step, never for its whole length.

Prompt reuse: a slot remembers the tokens its sequence holds, and a request takes the
free slot whose tokens share the longest prefix with its prompt (the next turn of a
chat finds its conversation there), cuts the rest and reads only what is new.

A batch-invariant session (``load(batch_invariant=True)``) reads each prompt chunk in a step
of its own, every other step when slots are answering, and pads each step
(``llamacpp.decode_padded``), so a slot's tokens are the ones it would get decoded alone. The
chunk goes alone because llama.cpp splits a batch of several sequences into micro-batches with
as many tokens of each (``split_equal``), which can leave a prompt token alone in one.

Each slot's sampler chain comes from ``LlamaCppSession._sampler``, and its tokens reach
the reader through the same ``run_loop`` as a plain generation (stop strings, limits,
timings), so a slot ends exactly as ``Session.stream`` would. Pieces wait in an
unbounded queue (``max_tokens`` bounds it), so a slow reader never stalls a step.
"""

from __future__ import annotations

import codecs
import queue
import threading
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import BackendError
from .base import SamplingParams, Slots, Stream, _Run, run_loop
from .llamacpp import decode, decode_padded, keep, shared_prefix

if TYPE_CHECKING:
    from .llamacpp import LlamaCppSession

MIN_SLOT_CTX = 256  # llama.cpp rounds each sequence's cells up to a multiple of this (llama_context, n_ctx_seq)
_END = None  # in a request's queue: the generation ended


class _Request:
    """One generation handed to the batching thread; its pieces (then ``_END`` or an exception) arrive in ``out``."""

    def __init__(self, run: _Run, tokens: list[int], params: SamplingParams, limit: int) -> None:
        self.run, self.tokens, self.params, self.limit = run, tokens, params, limit
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.left = False  # the reader closed its stream: free the slot


class _Slot:
    """One sequence of the context and the request it answers, if any."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cached: list[int] = []  # the tokens the sequence holds, in order
        self.req: _Request | None = None
        self.chain = None  # the request's sampler chain
        self.todo: list[int] = []  # prompt tokens still to read
        self.next: int | None = None  # the token sampled last step, read into the cache this step
        self.made = 0  # tokens sampled for the request
        self.decoder = None
        self.used = 0  # step of the last request: among equal prefixes the least recently used slot is taken
        self.row = -1  # the batch row whose logits this slot samples from this step, -1 for none


class LlamaCppSlots(Slots):
    """The slots of one ``LlamaCppSession`` and the thread that batches them; made by ``LlamaCppSession.slots``."""

    def __init__(self, session: LlamaCppSession, n: int) -> None:
        from .llamacpp import ll

        self._ll, self._session = ll, session
        self.n, self.n_ctx = n, session.n_ctx
        self._slots = [_Slot(i) for i in range(n)]
        self._waiting: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._step = 0
        self._read_last = False  # batch-invariant: the last step read a prompt chunk, so the next one decodes
        self._thread = threading.Thread(target=self._loop, name="edgepack-slots", daemon=True)
        self._thread.start()

    @property
    def free(self) -> int:
        return sum(s.req is None for s in self._slots)

    def stream(self, tokens: list[int], **sampling: Any) -> Stream:
        """Like ``Session.stream`` on token ids (prompt too long: ContextOverflowError; bad options: UsageError)."""
        params = SamplingParams.from_kwargs(sampling)
        tokens, _ = self._session._fit([int(t) for t in tokens], params, "error")
        limit = min(params.max_tokens or self.n_ctx, self.n_ctx - len(tokens))
        return Stream(lambda run: run_loop(run, tokens, params, 0, self._pieces(_Request(run, tokens, params, limit)), self.n_ctx))

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    # -- the reader's side ------------------------------------------------------------------------
    def _pieces(self, req: _Request) -> Iterator[str]:
        """The request's text pieces as the batching thread makes them (``Session._generate``'s contract)."""
        with self._wake:
            if self._closing:
                raise BackendError("the slots are closed: the server is shutting down")
            self._waiting.append(req)
            self._wake.notify()
        try:
            while (item := req.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.left = True  # seen at the next step; a slot waiting for work is woken for it
            with self._wake:
                self._wake.notify()

    # -- the batching thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        ll = self._ll
        batch = ll.llama_batch_init(self._session._n_batch, 0, 1)
        try:
            while True:
                with self._wake:
                    while not self._closing and not self._waiting and all(s.req is None for s in self._slots):
                        self._wake.wait()
                    if self._closing:
                        return
                    self._admit()
                try:
                    self._run_step(batch)
                except Exception as e:  # noqa: BLE001 - a failed decode fails the requests in it, not the server
                    for s in self._slots:
                        if s.req is not None:
                            self._end(s, e)
                        s.cached.clear()
                    ll.llama_memory_clear(ll.llama_get_memory(self._session._ctx), True)
        finally:
            ll.llama_batch_free(batch)
            with self._wake:
                gone = BackendError("the server is shutting down")
                for s in self._slots:
                    if s.req is not None:
                        self._end(s, gone)
                while self._waiting:
                    self._waiting.popleft().out.put(gone)

    def _admit(self) -> None:
        """Give waiting requests free slots, the one sharing the longest prefix with the prompt first (caller holds ``_wake``)."""
        while self._waiting:
            req = self._waiting[0]
            if req.left or req.run.cancel.is_set():
                self._waiting.popleft().out.put(_END)
                continue
            free = [s for s in self._slots if s.req is None]
            if not free:
                return
            self._waiting.popleft()
            slot = max(free, key=lambda s: (shared_prefix(s.cached, req.tokens), -s.used))
            n = keep(self._session._ctx, slot.seq, slot.cached, req.tokens)
            req.run.cached = n
            self._step += 1
            slot.req, slot.todo, slot.next, slot.made, slot.used = req, req.tokens[n:], None, 0, self._step
            slot.chain = self._session._sampler(req.params, req.tokens)
            slot.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def _run_step(self, batch) -> None:
        """One ``llama_decode``: every answering slot's next token, then prompt chunks in the room left; then sample."""
        ll, session = self._ll, self._session
        for s in self._slots:
            if s.req is not None and (s.req.left or s.req.run.cancel.is_set()):
                self._end(s, _END)
        rows: list[tuple[_Slot, list[int]]] = []
        n = 0

        def add(slot: _Slot, tokens: list[int], sample: bool) -> None:
            nonlocal n
            pos = len(slot.cached)
            for i, t in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = t, pos + i, 1, False
                batch.seq_id[n][0] = slot.seq
                n += 1
            if sample:
                batch.logits[n - 1] = True
                slot.row = n - 1
            rows.append((slot, tokens))

        answering = [s for s in self._slots if s.req is not None and s.next is not None]
        reading = sorted((s for s in self._slots if s.req is not None and s.todo), key=lambda s: s.used)
        if session._invariant:  # a prompt chunk alone, in turn with the answering slots' tokens
            self._read_last = bool(reading) and not (answering and self._read_last)
            answering, reading = ([], reading[:1]) if self._read_last else (answering, [])
        for s in self._slots:
            s.row = -1
        for s in answering:
            add(s, [s.next], True)
        room = session._n_batch - n
        for s in reading:
            if room <= 0:
                break
            chunk, s.todo = s.todo[:room], s.todo[room:]
            add(s, chunk, not s.todo)
            room -= len(chunk)
        if not n:
            return
        session._pace()
        if session._invariant:
            rc = decode_padded(session._ctx, batch, n)
        else:
            batch.n_tokens = n
            rc = decode(session._ctx, batch)
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc} on a batch of {n} tokens: try fewer slots or a smaller n_ctx")
        for s, tokens in rows:
            s.cached += tokens
        for s in self._slots:
            if s.row < 0:
                continue
            tok = session._sample(s.chain, s.row)
            if ll.llama_vocab_is_eog(session._vocab, tok):
                self._end(s, _END)
                continue
            s.req.out.put(s.decoder.decode(session._piece(tok)))
            s.made += 1
            s.next = tok
            if s.made >= s.req.limit:
                self._end(s, _END)

    def _end(self, slot: _Slot, outcome: BaseException | None) -> None:
        """Free ``slot`` at once; its reader gets ``outcome`` (``_END`` or an error) after the pieces already sent."""
        slot.req.out.put(outcome)
        self._ll.llama_sampler_free(slot.chain)
        slot.req, slot.chain, slot.todo, slot.next, slot.decoder = None, None, [], None, None

