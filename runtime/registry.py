"""The backend registry: which backends exist, what each one runs and what it can do.

A backend is one module of this package that defines ``BACKEND``, an instance of a
``Backend`` subclass; adding one is that module plus its line in ``MODULES``. Every
consumer asks here: ``load`` (which backend claims a path, runs a bundle variant, on
which devices, with which install hint), bench, eval, doctor, inspect, recommend, the
server and the chat app. Nothing here imports a backend's library: modules are imported
on the first question, and each imports its library only when it loads or probes a model.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..errors import MissingDependencyError, UsageError

if TYPE_CHECKING:
    from .base import Session

# One line per backend, in order of preference: the first that runs a format runs it.
MODULES = (
    "edgepack.runtime.llamacpp",
    "edgepack.runtime.onnx",
    "edgepack.runtime.transformers",
)


class Backend(ABC):
    """What a backend declares. Subclass it, set the class attributes, implement the methods.

    The capabilities (``can_*``) say what its sessions do beyond tokenizing and generating:
    stream pieces as they are made, return log-probabilities (``score``, which eval needs),
    format chats with a template, stop mid-answer on ``cancel``, ``embed`` text.
    """

    name: ClassVar[str]  # "llama.cpp": what ``load(backend=...)``, ``--backend`` and ModelInfo.backend say
    formats: ClassVar[tuple[str, ...]]  # bundle variant formats it runs ("gguf")
    what: ClassVar[str]  # the lone model it claims, for messages ("a .gguf file")
    install: ClassVar[str]  # how to get its GPU build, for messages when a device is missing
    # Bytes a loaded model takes beyond its weights and KV cache, for recommend until bench measures it (None: recommend's default).
    overhead: ClassVar[int | None] = None
    # Whether its CPU sessions load a second, one-thread copy of the weights while other programs hold cores (ONNX
    # Runtime fixes a model's thread pool at load); recommend counts it, which a bench on an idle machine never sees.
    busy_copy: ClassVar[bool] = False
    can_stream: ClassVar[bool] = True
    can_score: ClassVar[bool] = True
    can_chat: ClassVar[bool] = True
    can_cancel: ClassVar[bool] = True
    can_parallel: ClassVar[bool] = False  # several generations at once, batched (``Session.slots``, ``serve --parallel``)
    can_embed: ClassVar[bool] = False  # Session.embed: pooled hidden states (a backend overrides Session._embed)
    # ``load(batch_invariant=True)``: a token's numbers do not depend on its batch; ``open`` then gets ``batch_invariant=True``.
    can_batch_invariant: ClassVar[bool] = False
    # KV-cache element types its sessions can hold (``load(kv_type=...)``) and the bytes each stores per element, for
    # recommend; "f16" is the backend's own default cache, whose real dtype recommend reads from the model.
    kv_types: ClassVar[dict[str, float]] = {"f16": 2.0}
    # Drafting its sessions can verify in one pass (``load(draft=...)``): "lookup" proposes tokens from the prompt, "model" a draft model.
    drafts: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def claims(self, path: Path) -> bool:
        """Whether ``load(path)`` with ``backend="auto"`` should run this lone file or folder here; cheap, imports nothing."""

    def accepts(self, path: Path) -> bool:
        """Whether this backend runs ``path`` when asked for by name (it may take more than it claims)."""
        return self.claims(path)

    # Modules running a format needs -> the distribution that brings each, and the extra that installs them (None: base).
    needs: ClassVar[dict[str, str]] = {}
    extra: ClassVar[str | None] = None

    def missing(self, fmt: str) -> str | None:
        """The first distribution running ``fmt`` needs that is not installed (found without importing it), or None."""
        return next((dist for module, dist in self.needs.items() if importlib.util.find_spec(module) is None), None)

    def ready(self, fmt: str) -> bool:
        """Whether this install has what running ``fmt`` needs (an optional extra, a removed library)."""
        return self.missing(fmt) is None

    def require(self, fmt: str) -> None:
        """Raise MissingDependencyError naming what to install (the extra, when it comes with one) unless ``ready``."""
        if (dist := self.missing(fmt)) is not None:
            raise MissingDependencyError(dist, extra=self.extra, purpose=f"running {fmt} variants with {self.name}")

    @abstractmethod
    def devices(self) -> list[str]:
        """Devices this install can run on, best first ("cuda", "cpu"); imports the library, raising MissingDependencyError."""

    @abstractmethod
    def open(
        self, path: Path, *, device: str, n_ctx: int | None, threads: int | None, kv_type: str = "f16", draft: str | Path | None = None
    ) -> Session:
        """Load the model at ``path`` on ``device`` with a KV cache of ``kv_type`` (one of ``kv_types``) and ``draft`` (one of ``drafts``;
        a Path for "model": the draft model's file).

        Raises InvalidModelError, BackendError, MissingDependencyError.
        """

    @abstractmethod
    def probe(self, device: str, folder: Path) -> bool:
        """For ``edgepack doctor``: run a tiny model (written under ``folder``) on ``device``; raises what failed."""

    def __repr__(self) -> str:
        return f"<backend {self.name}: {', '.join(self.formats)}>"


_registered: dict[str, Backend] | None = None


def _backends() -> dict[str, Backend]:
    global _registered
    if _registered is None:
        loaded = [importlib.import_module(m).BACKEND for m in MODULES]
        _registered = {b.name: b for b in loaded}
    return _registered


def backends() -> list[Backend]:
    """Every registered backend, in order of preference."""
    return list(_backends().values())


def names() -> list[str]:
    return list(_backends())


def get(name: str) -> Backend:
    """The backend called ``name``; raises UsageError listing the registered ones."""
    found = _backends().get(name)
    if found is None:
        raise UsageError(f"unknown backend {name!r}: choose auto, {', '.join(names())}")
    return found


def register(backend: Backend) -> Backend:
    """Add ``backend`` after the built-in ones (a test's, a plugin's); raises UsageError when its name is taken."""
    if backend.name in _backends():
        raise UsageError(f"a backend called {backend.name!r} is registered already: unregister it first or choose another name")
    _backends()[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _backends().pop(name, None)


def for_format(fmt: str) -> Backend | None:
    """The backend that runs bundle variants of format ``fmt`` (the first registered), or None."""
    return next((b for b in backends() if fmt in b.formats), None)


def claiming(path: Path) -> Backend | None:
    """The backend that claims the lone file or folder ``path``, or None."""
    return next((b for b in backends() if b.claims(path)), None)


def runs(fmt: str) -> bool:
    """Whether a registered backend runs ``fmt`` with what this install has (its extra included)."""
    b = for_format(fmt)
    return b is not None and b.ready(fmt)


def capabilities(name: str) -> dict[str, bool]:
    """What sessions of the backend ``name`` can do (``stream``, ``score``, ``chat``, ``cancel``, ``parallel``, ``embed``); all True for a backend not registered."""
    b = _backends().get(name)
    return {cap: getattr(b, f"can_{cap}", True) for cap in ("stream", "score", "chat", "cancel", "parallel", "embed")}
