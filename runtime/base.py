"""The one interface every runtime backend implements.

A backend turns a model path into a ``Session``; everything else (the CLI's
``run``, the server, the chat app, evaluation) talks only to ``Session``.
A third backend implements ``Backend.load`` and the abstract methods of
``Session``; ``chat``/``generate`` and the template handling are shared.

Capabilities are class attributes, as in simonw/llm: callers check
``session.can_score`` rather than the backend's type.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}
Truncate = Literal["error", "left"]


@dataclass
class SamplingParams:
    """Sampling knobs shared by every backend; temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Completion:
    """A finished generation, with the counts and timings ``--json`` and the server report."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length", "cancelled"]
    ttft_s: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float


@dataclass
class ModelInfo:
    path: Path
    backend: str  # "llama.cpp" | "onnx"
    device: str  # "cpu" | "cuda" | "metal"
    n_ctx: int
    name: str = ""
    variant: str | None = None


class Session(ABC):
    """A loaded model. Calls on one session are serialised by ``lock``; ``cancel`` may come from any thread."""

    can_score: ClassVar[bool] = True
    can_stream: ClassVar[bool] = True

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.lock = threading.RLock()
        self._cancel = threading.Event()
        self.last: Completion | None = None

    # -- what a backend implements -----------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]: ...

    @abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str: ...

    @abstractmethod
    def stream_tokens(self, tokens: Sequence[int], params: SamplingParams) -> Iterator[str]:
        """Generate from prompt token ids, yielding text pieces; sets ``self.last`` when done."""

    @abstractmethod
    def score(self, tokens: Sequence[int]):
        """Log-probabilities of each next token: array [len(tokens) - 1] of log p(tokens[i+1] | tokens[:i+1])."""

    @abstractmethod
    def chat_template_tokens(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of ``messages`` formatted with the model's own chat template plus the generation prompt."""

    @abstractmethod
    def close(self) -> None: ...

    # -- shared ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the running generation after the current token; safe from any thread."""
        self._cancel.set()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
