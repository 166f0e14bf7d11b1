"""The llama.cpp backend, through llama-cpp-python's low-level C API.

Not the ``Llama`` class: its ``eval`` copies the full logits row into a numpy
array after every token, and its sampler is rebuilt in Python. Here a token
costs one ``llama_decode`` and one ``llama_sampler_sample`` on a chain built
once per generation (penalties -> top-k -> top-p -> min-p -> temperature ->
dist, the order of llama.cpp's own defaults), and logits are read only by
``score``. Logs from llama.cpp are kept (the last lines go into error messages)
and printed only with EDGEPACK_DEBUG=1.

Where transformers tokenizes otherwise than llama.cpp can be told to, edgepack's
converter writes what transformers does into the GGUF (``gguf_header``), and
``tokenize`` does it around llama.cpp's tokenizer: a SentencePiece-style file
with transformers' Metaspace prepend scheme is loaded with llama.cpp's dummy
prefix off, and the space goes where transformers puts it (before the text's
first stretch, "first", or each stretch between special tokens, "always",
never before one that starts with a space); whitespace beside added tokens
that transformers strips (lstrip/rstrip) is dropped first. So token ids equal
transformers' for Llama 2, Mistral and Phi-3 tokenizers too.

Batch invariance (``batch_invariant=True``): llama.cpp's CPU kernels sum in an order that
depends on the batch's shape (ggml's tiled K-quant matmul from 8 rows, repacked weights in
groups of 4, llamafile's sgemm from 2 rows, per sequence in attention), so a token decoded
beside other slots' tokens, or in a drafted check, could get other last bits than alone and a
greedy pick at a near-tie flipped. The mode keeps one kernel per product: the tiled matmul off
(``_fix_tiled``), weights not repacked, an f16 cache without flash attention, no sequence with a
lone row (``decode_padded``), and prompt chunks in steps of their own (``slots``).
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import os
import queue
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import constants
from ..errors import BackendError, InvalidModelError, MissingDependencyError, UsageError
from ..gguf_header import LSTRIP_TOKENS, PREPEND_SCHEME, RSTRIP_TOKENS, VOCAB_START, gguf_metadata
from .base import NO_TEMPLATE_HINT, ModelInfo, SamplingParams, Scores, Session
from .schema import grammar
from .registry import Backend
from .lookup import DRAFT_MAX, PromptLookup
from .threads import Governor, physical_cores

if TYPE_CHECKING:
    from .slots import LlamaCppSlots

# llama_cpp itself, imported by _init() on first use: importing this module (as the registry does) loads no library.
ll = None
_LOG = collections.deque(maxlen=20)
# KV-cache element types: ggml_type values (ggml.h), as llama_context_params.type_k/type_v take them, and bytes per
# element (ggml's blocks: 32 values in 34 bytes for q8_0, in 18 for q4_0)
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
EMBED_SEQS = 64  # texts one embedding batch may hold
# What Rust's char::is_whitespace (the tokenizers library's lstrip/rstrip) counts, as UTF-8.
_WS = rb"(?:[\t\n\v\f\r ]|\xc2[\x85\xa0]|\xe1\x9a\x80|\xe2\x80[\x80-\x8a\xa8\xa9\xaf]|\xe2\x81\x9f|\xe3\x80\x80)+"
_LEADING_WS, _TRAILING_WS = re.compile(b"^" + _WS), re.compile(_WS + rb"\Z")
_init_lock = threading.Lock()
_log_callback = None  # kept alive here: llama.cpp holds a pointer to it
# ggml's tiled matmul for K-quants (ggml-cpu/tiled/tiled.cpp), used on batches of 8 rows or more: the switch is read once per
# process, at the first matmul, so the first session made here decides for every later one (``_fix_tiled``).
TILED_ENV = "GGML_CPU_TILED_MM"
_tiled: bool | None = None  # whether it is on in this process; None until a session was made


def _log(level: int, text: bytes, _data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", "replace")
    if level in (2, 3):  # warn, error
        _LOG.append(line.strip())
    if constants.debug():
        print(line, end="", file=sys.stderr, flush=True)


def _init():
    """Import llama_cpp, route its log through ``_log`` and start its backend, once; raises MissingDependencyError."""
    global ll, _log_callback
    with _init_lock:
        if ll is None:
            try:
                import llama_cpp
            except ImportError as e:  # a core dependency, but doctor reports a broken install
                raise MissingDependencyError("llama-cpp-python", purpose="running GGUF models") from e
            _log_callback = llama_cpp.llama_log_callback(_log)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            ll = llama_cpp
    return ll


class _ComputeThread:
    """The one thread that runs llama.cpp's graph computations (``llama_decode``) in this process.

    llama-cpp-python builds ggml with OpenMP, and libgomp keeps a team of worker threads for each
    thread that has run a parallel region, for as long as that thread lives; with more of them than
    cores it stops spinning between operations. SmolLM2 Q4_K_M on 2 cores then decoded 28 tok/s
    instead of 70 on any thread but the first to decode, while that one lived: an app's UI thread
    and then its workers, a server's generation and embedding threads. So every decode runs here,
    handed over and waited for (a few microseconds against milliseconds per token).
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._local = threading.local()
        self._thread = threading.Thread(target=self._serve, name="llama.cpp-compute", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            fn, args, box, done = self._jobs.get()
            try:
                box.append(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
                box.append(e)
            done.release()

    def __call__(self, fn, *args):
        if threading.current_thread() is self._thread:
            return fn(*args)
        done = getattr(self._local, "done", None)
        if done is None:  # this thread's signal: held while it waits, released by the compute thread
            done = self._local.done = threading.Lock()
            done.acquire()
        box: list = []
        self._jobs.put((fn, args, box, done))
        done.acquire()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]


_compute: _ComputeThread | None = None


def decode(ctx, batch) -> int:
    """``llama_decode`` on the compute thread (``_ComputeThread``); llama.cpp's return code."""
    global _compute
    if _compute is None:
        with _init_lock:
            if _compute is None:
                _compute = _ComputeThread()
    return _compute(ll.llama_decode, ctx, batch)


def _fix_tiled(invariant: bool) -> None:
    """Before a session's first context: turn ggml's tiled matmul off for a batch-invariant one; UsageError when it is too late.

    The tiled kernel sums in its own order, so a token's numbers would change with the rows around
    it. A later plain session is let run with it off too (the same answers, a little slower).
    """
    global _tiled
    with _init_lock:
        if _tiled is None:
            if invariant:
                os.environ[TILED_ENV] = "0"
            value = re.match(r"\s*([+-]?\d+)", os.environ.get(TILED_ENV, "1"))  # ggml reads it with atoi
            _tiled = value is None or int(value.group(1)) != 0
    if invariant and _tiled:
        raise UsageError(
            f"batch_invariant needs ggml's tiled matmul off ({TILED_ENV}=0), which llama.cpp reads once per process, and a model loaded "
            f"here before ran with it on: load batch-invariant models in a fresh process, or set {TILED_ENV}=0 before the first load"
        )


def decode_padded(ctx, batch, n: int) -> int:
    """``decode`` of ``batch``'s first ``n`` rows so no number a token gets depends on the rows beside it; llama.cpp's return code.

    llama.cpp's CPU matmul sums in another order for one row than for several (llamafile's sgemm
    takes 2 or more, ggml-cpu/llamafile/sgemm.cpp), and in attention the rows are one sequence's
    tokens: a token decoded alone took other f16 attention kernels than the same token checked
    with drafted ones (15 of 20 lookup answers matched). So a sequence with one row gets a copy
    of its token at the next position, whose cell is removed after. ``batch`` has room for ``n``
    more rows; the callers read logits by row index (the copies come last, without logits).
    """
    rows = collections.Counter(batch.seq_id[i][0] for i in range(n))
    pads = []
    for i in range(n):
        if rows[seq := batch.seq_id[i][0]] == 1:
            j = n + len(pads)
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = batch.token[i], batch.pos[i] + 1, 1, False
            batch.seq_id[j][0] = seq
            pads.append(j)
    batch.n_tokens = n + len(pads)
    rc = decode(ctx, batch)
    memory = ll.llama_get_memory(ctx)
    for j in pads:
        ll.llama_memory_seq_rm(memory, batch.seq_id[j][0], batch.pos[j], batch.pos[j] + 1)
    return rc


def _recent_log() -> str:
    lines = [x for x in _LOG if x]
    _LOG.clear()
    return f" (llama.cpp said: {lines[-1]})" if lines else ""


def devices() -> list[str]:
    """GPU first when this build of llama.cpp can offload, then CPU."""
    _init()
    out = []
    if ll.llama_supports_gpu_offload():
        info = ll.llama_print_system_info().decode(errors="replace").upper()
        out += [d for d, tag in (("cuda", "CUDA"), ("metal", "METAL")) if tag in info]
    return [*out, "cpu"]


def model_params(device: str, repack: bool = True):
    """llama.cpp's model parameters for ``device``, with its repacked weight buffers off unless ``repack`` and the build can use them.

    Repacked weights multiply with a kernel per batch size (ggml-cpu/repack.cpp: gemv for one row, gemm for
    groups of four), so batch-invariant sessions keep them off. On Sapphire Rapids CPUs (AMX_INT8) llama.cpp 0.3.36's AMX matmul segfaults on the first decode of Q4_1,
    Q8_0 and other types it repacks for AMX (reproduced with SmolLM2, and upstream: ggml-org/llama.cpp#20824),
    so there weights stay in plain CPU buffers (``use_extra_bufts``; llama-bench's ``--repack 0``).
    """
    _init()
    mp = ll.llama_model_default_params()
    mp.n_gpu_layers = 0 if device == "cpu" else -1  # -1: every layer
    if not repack or amx():
        mp.use_extra_bufts = False
    return mp


def amx() -> bool:
    """Whether this build of llama.cpp multiplies with Intel AMX tiles on this CPU."""
    _init()
    return "AMX_INT8 = 1" in ll.llama_print_system_info().decode(errors="replace")


def _kv_overrides(*parts: dict[str, bool | str]):
    """llama.cpp's array of load-time metadata overrides (ended by an empty key), or None for none."""
    items = [kv for part in parts for kv in part.items()]
    if not items:
        return None
    array = (ll.llama_model_kv_override * (len(items) + 1))()
    for entry, (key, value) in zip(array, items):
        entry.key = key.encode()
        if isinstance(value, bool):
            entry.tag, entry.value.val_bool = ll.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        else:
            entry.tag, entry.value.val_str = ll.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()
    return array


class Vocab:
    """llama.cpp's tokenizer of one GGUF, giving transformers' ids (see the module docstring).

    The ONNX backend tokenizes with it too, from the vocabulary-only GGUF edgepack writes into
    its folders (``open_vocab``): one tokenizer, so both backends give the same ids.
    """

    def __init__(self, path: Path) -> None:
        try:
            meta = gguf_metadata(path, stop_at=VOCAB_START)
        except InvalidModelError:  # a damaged header: llama.cpp's load says what is wrong with it
            meta = {}
        self.prepend = meta.get(PREPEND_SCHEME)
        self.lstrip, self.rstrip = set(meta.get(LSTRIP_TOKENS, ())), set(meta.get(RSTRIP_TOKENS, ()))
        self.ptr = None
        self.n_tokens = 0
        self._pieces: dict[int, bytes] = {}
        self._owned = None  # the vocabulary-only model this Vocab loaded itself (open_vocab)

    def overrides(self) -> dict[str, bool | str]:
        """Load-time metadata overrides so llama.cpp's tokenizer leaves transformers' rules to this class."""
        return {
            **({"tokenizer.ggml.add_space_prefix": False} if self.prepend else {}),
            # llama.cpp's own strip rule for models named Phi-3 would add to the tokens listed
            **({"general.name": ""} if self.lstrip or self.rstrip else {}),
        }

    def bind(self, model) -> None:
        self.ptr = ll.llama_model_get_vocab(model)
        self.n_tokens = ll.llama_vocab_n_tokens(self.ptr)

    def specials(self) -> dict[str, str]:
        """The text of BOS and EOS, as chat templates read them (``bos_token``, ``eos_token``)."""
        out = {}
        for name, fn in (("bos_token", ll.llama_vocab_bos), ("eos_token", ll.llama_vocab_eos)):
            tok = fn(self.ptr)
            if tok >= 0:
                out[name] = ll.llama_vocab_get_text(self.ptr, tok).decode("utf-8", "replace")
        return out

    def stream(self):
        """A function from each generated token to its new text (a UTF-8 character split across tokens waits)."""
        decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        return lambda token: decode(self.piece(token))

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        if (self.prepend or self.lstrip or self.rstrip) and data:
            data = self._as_transformers(data)
        return self._tokenize(data, add_special)

    def _as_transformers(self, data: bytes) -> bytes:
        """``data`` with transformers' whitespace stripping and Metaspace prefixes applied (module docstring)."""
        special = ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_USER_DEFINED | ll.LLAMA_TOKEN_ATTR_UNKNOWN
        specials, cursor = [], 0  # (start, end, id) of each special token, from a first, prefix-free split
        for tok in self._tokenize(data, False):
            if ll.llama_vocab_get_attr(self.ptr, tok) & special:
                text = ll.llama_vocab_get_text(self.ptr, tok)
                start = data.find(text, cursor)  # by search: llama.cpp's own lstrip/rstrip rules skip whitespace
                specials.append((start, start + len(text), tok))
                cursor = start + len(text)
            else:
                cursor += len(self.piece(tok))
        bounds = [0, *(x for start, end, _ in specials for x in (start, end)), len(data)]
        stretches = [data[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2)]
        for i, (_, _, tok) in enumerate(specials):
            if tok in self.lstrip:
                stretches[i] = _TRAILING_WS.sub(b"", stretches[i])
            if tok in self.rstrip:
                stretches[i + 1] = _LEADING_WS.sub(b"", stretches[i + 1])
        prefixed = range(len(stretches)) if self.prepend == "always" else [0] if self.prepend == "first" else []
        for i in prefixed:
            if stretches[i] and not stretches[i].startswith(b" "):
                stretches[i] = b" " + stretches[i]
        out = bytearray(stretches[0])
        for (start, end, _), stretch in zip(specials, stretches[1:]):
            out += data[start:end] + stretch
        return bytes(out)

    def _tokenize(self, data: bytes, add_special: bool) -> list[int]:
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.ptr, data, len(data), buf, cap, add_special, True)
        if n < 0:
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.ptr, data, len(data), buf, cap, add_special, True)
        if n < 0:
            raise BackendError(f"llama.cpp failed to tokenize {len(data)} bytes of text: report it with the text")
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` with special tokens written out, like transformers' ``decode``."""
        ids = (ll.llama_token * len(tokens))(*tokens)
        cap = max(64, 8 * len(tokens))
        buf = ctypes.create_string_buffer(cap)
        n = ll.llama_detokenize(self.ptr, ids, len(tokens), buf, cap, False, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_detokenize(self.ptr, ids, len(tokens), buf, -n, False, True)
        text = buf.raw[:n].decode("utf-8", "replace")
        return text[1:] if self.prepend and text.startswith(" ") else text  # transformers strips the prefix once

    def piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = ll.llama_token_to_piece(self.ptr, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self.ptr, token, buf, -n, 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def close(self) -> None:
        if self._owned is not None:
            ll.llama_model_free(self._owned)
            self._owned = self.ptr = None


def open_vocab(path: Path) -> Vocab:
    """The tokenizer of the GGUF at ``path`` without its weights (llama.cpp's vocab-only load); close() frees it."""
    _init()
    vocab = Vocab(path)
    mp = ll.llama_model_default_params()
    mp.vocab_only = True
    if overrides := _kv_overrides(vocab.overrides()):
        mp.kv_overrides = overrides
    model = ll.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise InvalidModelError(f"llama.cpp could not read the tokenizer {path}{_recent_log()}: re-convert the model")
    vocab._owned = model
    vocab.bind(model)
    return vocab


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    n, most = 0, min(len(a), len(b))
    while n < most and a[n] == b[n]:
        n += 1
    return n


def keep(ctx, seq: int, cached: list[int], tokens: list[int]) -> int:
    """Cut sequence ``seq`` of ``ctx`` back to the prefix its ``cached`` tokens share with ``tokens``; that prefix's length.

    ``cached`` is trimmed to match. The last two tokens of ``tokens`` are always read again: the
    last one's logits start the answer, and one token alone would run other kernels than a prompt
    does (llamafile's sgemm takes batches of 2 or more), so a greedy answer could part from the
    one a cold prompt gives at a near-tie (seen on SmolLM2 Q4_1 with the same prompt twice).
    """
    n = shared_prefix(cached, tokens[: max(0, len(tokens) - 2)])
    memory = ll.llama_get_memory(ctx)
    if not ll.llama_memory_seq_rm(memory, seq, n, -1):  # a recurrent model's state cannot be cut back: start over
        ll.llama_memory_seq_rm(memory, seq, -1, -1)
        n = 0
    del cached[n:]
    return n


class LlamaCppSession(Session):
    """A GGUF on llama.cpp. ``batch_invariant``: every token's numbers are the same whatever rows share its batch (module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        device: str,
        n_ctx: int | None,
        threads: int | None,
        kv_type: str = "f16",
        draft: str | Path | None = None,
        batch_invariant: bool = False,
    ) -> None:
        _init()
        self._draft, self._counts, self._drafter = draft, None, None
        if batch_invariant and kv_type != "f16":
            raise UsageError(
                f"batch_invariant needs an f16 KV cache, not {kv_type}: a quantized cache needs flash attention, whose CPU decode "
                "splits each row's sum by thread count; drop kv_type (--kv-type) or batch_invariant (--batch-invariant)"
            )
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise InvalidModelError(f"{path} is not a GGUF file (bad magic): re-download or re-convert it")
        _fix_tiled(batch_invariant)
        self._invariant, self._rows = batch_invariant, None  # _rows: the batch ``_decode_rows`` fills, made on first need
        mp = model_params(device, repack=not batch_invariant)
        self._tok = Vocab(path)
        if overrides := _kv_overrides(self._tok.overrides()):
            mp.kv_overrides = overrides
        self._model = ll.llama_model_load_from_file(str(path).encode(), mp)
        if not self._model:
            raise BackendError(f"llama.cpp could not load {path}{_recent_log()}: check it with `edgepack inspect {path}`")
        self._tok.bind(self._model)
        self._vocab, self._n_vocab = self._tok.ptr, self._tok.n_tokens
        trained = ll.llama_model_n_ctx_train(self._model)
        n_ctx = min(n_ctx or 4096, trained)  # past the trained context quality drops without warning
        self._threads = Governor(threads or physical_cores(), fixed=threads is not None)
        self._kv_type = kv_type
        self._cpu = device == "cpu"
        self._ctx = self._new_context(n_ctx, 1)
        if not self._ctx:
            ll.llama_model_free(self._model)
            self._model = None
            hint = "try a smaller n_ctx" if kv_type == "f16" else f"try a smaller n_ctx, or kv_type='f16' (a {kv_type} cache needs flash attention on {device})"
            raise BackendError(f"llama.cpp could not create a context of {n_ctx} tokens{_recent_log()}: {hint}")
        self._n_threads = self._threads.most
        self._kv: list[int] = []  # the tokens in the KV cache, in order: what the next prompt may reuse
        self._slots: LlamaCppSlots | None = None
        self._ids = np.arange(self._n_vocab, dtype=np.int32)
        self._candidates = None  # the token arrays ``_sample`` reuses, made on first need
        self._one = (ll.llama_token * 1)()
        self._embedder, self._embed_lock = None, threading.Lock()  # embed()'s own context, made on its first call
        super().__init__(
            ModelInfo(path=path, backend="llama.cpp", device=device, n_ctx=ll.llama_n_ctx(self._ctx), threads=self._threads.most, kv_type=kv_type,
                      draft="model" if isinstance(draft, Path) else draft, batch_invariant=batch_invariant)
        )
        if isinstance(draft, Path):  # a draft model (``speculative``): checked against this model, so loaded after it
            from .speculative import DraftModel

            try:
                self._drafter = DraftModel(draft, self, self.info.n_ctx)
            except BaseException:
                self._close()
                raise

    def _new_context(self, n_ctx: int, n_seq: int):
        """A llama.cpp context of ``n_ctx`` tokens holding ``n_seq`` sequences of ``n_ctx / n_seq`` each; NULL when it fails."""
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_seq_max = n_seq
        cp.kv_unified = False  # each sequence its own cells: one slot cannot fill the cache of another
        cp.n_batch = cp.n_ubatch = self._n_batch = min(n_ctx, 512)
        cp.n_threads = cp.n_threads_batch = self._threads.most
        cp.no_perf = True
        cp.type_k = cp.type_v = KV_TYPES[self._kv_type]
        # llama.cpp keeps a quantized V cache only with flash attention. With an f16 cache it stays off: on the CPU its
        # decode splits the attention by thread, so greedy answers changed with the thread count (which follows the
        # machine's load, ``threads``), and it decoded slower (SmolLM2 Q4_K_M, 1024-token prompt, 2 threads: 38.9 vs
        # 65.7 tok/s; prefill 532 vs 443 tok/s).
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED if self._kv_type == "f16" else ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if self._cpu:
            cp.op_offload = False  # keep big prefill matmuls off a GPU the caller did not ask for
        return ll.llama_init_from_model(self._model, cp)

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        self._check_open()
        return self._tok.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` with special tokens written out, like transformers' ``decode``."""
        self._check_open()
        return self._tok.detokenize(tokens)

    def _piece(self, token: int) -> bytes:
        return self._tok.piece(token)

    def _chat_template(self) -> tuple[str, dict[str, str]]:
        self._check_open()
        src = ll.llama_model_chat_template(self._model, None)
        if not src:
            raise UsageError(f"{self.info.path} has no chat template (tokenizer.chat_template), so it cannot chat: {NO_TEMPLATE_HINT}")
        return src.decode("utf-8"), self._tok.specials()

    # -- running -------------------------------------------------------------------------------
    def _reset(self) -> None:
        ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
        self._kv.clear()

    def _reuse(self, tokens: list[int]) -> int:
        """Keep the cached tokens ``tokens`` starts with (prompt reuse) and drop the rest; how many were kept.

        At least the last two prompt tokens are read again (``keep``).
        """
        n = keep(self._ctx, 0, self._kv, tokens)
        self._reused(n)
        return n

    def _pace(self) -> None:
        """Set the thread count the governor gives for the next ``llama_decode`` (``threads`` module)."""
        n = self._threads.update()
        if n != self._n_threads:
            ll.llama_set_n_threads(self._ctx, n, n)
            self._n_threads = n

    def _decode(self, batch, what: str) -> None:
        self._pace()
        rc = decode(self._ctx, batch)
        if rc != 0:
            self._reset()  # what the cache holds after a failed decode is not known
            raise BackendError(f"llama_decode failed with code {rc} while {what}{_recent_log()}: try a smaller n_ctx or prompt")

    def _decode_checked(self, batch, n: int) -> None:
        """Decode a drafted check's ``n`` rows (``decode_padded`` when batch-invariant: a check without guesses is a lone row)."""
        if not self._invariant:
            batch.n_tokens = n
            self._decode(batch, "generating")
            return
        self._pace()
        if (rc := decode_padded(self._ctx, batch, n)) != 0:
            self._reset()
            raise BackendError(f"llama_decode failed with code {rc} while generating{_recent_log()}: try a smaller n_ctx or prompt")

    def _prefill(self, tokens: list[int], cancelled: threading.Event | None) -> int | None:
        """Feed the prompt past what the cache reuses in n_batch chunks, logits for the last token only.

        Returns the batch row whose logits start the answer (-1: the last), None if cancelled.
        """
        row = -1
        for start in range(self._reuse(tokens), len(tokens), self._n_batch):
            if cancelled is not None and cancelled.is_set():
                return None
            chunk = tokens[start : start + self._n_batch]
            if self._invariant:
                row = self._decode_rows(chunk, len(self._kv), "reading the prompt", logits=False)
            else:
                arr = (ll.llama_token * len(chunk))(*chunk)
                self._decode(ll.llama_batch_get_one(arr, len(chunk)), "reading the prompt")
            self._kv += chunk
        return row

    def _decode_rows(self, tokens: list[int], pos: int, what: str, *, logits: bool) -> int:
        """Batch-invariant decode (``decode_padded``) of ``tokens`` from position ``pos``, logits on the last or (``logits``) on each;
        the last token's row."""
        if self._rows is None:
            self._rows = ll.llama_batch_init(self._n_batch + 1, 0, 1)  # + a lone row's copy
        batch, n = self._rows, len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos + i, 1, logits or i == n - 1
            batch.seq_id[i][0] = 0
        self._pace()
        if (rc := decode_padded(self._ctx, batch, n)) != 0:
            self._reset()
            raise BackendError(f"llama_decode failed with code {rc} while {what}{_recent_log()}: try a smaller n_ctx or prompt")
        return n - 1

    def _sampler(self, params: SamplingParams, prompt: list[int]):
        """The sampler chain for ``params``; a schema or grammar puts llama.cpp's grammar sampler first (see ``_sample``)."""
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = ll.llama_sampler_chain_add
        text = params.grammar if params.schema is None else grammar(params.schema)
        if text is not None:
            constraint = ll.llama_sampler_init_grammar(self._vocab, text.encode(), b"root")
            if not constraint:
                ll.llama_sampler_free(chain)
                raise UsageError(f"llama.cpp refused the grammar{_recent_log()}: check its GBNF syntax (llama.cpp's grammars/README.md)")
            add(chain, constraint)
        if params.repeat_penalty != 1.0:
            add(chain, ll.llama_sampler_init_penalties(self._n_vocab, self.n_ctx, params.repeat_penalty, 0.0, 0.0))
        if params.temperature == 0:
            add(chain, ll.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(chain, ll.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                add(chain, ll.llama_sampler_init_min_p(params.min_p, 1))
            add(chain, ll.llama_sampler_init_temp(params.temperature))
            add(chain, ll.llama_sampler_init_dist(ll.LLAMA_DEFAULT_SEED if params.seed is None else params.seed))
        if params.repeat_penalty != 1.0:  # the prompt counts too, as in transformers
            for t in prompt:
                ll.llama_sampler_accept(chain, t)
        return chain

    def _sample(self, chain, idx: int) -> int:
        """The next token from batch row ``idx`` (-1: the last) by ``chain``, accepted into it.

        With a grammar first in the chain, llama.cpp's own shortcut (common/sampling.cpp): draw
        without the grammar, check that one token against it, and only when it is refused apply
        the grammar to the whole vocabulary and draw again. Checking every token of SmolLM2's
        49k each step cost a third of its decode speed (``benchmarks/structured.py``).
        """
        first = ll.llama_sampler_chain_get(chain, 0) if ll.llama_sampler_chain_n(chain) else None
        if first is None or ll.llama_sampler_name(first) != b"grammar":
            return ll.llama_sampler_sample(chain, self._ctx, idx)
        if self._candidates is None:
            data = np.zeros(self._n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data
            one = (ll.llama_token_data * 1)()
            self._candidates = (data, ll.llama_token_data_array(data.ctypes.data_as(ll.llama_token_data_p)), one,
                                ll.llama_token_data_array(one, 1, -1, False))  # fmt: skip
        data, view, one, single = self._candidates
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(self._ctx, idx), shape=(self._n_vocab,))
        apply, get, n = ll.llama_sampler_apply, ll.llama_sampler_chain_get, ll.llama_sampler_chain_n(chain)
        for full in (False, True):
            data["id"] = self._ids
            data["logit"] = logits
            view.size, view.selected, view.sorted = self._n_vocab, -1, False
            for i in range(0 if full else 1, n):
                apply(get(chain, i), ctypes.byref(view))
            tok = view.data[view.selected].id
            if full:
                break
            one[0].id, one[0].logit, one[0].p = tok, 0.0, 0.0
            single.size, single.selected = 1, -1
            apply(first, ctypes.byref(single))
            if one[0].logit != float("-inf"):
                break
        ll.llama_sampler_accept(chain, tok)
        return tok

    def _generate(self, tokens: list[int], params: SamplingParams, cancelled: threading.Event) -> Iterator[str]:
        self._check_single()
        if (row := self._prefill(tokens, cancelled)) is None:
            return
        if self._draft and params.repeat_penalty == 1.0 and not _constrained(params):
            if self._drafter is not None:
                yield from self._generate_drafted(tokens, params, row)
                return
            if params.temperature == 0:
                yield from self._generate_lookup(tokens, row)
                return
        chain = self._sampler(params, tokens)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        one, ctx, vocab, pace, kv = self._one, self._ctx, self._vocab, self._pace, self._kv
        sample, is_eog, batch_one = self._sample, ll.llama_vocab_is_eog, ll.llama_batch_get_one
        try:
            while True:
                tok = sample(chain, row)  # also accepts tok into the chain's history
                if is_eog(vocab, tok):
                    return
                yield decoder.decode(self._piece(tok))
                if self._invariant:
                    row = self._decode_rows([tok], len(kv), "generating", logits=True)
                else:
                    one[0] = tok
                    pace()
                    if decode(ctx, batch_one(one, 1)) != 0:
                        self._decode(batch_one(one, 1), "generating")
                kv.append(tok)
        finally:
            ll.llama_sampler_free(chain)

    @property
    def draft_stats(self) -> dict[str, int] | None:
        return None if self._counts is None else dict(self._counts)

    def _generate_lookup(self, tokens: list[int], row: int) -> Iterator[str]:
        """Greedy decoding that checks prompt-lookup drafts (``lookup``) in one batch per step.

        The batch holds the last token and the draft; the greedy pick after each position is the
        model's own next token, so the longest prefix of the draft that matches those picks is
        kept, with the pick after it, and the KV cache drops the rest: the same tokens as one
        token per pass, in fewer passes whenever the draft was right.
        """
        chain = self._sampler(SamplingParams(temperature=0), tokens)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        lookup = PromptLookup(tokens)
        counts = self._counts = {"proposed": 0, "accepted": 0, "checks": 0}
        memory, vocab, n_past = ll.llama_get_memory(self._ctx), self._vocab, len(self._kv)
        batch = ll.llama_batch_init(DRAFT_MAX + 1, 0, 1)
        try:
            tok = ll.llama_sampler_sample(chain, self._ctx, row)
            while not ll.llama_vocab_is_eog(vocab, tok):
                yield decoder.decode(self._piece(tok))
                lookup.extend([tok])
                draft = lookup.draft(min(DRAFT_MAX, self.n_ctx - n_past - 1))
                for i, t in enumerate([tok, *draft]):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, n_past + i, 1, True
                    batch.seq_id[i][0] = 0
                self._decode_checked(batch, len(draft) + 1)
                picks = [ll.llama_sampler_sample(chain, self._ctx, 0)]
                kept = 0
                while kept < len(draft) and draft[kept] == picks[-1]:
                    kept += 1
                    picks.append(ll.llama_sampler_sample(chain, self._ctx, kept))
                counts["proposed"] += len(draft)
                counts["accepted"] += kept
                counts["checks"] += 1
                n_past += kept + 1
                if kept < len(draft):
                    ll.llama_memory_seq_rm(memory, 0, n_past, -1)  # the rejected part of the draft
                self._kv += [tok, *draft[:kept]]
                for t in picks[:-1]:  # accepted draft tokens: already in the cache
                    if ll.llama_vocab_is_eog(vocab, t):
                        return
                    yield decoder.decode(self._piece(t))
                    lookup.extend([t])
                tok = picks[-1]
        finally:
            ll.llama_batch_free(batch)
            ll.llama_sampler_free(chain)

    def _generate_drafted(self, tokens: list[int], params: SamplingParams, first: int) -> Iterator[str]:
        """Decoding that checks a draft model's guesses in one batch per step (``speculative``).

        Greedy keeps the guesses that equal the target's own greedy picks, so the answer is plain greedy
        decoding's; sampling keeps them by the acceptance rule, so each token follows the target's
        distribution (drawn with numpy from ``params.seed``, not llama.cpp's sampler).
        """
        from .speculative import DRAFT_K, accept, distribution

        greedy = params.temperature == 0
        chain = self._sampler(SamplingParams(temperature=0), tokens) if greedy else None
        rng = np.random.default_rng(params.seed)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        counts = self._counts = {"proposed": 0, "accepted": 0, "checks": 0}
        memory, vocab, drafter, n_past = ll.llama_get_memory(self._ctx), self._vocab, self._drafter, len(self._kv)

        def row(i: int) -> np.ndarray:
            return distribution(np.ctypeslib.as_array(ll.llama_get_logits_ith(self._ctx, i), shape=(self._n_vocab,)), params)

        batch = ll.llama_batch_init(DRAFT_K + 1, 0, 1)
        try:
            tok = ll.llama_sampler_sample(chain, self._ctx, first) if greedy else int(rng.choice(self._n_vocab, p=row(first)))
            while not ll.llama_vocab_is_eog(vocab, tok):
                yield decoder.decode(self._piece(tok))
                self._pace()
                room = min(DRAFT_K, self.n_ctx - n_past - 1)
                guesses, q = drafter.propose([*self._kv, tok], room, self._n_threads, None if greedy else params, rng) if room > 0 else ([], [])
                for i, t in enumerate([tok, *guesses]):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, n_past + i, 1, True
                    batch.seq_id[i][0] = 0
                self._decode_checked(batch, len(guesses) + 1)
                if greedy:
                    picks = [ll.llama_sampler_sample(chain, self._ctx, 0)]
                    while len(picks) <= len(guesses) and guesses[len(picks) - 1] == picks[-1]:
                        picks.append(ll.llama_sampler_sample(chain, self._ctx, len(picks)))
                    kept, after = len(picks) - 1, picks[-1]
                else:
                    kept, after = accept([row(i) for i in range(len(guesses) + 1)], q, guesses, rng)
                counts["proposed"] += len(guesses)
                counts["accepted"] += kept
                counts["checks"] += 1
                n_past += kept + 1
                if kept < len(guesses):
                    ll.llama_memory_seq_rm(memory, 0, n_past, -1)  # the refused guesses
                self._kv += [tok, *guesses[:kept]]
                for t in guesses[:kept]:  # kept guesses: already in the cache
                    if ll.llama_vocab_is_eog(vocab, t):
                        return
                    yield decoder.decode(self._piece(t))
                tok = after
        finally:
            ll.llama_batch_free(batch)
            if chain is not None:
                ll.llama_sampler_free(chain)

    def _score(self, tokens: list[int], top_k: int) -> Scores:
        self._check_single()
        self._reset()
        n = len(tokens)
        scores = Scores.empty(n - 1, min(top_k, self._n_vocab))
        batch = ll.llama_batch_init(self._n_batch, 0, 1)
        try:
            for start in range(0, n - 1, self._n_batch):  # the last token needs no prediction
                m = min(self._n_batch, n - 1 - start)
                batch.n_tokens = m
                for j in range(m):
                    batch.token[j] = tokens[start + j]
                    batch.pos[j] = start + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = 1
                self._decode(batch, "scoring")
                logits = np.ctypeslib.as_array(ll.llama_get_logits(self._ctx), shape=(m, self._n_vocab))
                scores.fill(start, logits, tokens[start + 1 : start + 1 + m])
        finally:
            ll.llama_batch_free(batch)
        return scores

    def slots(self, n: int) -> LlamaCppSlots:
        """``n`` slots of ``n_ctx / n`` tokens each (rounded down to llama.cpp's 256), as llama-server's ``-np`` splits ``-c``.

        The session's context is replaced by one holding ``n`` sequences; ``n_ctx`` becomes the
        slot's. Raises UsageError when a slot would hold under 256 tokens, BackendError when
        llama.cpp cannot make the context.
        """
        from .slots import MIN_SLOT_CTX, LlamaCppSlots

        self._check_open()
        if n < 1:
            raise UsageError(f"the number of slots must be at least 1, got {n}")
        if self._slots is not None:
            raise UsageError("this session already serves slots: use the Slots it returned")
        if self._draft:
            raise UsageError(f"drafting ({self.info.draft}) checks one generation at a time: serve with --parallel 1, or without --draft")
        each = self.n_ctx // n // MIN_SLOT_CTX * MIN_SLOT_CTX
        if each < MIN_SLOT_CTX:
            raise UsageError(
                f"{n} slots leave {self.n_ctx // n} tokens of context each (n_ctx {self.n_ctx}); a slot needs at least {MIN_SLOT_CTX}: "
                "use fewer slots (--parallel) or a larger context (--n-ctx)"
            )
        with self._lock:
            ctx = self._new_context(each * n, n)
            if not ctx:
                raise BackendError(f"llama.cpp could not create a context of {n} x {each} tokens{_recent_log()}: use fewer slots or a smaller n_ctx")
            ll.llama_free(self._ctx)
            self._ctx, self._kv = ctx, []
            self.info.n_ctx = ll.llama_n_ctx_seq(ctx)
            self._slots = LlamaCppSlots(self, n)
        return self._slots

    # -- embeddings ----------------------------------------------------------------------------
    def _pooling(self) -> str:
        """How ``embed`` pools a text's last hidden states: the GGUF's ``{arch}.pooling_type``, else "mean".

        Embedding models declare theirs ("mean", "cls", "last"); a chat model declares none. For those the
        mean is the default: the last token's state is shaped to predict the next token, and on SmolLM2 the
        mean tells paraphrases from unrelated text by a wider margin (docs/runtime.md gives the numbers).
        Raises UsageError for a reranker ("rank" pooling), which scores pairs instead.
        """
        self._check_open()
        arch = self._meta("general.architecture")
        declared = self._meta(f"{arch}.pooling_type")
        kind = {None: "mean", "0": "mean", "1": "mean", "2": "cls", "3": "last"}.get(declared)
        if kind is None:
            raise UsageError(f"{self.info.path.name} is a reranker (pooling type {declared}), not an embedding model: it scores query-document pairs")
        if self._meta(f"{arch}.attention.causal") == "false":
            # Long texts are fed in chunks over the KV cache, which only a causal model reads the same way.
            raise UsageError(f"{self.info.path.name} attends both ways (an encoder): edgepack embeds with decoder models only")
        return kind

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_model_meta_val_str(self._model, key.encode(), buf, 64)
        return buf.value.decode() if n >= 0 else None

    def _embed(self, tokens: list[list[int]]) -> np.ndarray:
        """Texts packed into batches, one sequence each, on a second context that outputs hidden states.

        That context (``embeddings = True``, no pooling of its own: llama.cpp pools only a sequence
        that fits one micro-batch) is made on the first call, so generation memory is unchanged until
        then, and has its own lock, so a running generation neither blocks nor sees it. Short texts
        share a batch (one ``llama_decode`` for many); a text longer than a batch goes alone, in chunks.
        """
        bad = next(((i, t) for i, ids in enumerate(tokens) for t in ids if not 0 <= t < self._n_vocab), None)
        if bad is not None:
            raise UsageError(f"input {bad[0]} holds token id {bad[1]}, outside this model's vocabulary (0..{self._n_vocab - 1})")
        with self._embed_lock:
            self._check_open()
            if self._embedder is None:
                self._embedder = (self._embedding_context(), self._pooling())
            ctx, kind = self._embedder
            dim = ll.llama_model_n_embd_out(self._model)
            lengths = np.array([len(t) for t in tokens])
            out = np.zeros((len(tokens), dim))
            batch = ll.llama_batch_init(self._n_batch, 0, 1)
            try:
                for group in _packs(lengths, self._n_batch, EMBED_SEQS):
                    ll.llama_memory_clear(ll.llama_get_memory(ctx), True)  # also after a failed call
                    rows = [(i, seq, pos) for seq, i in enumerate(group) for pos in range(lengths[i])]
                    for start in range(0, len(rows), self._n_batch):
                        chunk = rows[start : start + self._n_batch]
                        for j, (i, seq, pos) in enumerate(chunk):
                            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = tokens[i][pos], pos, 1, True
                            batch.seq_id[j][0] = seq
                        batch.n_tokens = len(chunk)
                        n = self._threads.update()
                        ll.llama_set_n_threads(ctx, n, n)
                        if (rc := decode(ctx, batch)) != 0:
                            raise BackendError(f"llama_decode failed with code {rc} while embedding{_recent_log()}: try shorter inputs")
                        states = np.ctypeslib.as_array(ll.llama_get_embeddings(ctx), shape=(len(chunk), dim))
                        which = np.array([i for i, _, _ in chunk])
                        pos = np.array([p for _, _, p in chunk])
                        if kind == "mean":
                            np.add.at(out, which, states)
                        else:
                            keep = pos == (0 if kind == "cls" else lengths[which] - 1)
                            out[which[keep]] = states[keep]
            finally:
                ll.llama_batch_free(batch)
        return out / lengths[:, None] if kind == "mean" else out

    def _embedding_context(self):
        cp = ll.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = cp.n_ubatch = self._n_batch
        cp.n_seq_max, cp.kv_unified = EMBED_SEQS, True  # one cache for the packed texts, which never exceed n_ctx together
        cp.embeddings, cp.pooling_type = True, ll.LLAMA_POOLING_TYPE_NONE
        cp.n_threads = cp.n_threads_batch = self._threads.most
        cp.no_perf, cp.flash_attn_type = True, ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.op_offload = self.info.device != "cpu"
        ctx = ll.llama_init_from_model(self._model, cp)
        if not ctx:
            raise BackendError(f"llama.cpp could not create an embedding context of {self.n_ctx} tokens{_recent_log()}: try a smaller n_ctx")
        return ctx

    def _check_constraint(self, params: SamplingParams) -> None:
        """Schemas and grammars both hold here."""

    def _check_open(self) -> None:
        if self._ctx is None:
            raise UsageError("this session is closed: load the model again")

    def _check_single(self) -> None:
        self._check_open()
        if self._slots is not None:
            raise UsageError("this session serves parallel slots (Session.slots): generate through them")

    def _close(self) -> None:
        with self._embed_lock:
            if self._embedder is not None:
                ll.llama_free(self._embedder[0])
                self._embedder = None
        if self._slots is not None:
            self._slots.close()
            self._slots = None
        if self._drafter is not None:
            self._drafter.close()
            self._drafter = None
        if self._rows is not None:
            ll.llama_batch_free(self._rows)
            self._rows = None
        if self._ctx is not None:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            ll.llama_model_free(self._model)
            self._model = None

    def __del__(self, _finalizing=sys.is_finalizing) -> None:
        # A session dropped without close() frees its memory; at interpreter exit the OS does
        # (module globals such as ``ll`` may already be gone then, hence the bound default).
        if not _finalizing() and (getattr(self, "_ctx", None) is not None or getattr(self, "_model", None) is not None):
            self._close()



def _constrained(params: SamplingParams) -> bool:
    return params.schema is not None or params.grammar is not None


def _packs(lengths: np.ndarray, n_batch: int, n_seqs: int) -> Iterator[list[int]]:
    """Indices of texts to embed together: texts in order while they fit one batch, a longer text on its own."""
    group, rows = [], 0
    for i, n in enumerate(lengths):
        if group and (rows + n > n_batch or len(group) == n_seqs):
            yield group
            group, rows = [], 0
        group.append(i)
        rows += n
    if group:
        yield group


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    formats = ("gguf",)
    what = "a .gguf file"
    kv_types = KV_BYTES
    drafts = ("lookup", "model")
    can_embed = True
    can_parallel = True
    can_batch_invariant = True
    install = "install a GPU build of llama-cpp-python (CUDA: CMAKE_ARGS='-DGGML_CUDA=on' pip install --force-reinstall --no-cache-dir llama-cpp-python)"

    needs = {"llama_cpp": "llama-cpp-python"}

    def claims(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".gguf"

    def devices(self) -> list[str]:
        return devices()

    def open(
        self,
        path: Path,
        *,
        device: str,
        n_ctx: int | None,
        threads: int | None,
        kv_type: str = "f16",
        draft: str | Path | None = None,
        batch_invariant: bool = False,
    ) -> LlamaCppSession:
        return LlamaCppSession(path, device=device, n_ctx=n_ctx, threads=threads, kv_type=kv_type, draft=draft, batch_invariant=batch_invariant)

    def probe(self, device: str, folder: Path) -> bool:
        """Load a tiny model on ``device`` and decode two tokens."""
        path = folder / "probe.gguf"
        if not path.is_file():
            write_probe_gguf(path)
        with LlamaCppSession(path, device=device, n_ctx=16, threads=1) as session:
            return session.generate([1], max_tokens=2, temperature=0).completion_tokens > 0


BACKEND = LlamaCppBackend()


def write_probe_gguf(path: Path) -> None:
    """A one-block llama with random weights and a byte-level SentencePiece vocabulary: what every llama.cpp build loads."""
    import gguf

    embd, ff, vocab = 32, 64, 259
    tokens = [b"<unk>", b"<s>", b"</s>", *(f"<0x{i:02X}>".encode() for i in range(256))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(embd)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [6] * 256)  # unknown, control, control, then bytes
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (vocab, embd), "blk.0.attn_q": (embd, embd), "blk.0.attn_k": (embd, embd),
              "blk.0.attn_v": (embd, embd), "blk.0.attn_output": (embd, embd), "blk.0.ffn_gate": (ff, embd),
              "blk.0.ffn_up": (ff, embd), "blk.0.ffn_down": (embd, ff)}  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{name}.weight", np.ones(embd, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
