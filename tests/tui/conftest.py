"""Fixtures for the chat tests: a scripted Session for pure UI tests, and a real two-variant bundle.

``ScriptedSession`` implements ``edgepack.runtime.base.Session`` like a backend does,
so the shared generation loop, chat template rendering, cancel and timing are the
real ones; only the tokens come from a script. Tests that need a model use the real
llama.cpp backend on SmolLM2 (see test_real.py).
"""

from __future__ import annotations

import math
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgepack.bundle import Bundle, Variant
from edgepack.errors import BackendError
from edgepack.runtime.base import ModelInfo, SamplingParams, Scores, Session
from edgepack.runtime.loader import Loader

REPLY = "## Paris\n\nThe capital of **France** is Paris.\n\n- population: about 2 million\n- river: `Seine`\n"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ScriptedSession(Session):
    """Answers every chat with ``reply``, one word per token.

    With ``gated=True`` each token waits for ``release()``, so a test can look at the
    screen mid-stream and stop it there; like a real backend, a waiting token gives
    up when the generation is cancelled.
    """

    def __init__(self, variant: str | None = None, *, reply: str = REPLY, gated: bool = False, n_ctx: int = 4096) -> None:
        super().__init__(ModelInfo(Path("scripted.gguf"), "llama.cpp", "cpu", n_ctx, name="scripted", variant=variant))
        self.reply = reply
        self.gate = threading.Semaphore(0) if gated else None
        self.vocab: dict[str, int] = {}
        self.prompts: list[str] = []  # the text of every prompt the model was given
        self.closed = False

    def release(self, n: int = 1) -> None:
        assert self.gate is not None
        self.gate.release(n)

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r"\s*\S+|\s+", text)]

    def detokenize(self, tokens) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return "".join(words[t] for t in tokens)

    def _generate(self, tokens: list[int], params: SamplingParams, cancelled: threading.Event) -> Iterator[str]:
        self.prompts.append(self.detokenize(tokens))
        for word in re.findall(r"\s*\S+|\s+", self.reply):
            while self.gate is not None and not self.gate.acquire(timeout=0.01):
                if cancelled.is_set():
                    return
            yield word

    def _score(self, tokens: list[int], top_k: int) -> Scores:
        return Scores(np.full(len(tokens) - 1, -math.log(max(len(self.vocab), 1))))

    def _chat_template(self) -> tuple[str, dict[str, str]]:
        return CHATML, {"bos_token": "", "eos_token": "<|im_end|>"}

    def _close(self) -> None:
        self.closed = True


class Opener(Loader):
    """The runtime's Loader opening ScriptedSessions by variant id and remembering them; ids in ``broken`` fail to load.

    Only ``open`` is replaced: switching variants, with its fallback, is the real ``Loader.switch``.
    """

    def __init__(self, *, variants: tuple[Variant, ...] | list[Variant] = (), variant: str | None = None, broken: tuple[str, ...] = (), **session_kwargs) -> None:
        super().__init__("scripted.gguf", variant=variant)
        self.variants = list(variants)
        self.broken = broken
        self.kwargs = session_kwargs
        self.opened: list[ScriptedSession] = []

    def open(self, variant: str | None) -> ScriptedSession:
        if variant in self.broken:
            raise BackendError(f"llama.cpp could not load variant {variant}: the file is damaged; re-run the conversion")
        session = ScriptedSession(variant or "q4_k_m", **self.kwargs)
        self.opened.append(session)
        return session


@pytest.fixture
def make_opener():
    """``make_opener(variants=..., variant=..., broken=(...), gated=..., n_ctx=...)`` gives an Opener of ScriptedSessions."""
    return Opener


@pytest.fixture
def reply() -> str:
    return REPLY


@pytest.fixture
def variants() -> list[Variant]:
    """Three variants as a bundle lists them; the scripted opener loads any of them."""
    files = [{"path": "variants/x/model.gguf", "bytes": 105_000_000, "sha256": "0" * 64}]
    return [
        Variant("q4_k_m", "gguf", "llama.cpp", "variants/q4_k_m/model.gguf", files, 4.85),
        Variant("q8_0", "gguf", "llama.cpp", "variants/q8_0/model.gguf", files, 8.5),
        Variant("int4", "onnx", "onnx", "variants/int4", files, 4.6),
    ]


@pytest.fixture
def two_variant_bundle(smollm2_gguf, tmp_path) -> Path:
    """A real bundle with two GGUF variants of SmolLM2 ("a" and "b": the same weights under two ids)."""
    root = tmp_path / "bundle"
    bundle = Bundle.create(root, "smollm2-135m", {"ref": str(smollm2_gguf), "origin": "file", "files": []})
    for vid in ("a", "b"):
        dest = root / "variants" / vid / "model.gguf"
        dest.parent.mkdir(parents=True)
        try:
            dest.hardlink_to(smollm2_gguf)  # same weights; 100 MB copies would only cost time
        except OSError:
            shutil.copyfile(smollm2_gguf, dest)
        bundle.add_variant(Variant(vid, "gguf", "llama.cpp", f"variants/{vid}/model.gguf", [bundle.file_record(dest)], 5.0))
    bundle.save()
    return root
