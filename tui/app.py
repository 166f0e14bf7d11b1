"""The chat App (thin: it shows the chat screen and holds the quit key) and ``run_chat``, what ``edgepack chat`` calls."""

from __future__ import annotations

import os
import sys

from textual.app import App
from textual.binding import Binding

from ..errors import EdgepackError, UsageError
from ..runtime.base import SamplingParams, Truncate
from ..runtime.loader import Loader
from .screens import ChatScreen


class ChatApp(App[EdgepackError | None]):
    """Returns the error that stopped it from starting (a model that would not load), else None."""

    CSS_PATH = "chat.tcss"
    TITLE = "edgepack chat"
    ENABLE_COMMAND_PALETTE = False  # the slash commands are the palette
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(self, loader: Loader, *, system: str = "", sampling: SamplingParams | None = None, truncate: Truncate = "error") -> None:
        super().__init__()
        self._chat = ChatScreen(loader, system=system, sampling=sampling, truncate=truncate)

    def get_default_screen(self) -> ChatScreen:
        return self._chat


def run_chat(
    model: str | os.PathLike,
    *,
    variant: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    n_ctx: int | None = None,
    threads: int | None = None,
    kv_type: str = "f16",
    draft: str | None = None,
    batch_invariant: bool = False,
    system: str = "",
    sampling: SamplingParams | None = None,
    truncate: Truncate = "error",
) -> None:
    """Chat with a bundle or a lone model (see ``edgepack.load``) in the terminal until the user quits.

    Raises UsageError without a terminal, and whatever ``edgepack.load`` raises when the
    model does not load (SourceNotFoundError, BundleError, BackendError, ...).
    """
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("edgepack chat needs an interactive terminal: use `edgepack run MODEL PROMPT` in scripts and pipes")
    loader = Loader(model, variant=variant, backend=backend, device=device, n_ctx=n_ctx, threads=threads, kv_type=kv_type, draft=draft, batch_invariant=batch_invariant)
    app = ChatApp(loader, system=system, sampling=sampling, truncate=truncate)
    error = app.run()
    if error is not None:
        raise error
