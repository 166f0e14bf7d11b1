"""The chat's widgets: the message log, the input with history, the status bar.

Widgets only display; the screen decides what happens (textual's examples split it the same way).
"""

from __future__ import annotations

from rich.markdown import Markdown as RichMarkdown
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.markup import escape
from textual.widgets import Input, Static

from ..runtime.base import ModelInfo


class MessageView(Static):
    """One message rendered as Markdown; ``role`` (user, assistant, info, error) is its CSS class.

    A single Static holding Rich's Markdown, not Textual's Markdown widget: that one builds a
    widget per block, and the whole log is re-arranged on every streamed update, so the UI's
    cost per token grew with the conversation (41 ms of CPU per token after ten answers,
    11 ms with one Static per message).
    """

    def __init__(self, role: str, text: str = "", title: str = "") -> None:
        super().__init__(classes=role)
        self.border_title = escape(title)  # a file or variant name, not markup
        self.source = ""
        self.set_text(text)

    def set_text(self, text: str) -> None:
        self.source = text
        self.update(RichMarkdown(text, code_theme="ansi_dark", hyperlinks=False))

    def append(self, text: str) -> None:
        self.set_text(self.source + text)


class ChatLog(VerticalScroll):
    """The messages, newest at the bottom, following new text unless the user scrolls up."""

    can_focus = False  # keys belong to the input; the mouse wheel still scrolls

    async def add(self, role: str, text: str = "", title: str = "") -> MessageView:
        view = MessageView(role, text, title)
        await self.mount(view)
        self.anchor()
        return view


class PromptInput(Input):
    """A one-line input that remembers what was sent; Up and Down walk back and forth like a shell."""

    BINDINGS = [
        Binding("up", "history(-1)", "Previous", show=False),
        Binding("down", "history(1)", "Next", show=False),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: list[str] = []
        self._pos = 0  # == len(history) while editing a new line
        self._draft = ""

    def remember(self, text: str) -> None:
        if not self.history or self.history[-1] != text:
            self.history.append(text)
        self._pos = len(self.history)
        self._draft = ""

    def action_history(self, step: int) -> None:
        if self._pos == len(self.history):
            self._draft = self.value
        pos = min(max(self._pos + step, 0), len(self.history))
        if pos == self._pos:
            return
        self._pos = pos
        self.value = self.history[pos] if pos < len(self.history) else self._draft
        self.cursor_position = len(self.value)


class StatusBar(Horizontal):
    """Model, variant, backend, device, context used / n_ctx, tokens/s of the last answer; at the right, what is going on.

    The state has its own cell so a narrow terminal cuts the model details, never "ready" or "generating".
    """

    def compose(self) -> ComposeResult:
        yield Static(id="model")
        yield Static(id="state")

    def show(self, info: ModelInfo | None, *, context: int, tokens_per_s: float | None, state: str) -> None:
        if info is None:
            line = Text("no model")
        else:
            rate = f"{tokens_per_s:.1f} tok/s" if tokens_per_s else "- tok/s"
            details = [info.variant or "-", info.backend, info.device, f"ctx {context}/{info.n_ctx}", rate]
            line = Text.assemble((info.name or info.path.name, "bold"), *(f" · {d}" for d in details))
        self.query_one("#model", Static).update(line)
        self.query_one("#state", Static).update(state)
