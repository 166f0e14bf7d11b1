"""The one interface every runtime backend implements.

``edgepack.load`` turns a model path into a ``Session``; everything else (the
CLI's ``run``, the server, the chat app, evaluation) talks only to ``Session``::

    s = edgepack.load("model.gguf")
    s.generate("Once upon a time", max_tokens=32, temperature=0).text
    for piece in s.chat_stream([{"role": "user", "content": "Hi"}]): print(piece, end="")
    s.score(s.tokenize("some text"), top_k=8).logprobs

A backend subclasses ``Session`` and implements the ``_``-prefixed abstract
methods plus ``tokenize``/``detokenize``; prompt checks, stop strings, timing,
cancellation, chat templates and locking are shared here, so backends agree.

Threading: one generation at a time per session (a plain ``Lock``, so a stream
started on one thread may be consumed and closed on another, as a server's
executor does). A ``Stream`` holds the lock from its first ``next()`` until it
ends or is closed: exhaust it, ``close()`` it, or use it as a context manager.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from ..errors import ContextOverflowError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from .tools import ToolUse

# {"role": "system"|"user"|"assistant", "content": "..."}; also {"role": "tool", "content", "tool_call_id"}
# and {"role": "assistant", "content": None, "tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}]}
Message = dict[str, Any]
Truncate = Literal["error", "left"]
Prompt = str | Sequence[int]


@dataclass
class SamplingParams:
    """Sampling knobs shared by every backend; ``temperature=0`` means greedy.

    ``max_tokens=None`` generates until end of text or a full context.
    ``top_k=0``, ``top_p=1``, ``min_p=0`` and ``repeat_penalty=1`` switch that filter off.
    ``repeat_penalty`` covers every token in the context (prompt and output), as in transformers.
    ``schema`` (a JSON schema; ``{"type": "object"}`` for any object) or ``grammar`` (llama.cpp
    GBNF, root rule ``root``) constrains every sampled token, so the answer is a valid JSON
    text of that schema (``schema`` module) or a string of that grammar once it ends by itself.
    """

    max_tokens: int | None = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    grammar: str | None = None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> SamplingParams:
        """Build from keyword arguments, raising UsageError on unknown names or out-of-range values."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UsageError(f"unknown sampling option(s) {', '.join(unknown)}: use {', '.join(sorted(known))}")
        p = cls(**{k: v for k, v in kwargs.items() if v is not None or k in ("max_tokens", "seed")})
        if p.schema is not None and p.grammar is not None:
            raise UsageError("give schema or grammar, not both")
        if p.schema is not None:
            from .schema import check

            check(p.schema)
        if p.grammar is not None and (not isinstance(p.grammar, str) or "root" not in p.grammar):
            raise UsageError("grammar must be llama.cpp GBNF text with a rule named root")
        if isinstance(p.stop, str):
            p.stop = [p.stop]
        p.stop = [s for s in p.stop if s]
        checks = [
            ("max_tokens", p.max_tokens is None or p.max_tokens >= 1, "at least 1"),
            ("temperature", p.temperature >= 0, ">= 0 (0 is greedy)"),
            ("top_p", 0 < p.top_p <= 1, "in (0, 1]"),
            ("top_k", p.top_k >= 0, ">= 0 (0 switches it off)"),
            ("min_p", 0 <= p.min_p < 1, "in [0, 1)"),
            ("repeat_penalty", p.repeat_penalty > 0, "> 0 (1 switches it off)"),
            ("seed", p.seed is None or 0 <= p.seed < 2**32, "in [0, 2**32)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UsageError(f"{name} must be {rule}, got {getattr(p, name)!r}")
        return p


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model made (``Completion.tool_calls``); ``arguments`` is JSON text of an object, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def to_json(self) -> dict[str, Any]:
        """OpenAI's shape, as an assistant message's ``tool_calls`` holds it."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Completion:
    """A finished generation, with the counts and timings ``--json``, the server and bench report."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length", "cancelled", "tool_calls"]
    ttft_s: float  # prompt in -> first token out (prefill plus one sampling step)
    prefill_tokens_per_s: float  # prompt tokens read (those not reused from the cache) over ttft_s
    decode_tokens_per_s: float  # tokens after the first, over the time after the first
    wall_s: float
    truncated_tokens: int = 0  # prompt tokens dropped by truncate="left"
    cached_tokens: int = 0  # leading prompt tokens reused from the previous generation's cache, not read again
    tool_calls: list[ToolCall] = field(default_factory=list)  # a chat with tools: the calls; ``text`` is then the rest

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tool_calls"}
        if self.tool_calls:  # only a chat with tools has them
            out["tool_calls"] = [c.to_json() for c in self.tool_calls]
        return out


@dataclass
class Scores:
    """What ``Session.score`` returns for tokens ``t[0..n-1]``; row i is about predicting ``t[i+1]``.

    ``rest_logprob`` is log(1 - sum of the top-k probabilities): with the top-k
    it bounds KL and cross-entropy estimates without the full vocabulary.
    """

    logprobs: np.ndarray  # [n-1] float64: log p(t[i+1] | t[:i+1])
    top_ids: np.ndarray | None = None  # [n-1, k] int64, most likely first
    top_logprobs: np.ndarray | None = None  # [n-1, k] float64
    rest_logprob: np.ndarray | None = None  # [n-1] float64

    @classmethod
    def empty(cls, rows: int, top_k: int) -> Scores:
        import numpy as np

        k = top_k or None
        return cls(
            np.empty(rows),
            np.empty((rows, k), dtype=np.int64) if k else None,
            np.empty((rows, k)) if k else None,
            np.empty(rows) if k else None,
        )

    @classmethod
    def of(cls, logits: np.ndarray, next_ids: Sequence[int], top_k: int) -> Scores:
        """Scores of one forward's logits [n, vocab] for the ``n`` next tokens (see ``fill``)."""
        scores = cls.empty(len(next_ids), min(top_k, logits.shape[-1]))
        scores.fill(0, logits, next_ids)
        return scores

    def fill(self, start: int, logits: np.ndarray, next_ids: Sequence[int], block: int = 64) -> None:
        """Store rows ``start..`` from raw logits [m, vocab], log-softmaxed in float64 ``block`` rows at a time."""
        import numpy as np

        k = 0 if self.top_ids is None else self.top_ids.shape[1]
        for r in range(0, len(logits), block):
            x = np.asarray(logits[r : r + block], dtype=np.float64)
            rows = slice(start + r, start + r + len(x))
            lse = _logsumexp(x)
            self.logprobs[rows] = x[np.arange(len(x)), np.asarray(next_ids[r : r + len(x)])] - lse
            if k:
                idx = np.argpartition(-x, k - 1, axis=1)[:, :k]
                vals = np.take_along_axis(x, idx, axis=1)
                order = np.argsort(-vals, axis=1, kind="stable")
                self.top_ids[rows] = np.take_along_axis(idx, order, axis=1)
                self.top_logprobs[rows] = np.take_along_axis(vals, order, axis=1) - lse[:, None]
                np.put_along_axis(x, idx, -np.inf, axis=1)  # what is left outside the top k, exactly
                self.rest_logprob[rows] = _logsumexp(x) - lse


@dataclass
class ModelInfo:
    path: Path  # the file or folder the backend loaded
    backend: str  # "llama.cpp" | "onnx"
    device: str  # "cpu" | "cuda" | "metal"
    n_ctx: int
    threads: int | None = None
    kv_type: str = "f16"  # element type of the KV cache
    draft: str | None = None  # how it drafts tokens ("lookup", "model"), when it does
    batch_invariant: bool = False  # a token's numbers do not depend on the batch it is decoded in (``load(batch_invariant=True)``)
    name: str = ""
    variant: str | None = None  # the bundle variant id, when loaded from a bundle
    bundle: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {f.name: str(v) if isinstance(v, Path) else v for f in fields(self) if (v := getattr(self, f.name)) is not None}


class _Run:
    """One generation's shared state. The loop holds this, never the ``Stream``, so a stream
    dropped unfinished is freed at once and its loop's ``finally`` releases the session.
    ``cached`` is set by whoever runs the model: prompt tokens it found in its cache."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.completion: Completion | None = None
        self.cached = 0


class Stream(Iterator[str]):
    """Text pieces of one generation; ``completion`` is set once it ends (by stop, length or cancel).

    ``drive`` starts the generation loop for a ``_Run`` (``Session._drive``, or a server slot's ``run_loop``).
    """

    def __init__(self, drive: Callable[[_Run], Iterator[str]]) -> None:
        self._run = _Run()
        self._gen = drive(self._run)

    @property
    def completion(self) -> Completion | None:
        return self._run.completion

    def __next__(self) -> str:
        return next(self._gen)

    def cancel(self) -> None:
        """Stop this generation after the current token (or before it starts); safe from any thread."""
        self._run.cancel.set()

    def close(self) -> None:
        """Abandon the generation and release the session."""
        self._gen.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What a backend's "no chat template" error tells the user to do instead.
NO_TEMPLATE_HINT = "complete a prompt of your own instead (`edgepack run MODEL PROMPT --raw`, or generate() in Python)"


class Session(ABC):
    """A loaded model. See the module docstring for the API and the threading rules."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.last: Completion | None = None  # the most recent finished generation
        self._lock = threading.Lock()
        self._running: _Run | None = None
        self._template = None
        self._held: IO[bytes] | None = None

    # -- what a backend implements ------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        """Token ids of ``text``; special-token text like ``<|im_start|>`` is parsed as in transformers.

        ``add_special`` adds what the tokenizer adds around a sequence (e.g. BOS), like
        transformers' ``add_special_tokens``.
        """

    @abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str: ...

    @abstractmethod
    def _generate(self, tokens: list[int], params: SamplingParams, cancelled: threading.Event) -> Iterator[str]:
        """Yield one text piece per generated token (``""`` while a UTF-8 sequence is incomplete).

        Stops by returning at an end-of-generation token; the caller stops it at max_tokens,
        stop strings or cancel. ``cancelled`` may be polled during a long prefill.
        """

    @abstractmethod
    def _score(self, tokens: list[int], top_k: int) -> Scores: ...

    @abstractmethod
    def _chat_template(self) -> tuple[str, dict[str, str]]:
        """The model's jinja chat template and its special-token variables (``bos_token``, ``eos_token``)."""

    @abstractmethod
    def _close(self) -> None: ...

    def _check_constraint(self, params: SamplingParams) -> None:
        """Raise UsageError when this backend cannot enforce ``params.schema`` or ``params.grammar``."""
        if params.schema is not None or params.grammar is not None:
            raise UsageError(f"the {self.info.backend} backend cannot constrain output to a schema or grammar: load a GGUF or ONNX variant")

    # -- public API -----------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self.info.n_ctx

    def generate(self, prompt: Prompt, *, truncate: Truncate = "error", **sampling: Any) -> Completion:
        """Complete raw text (or token ids); the tokenizer's own specials (e.g. BOS) are added to text.

        Raises ContextOverflowError when prompt + max_tokens exceeds n_ctx and truncate="error";
        with truncate="left" the oldest prompt tokens are dropped instead (a leading BOS stays).
        """
        return self._finish(self.stream(prompt, truncate=truncate, **sampling))

    def stream(self, prompt: Prompt, *, truncate: Truncate = "error", **sampling: Any) -> Stream:
        """Like ``generate`` but returns a ``Stream`` of text pieces."""
        params = SamplingParams.from_kwargs(sampling)
        self._check_constraint(params)
        tokens = self.tokenize(prompt, add_special=True) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise UsageError("the prompt is empty: give some text")
        tokens, dropped = self._fit(tokens, params, truncate)
        return Stream(lambda run: self._drive(run, tokens, params, dropped))

    def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] = "auto",
        truncate: Truncate = "error",
        **sampling: Any,
    ) -> Completion:
        """Answer a conversation formatted with the model's own chat template.

        ``tools`` (OpenAI's shape) are rendered by the template and the model's calls come back in
        ``tool_calls`` (finish_reason "tool_calls"); ``tool_choice`` as in OpenAI's API (see ``tool_use``).
        With truncate="left", the oldest non-system messages are dropped whole until it fits;
        ContextOverflowError if even the last message does not fit. UsageError for a template without tool support.
        """
        return self._finish(self.chat_stream(messages, tools=tools, tool_choice=tool_choice, truncate=truncate, **sampling))

    def chat_stream(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] = "auto",
        truncate: Truncate = "error",
        **sampling: Any,
    ) -> Stream:
        """Like ``chat`` but returns a ``Stream``; with tools it yields the content only, the calls are in ``completion``."""
        params = SamplingParams.from_kwargs(sampling)
        msgs = _check_messages(messages)
        if not tools and tool_choice not in ("auto", "none"):
            raise UsageError("`tool_choice` needs `tools`: list the functions the model may call", option="tool_choice")
        use = self.tool_use(tools, tool_choice) if tools else None
        tools = use.tools if use else None
        if use and use.grammar:
            if params.schema is not None or params.grammar is not None:
                raise UsageError("a forced tool_choice constrains the answer to a call: leave out schema and grammar", option="tool_choice")
            params.grammar = use.grammar
        self._check_constraint(params)
        tokens = self.chat_tokens(msgs, tools=tools)
        dropped = 0
        if truncate == "left":
            system = msgs[:1] if msgs[0]["role"] == "system" else []
            rest = msgs[len(system) :]
            while len(rest) > 1 and self._needed(tokens, params) > self.n_ctx:
                rest = rest[1:]
                while len(rest) > 1 and rest[0]["role"] != "user":  # templates may insist on user first
                    rest = rest[1:]
                shorter = self.chat_tokens(system + rest, tools=tools)
                dropped += len(tokens) - len(shorter)
                tokens = shorter
        tokens, _ = self._fit(tokens, params, "error")
        drive = lambda run: self._drive(run, tokens, params, dropped)  # noqa: E731
        parser = use.parser() if use else None
        if parser is None:
            return Stream(drive)
        from .tools import ToolStream

        return ToolStream(drive, parser)

    def chat_tokens(
        self, messages: Sequence[Message], *, tools: Sequence[dict[str, Any]] | None = None, add_generation_prompt: bool = True
    ) -> list[int]:
        """The exact ids a chat feeds the model: equal to transformers' ``apply_chat_template(tokenize=True)``."""
        return self.tokenize(self.format_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt))

    def format_chat(
        self, messages: Sequence[Message], *, tools: Sequence[dict[str, Any]] | None = None, add_generation_prompt: bool = True
    ) -> str:
        """``messages`` (and ``tools``) rendered with the model's chat template (the text ``chat_tokens`` tokenizes).

        Raises UsageError when there are tools, tool calls or tool results and the template has no tool support.
        """
        from .chat_template import render
        from .tools import for_template

        source, specials = self._chat_template_cached()
        msgs, tools = for_template(source, _check_messages(messages), tools)
        return render(source, msgs, specials, add_generation_prompt=add_generation_prompt, tools=tools)

    def tool_use(self, tools: Sequence[dict[str, Any]], tool_choice: str | dict[str, Any] = "auto", *, parallel: bool = True) -> ToolUse:
        """``tools`` and ``tool_choice`` checked against this model's chat template: a ``tools.ToolUse``.

        ``tool_choice``: "auto" (the model decides), "none" (no calls are read), "required" or
        ``{"type": "function", "function": {"name": ...}}``. ``parallel=False`` keeps one call per answer.
        Raises UsageError naming the field at fault, or when the template has no tool support.
        """
        from .tools import use

        return use(self._chat_template_cached()[0], tools, tool_choice, parallel=parallel)

    def _chat_template_cached(self) -> tuple[str, dict[str, str]]:
        if self._template is None:
            self._template = self._chat_template()
        return self._template

    def score(self, tokens: Sequence[int], *, top_k: int = 0) -> Scores:
        """Log-probabilities of each next token, and with ``top_k`` the k likeliest per position.

        Raises ContextOverflowError when the tokens exceed n_ctx (score windows yourself).
        """
        tokens = [int(t) for t in tokens]
        if len(tokens) < 2:
            raise UsageError(f"score needs at least 2 tokens, got {len(tokens)}")
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(len(tokens), self.n_ctx)
        if not 0 <= top_k <= 1000:
            raise UsageError(f"top_k must be in [0, 1000], got {top_k}")
        with self._lock:
            return self._score(tokens, top_k)

    def embed(self, inputs: Sequence[str] | Sequence[Sequence[int]], *, normalize: bool = True) -> np.ndarray:
        """One vector per input (a text, or its token ids), float32 ``[n, dim]``; unit length, as OpenAI's are, unless ``normalize=False``.

        Texts get the tokenizer's specials (e.g. BOS), as in ``generate``; each is pooled as its
        backend documents (llama.cpp: the model's declared pooling, else the mean of the tokens'
        last hidden states). Embedding may run while a generation streams on another thread.
        Raises UsageError (no inputs, an empty one, a backend or model that cannot embed) and
        ContextOverflowError (an input longer than n_ctx: shorten or split it, or load with a larger n_ctx).
        """
        import numpy as np

        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or not inputs:
            raise UsageError(f"embed takes a non-empty list of texts (or of token-id lists), got {inputs!r:.60}: e.g. embed(['some text'])")
        tokens = []
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                ids = self.tokenize(x, add_special=True) if x else []
            elif isinstance(x, Sequence) and not isinstance(x, bytes) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
                ids = list(x)
            else:
                raise UsageError(f"input {i} must be a string or a list of token ids, got {type(x).__name__}")
            if not ids:
                raise UsageError(f"input {i} is empty: give some text")
            if len(ids) > self.n_ctx:
                raise ContextOverflowError(
                    len(ids), self.n_ctx, f"input {i} has {len(ids)} tokens but the context holds {self.n_ctx}: shorten or split it, or load with a larger n_ctx"
                )
            tokens.append(ids)
        vectors = np.asarray(self._embed(tokens), dtype=np.float32)
        if normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors /= np.where(norms > 0, norms, 1)
        return vectors

    def _embed(self, tokens: list[list[int]]) -> np.ndarray:
        """Pooled, unnormalized vectors [n, dim] of token lists that each fit n_ctx; a backend that can embed overrides this."""
        raise UsageError(f"the {self.info.backend} backend cannot embed text: load a GGUF variant (llama.cpp) for embeddings")

    def cancel(self) -> None:
        """Stop the running generation after the current token; safe from any thread. No-op when idle."""
        running = self._running
        if running is not None:
            running.cancel.set()

    def close(self) -> None:
        """Free the model; waits for a running generation to stop first."""
        self.cancel()
        with self._lock:
            self._close()
            if self._held is not None:
                self._held.close()
                self._held = None

    @property
    def draft_stats(self) -> dict[str, int] | None:
        """Draft tokens ``proposed`` and ``accepted``, and the target's ``checks`` of them, in the last generation that drafted; None when none did."""
        return None

    def hold(self, lock: IO[bytes] | None) -> None:
        """Keep ``lock`` (a bundle's, ``library.hold``) open until the session closes."""
        self._held = lock

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"<{type(self).__name__} {i.name or i.path} {i.backend}/{i.device} n_ctx={i.n_ctx}>"

    # -- shared machinery -----------------------------------------------------------------------
    def _needed(self, tokens: list[int], params: SamplingParams) -> int:
        return len(tokens) + (params.max_tokens or 1)

    def _fit(self, tokens: list[int], params: SamplingParams, truncate: Truncate) -> tuple[list[int], int]:
        if truncate not in ("error", "left"):
            raise UsageError(f"truncate must be 'error' or 'left', got {truncate!r}")
        needed = self._needed(tokens, params)
        if needed <= self.n_ctx:
            return tokens, 0
        if truncate == "error":
            raise ContextOverflowError(needed, self.n_ctx)
        # What the tokenizer puts first (BOS) stays first: the model expects it.
        head = self.tokenize("", add_special=True)
        head = head if head and tokens[: len(head)] == head else []
        keep = self.n_ctx - (params.max_tokens or 1) - len(head)
        if keep < 1:
            raise ContextOverflowError(needed, self.n_ctx)
        return head + tokens[len(tokens) - keep :], len(tokens) - len(head) - keep

    def _finish(self, stream: Stream) -> Completion:
        with stream:
            for _ in stream:
                pass
        assert stream.completion is not None
        return stream.completion

    def _drive(self, run: _Run, tokens: list[int], params: SamplingParams, truncated: int) -> Iterator[str]:
        """One generation on this session: holds the lock around ``run_loop`` over the backend's ``_generate``."""
        with self._lock:
            self._running = run
            try:
                yield from run_loop(run, tokens, params, truncated, self._generate(tokens, params, run.cancel), self.n_ctx)
            finally:
                self._running = None
                self.last = run.completion

    def _reused(self, n: int) -> None:
        """A backend's ``_generate`` reports the leading prompt tokens it kept in its cache (prompt reuse)."""
        if self._running is not None:
            self._running.cached = n

    def slots(self, n: int) -> Slots:
        """``n`` generations at once on this model, each step decoding all of them in one batch (``edgepack serve --parallel``).

        The session hands its context over: use only the returned ``Slots`` (and ``tokenize``,
        ``chat_tokens``) afterwards. Raises UsageError when the backend runs one generation at a time.
        """
        raise UsageError(f"the {self.info.backend} backend runs one generation at a time: serve it with --parallel 1")


class Slots(ABC):
    """Parallel generations on one model (``Session.slots``): ``stream`` as ``Session.stream``, ``free``/``n`` for /health."""

    n: int  # slots
    n_ctx: int  # context of each slot

    @property
    @abstractmethod
    def free(self) -> int:
        """Slots not running a generation now."""

    @abstractmethod
    def stream(self, tokens: list[int], **sampling: Any) -> Stream:
        """A generation on a free slot (or the next one to free up); raises like ``Session.stream``."""

    @abstractmethod
    def close(self) -> None:
        """Cancel what runs and stop the batching thread."""


def run_loop(run: _Run, tokens: list[int], params: SamplingParams, truncated: int, gen: Iterator[str], n_ctx: int) -> Iterator[str]:
    """The generation loop every backend and every slot shares: stop strings, limits, cancel, timing.

    ``gen`` yields one text piece per token (``Session._generate``'s contract); the pieces are
    re-yielded with stop strings held back and cut, and ``run.completion`` is set when it ends.
    """
    limit = min(params.max_tokens or n_ctx, n_ctx - len(tokens))
    hold = max((len(s) for s in params.stop), default=0)  # text held back: may start a stop string
    text, emitted, n, reason, flushing = "", 0, 0, "length", False
    t0 = time.perf_counter()
    t_first = t_last = t0
    try:
        if run.cancel.is_set():
            reason = "cancelled"
        else:
            reason = "stop"
            for piece in gen:
                t_last = time.perf_counter()
                n += 1
                if n == 1:
                    t_first = t_last
                text += piece
                if hold:
                    cut = min((i for s in params.stop if (i := text.find(s, max(0, emitted - hold))) >= 0), default=-1)
                    if cut >= 0:
                        text = text[:cut]
                        break
                    safe = len(text) - hold + 1
                else:
                    safe = len(text)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
                if run.cancel.is_set():
                    reason = "cancelled"
                    break
                if n >= limit:
                    reason = "length"
                    break
            else:  # the backend returned: end of text, or it saw the cancel (e.g. during prefill)
                if run.cancel.is_set():
                    reason = "cancelled"
        if len(text) > emitted:
            flushing = True
            yield text[emitted:]
    except GeneratorExit:  # the consumer closed the stream early
        if not flushing:
            reason = "cancelled"
        raise
    finally:
        gen.close()
        now = time.perf_counter()
        ttft = (t_first - t0) if n else now - t0
        cached = run.cached
        run.completion = Completion(
            text=text,
            prompt_tokens=len(tokens),
            completion_tokens=n,
            finish_reason=reason if n or reason == "cancelled" else "stop",
            ttft_s=ttft,
            prefill_tokens_per_s=(len(tokens) - cached) / ttft if n and ttft > 0 else 0.0,
            decode_tokens_per_s=(n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else 0.0,
            wall_s=now - t0,
            truncated_tokens=truncated,
            cached_tokens=cached,
        )


def _logsumexp(x: np.ndarray) -> np.ndarray:
    import numpy as np

    top = x.max(axis=1)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(x - safe[:, None]).sum(axis=1))


def _check_messages(messages: Sequence[Message]) -> list[Message]:
    """Validate a conversation, raising UsageError with the first problem found."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls") is not None):
            from .tools import check_message

            out.append(check_message(i, m))
            continue
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UsageError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        out.append(m)
    return out
