"""The chat screen and the variant picker.

All model work happens in thread workers that post messages back to the
screen (``post_message`` is thread-safe); handlers on the UI thread only
update widgets and the conversation. The whole model interface is the runtime's
``Loader.switch(old, variant)``, ``session.chat_stream(...)`` and ``stream.cancel()``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, OptionList
from textual.widgets.option_list import Option

from ..bundle import Variant
from ..errors import ContextOverflowError, EdgepackError, UsageError
from ..runtime.base import Completion, SamplingParams, Session, Stream, Truncate
from ..runtime.loader import Loader
from . import commands, transcript
from .widgets import ChatLog, MessageView, PromptInput, StatusBar

# Pieces are shown at most ten times a second, not per token: every update re-lays out and
# repaints the log, about 15 ms of CPU here, CPU the model needs on a small machine
# (measured with benchmarks/tui_chat.py). Ten updates a second still read as a live stream.
REFRESH_S = 0.1


class Piece(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class Finished(Message):
    """A generation ended: ``completion`` says how, or ``error`` why it could not start."""

    def __init__(self, completion: Completion | None, error: EdgepackError | None = None) -> None:
        super().__init__()
        self.completion = completion
        self.error = error


class Loaded(Message):
    """A load attempt ended: ``session`` is what is loaded now (None if nothing), ``error`` what went wrong."""

    def __init__(self, session: Session | None, error: EdgepackError | None, context: int, initial: bool) -> None:
        super().__init__()
        self.initial = initial  # the load at start-up: failing it ends the app
        self.session = session
        self.error = error
        self.context = context


class Counted(Message):
    def __init__(self, context: int) -> None:
        super().__init__()
        self.context = context


class VariantPicker(ModalScreen[str | None]):
    """Choose one of the bundle's variants; Esc keeps the current one."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, variants: Sequence[Variant], current: str | None) -> None:
        super().__init__()
        self.variants = variants
        self.current = current

    def compose(self) -> ComposeResult:
        options = []
        for v in self.variants:
            mark = "●" if v.id == self.current else " "
            bits = f", {v.bits_per_weight:.2f} bpw" if v.bits_per_weight else ""
            label = Text.assemble(f"{mark} {v.id}  ", (f"{v.format} on {v.backend}, {v.bytes / 1e6:.0f} MB{bits}", "dim"))
            options.append(Option(label, id=v.id))
        picker = OptionList(*options, id="variants")
        picker.border_title = "Switch variant (Enter picks, Esc cancels)"
        yield picker

    def on_mount(self) -> None:
        picker = self.query_one(OptionList)
        ids = [v.id for v in self.variants]
        picker.highlighted = ids.index(self.current) if self.current in ids else 0

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class ChatScreen(Screen):
    """The conversation, the input and the status bar."""

    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        # Priority so it reaches us before the input's copy; check_action hands it back when idle.
        Binding("ctrl+c", "stop", "Stop", show=False, priority=True),
        Binding("f2", "pick_variant", "Variant"),
    ]

    def __init__(self, loader: Loader, *, system: str = "", sampling: SamplingParams | None = None, truncate: Truncate = "error") -> None:
        super().__init__()
        self.loader = loader
        self.conversation = transcript.Conversation(system=system)
        self.sampling = sampling or SamplingParams()
        self.truncate = truncate
        self.session: Session | None = None
        self.busy = ""  # "loading" | "generating" | "" when idle
        self.context = 0
        self.tokens_per_s: float | None = None
        self._stream: Stream | None = None
        self._stop = threading.Event()
        self._answer: MessageView | None = None
        self._pending: list[str] = []  # pieces received since the last refresh
        self._closing = False

    def compose(self) -> ComposeResult:
        yield ChatLog(id="log")
        yield PromptInput(placeholder="Message (/help for commands)", id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        self._refresh = self.set_interval(REFRESH_S, self._show_pending, pause=True)
        if self.conversation.system:
            await self.log_view.add("info", self.conversation.system, "system prompt")
        self._set_busy("loading")
        self._load(self.loader.first, None, self.conversation.messages(), initial=True)

    @property
    def log_view(self) -> ChatLog:
        return self.query_one(ChatLog)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    # -- input ----------------------------------------------------------------------------------
    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        line = event.value
        if not line.strip():
            return
        self.prompt.remember(line)
        self.prompt.clear()
        try:
            parsed = commands.parse(line)
            if isinstance(parsed, commands.Command):
                await self._command(parsed)
            else:
                await self._send(parsed)
        except EdgepackError as e:  # a bad command, or /save could not write
            await self.log_view.add("error", str(e))

    async def _send(self, text: str) -> None:
        if self.busy or self.session is None:
            self.prompt.value = text
            self.notify("Wait for the answer, or press Esc to stop it." if self.busy == "generating" else "No model is loaded yet.")
            return
        self.conversation.ask(text)
        await self.log_view.add("user", text, "you")
        info = self.session.info
        self._answer = await self.log_view.add("assistant", "", info.variant or info.name)
        self._stop.clear()
        self._set_busy("generating")
        self._refresh.resume()
        self._generate(self.session, self.conversation.messages(), self.sampling)

    async def _command(self, cmd: commands.Command) -> None:
        if cmd.name == "help":
            await self.log_view.add("info", commands.help_markdown(), "help")
        elif cmd.name == "temp":
            self.sampling = SamplingParams.from_kwargs({**asdict(self.sampling), "temperature": commands.temperature(cmd.arg)})
            await self.log_view.add("info", f"temperature set to {self.sampling.temperature:g}")
        elif cmd.name == "save":
            model = self.session.info.to_json() if self.session else {}
            md, js = transcript.save(self.conversation, cmd.arg, model, asdict(self.sampling))
            await self.log_view.add("info", f"saved `{md}` and `{js}`")
        elif cmd.name == "variant":
            if cmd.arg:
                self._switch(cmd.arg)
            else:
                self.action_pick_variant()
        elif self.busy:
            raise UsageError(f"/{cmd.name} changes the conversation: wait, or press Esc to stop the answer first")
        elif cmd.name == "clear":
            self.conversation.clear()
            await self.log_view.remove_children()
            if self.conversation.system:
                await self.log_view.add("info", self.conversation.system, "system prompt")
            self._recount()
        elif cmd.name == "system":
            self.conversation.system = cmd.arg
            await self.log_view.add("info", cmd.arg or "removed", "system prompt")
            self._recount()

    # -- generation -----------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="model")
    def _generate(self, session: Session, messages: list[dict[str, str]], sampling: SamplingParams) -> None:
        try:
            stream = session.chat_stream(messages, truncate=self.truncate, **asdict(sampling))
            self._stream = stream
            if self._stop.is_set():  # Esc came before the stream existed
                stream.cancel()
            with stream:
                for piece in stream:
                    self.post_message(Piece(piece))
        except EdgepackError as e:  # the prompt did not fit, or the backend failed: say so, keep the app
            self.post_message(Finished(None, e))
            return
        self.post_message(Finished(stream.completion))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return self.busy == "generating" if action == "stop" else True

    def action_stop(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.cancel()
        self._show_status()

    @on(Piece)
    def _piece(self, message: Piece) -> None:
        self._pending.append(message.text)

    def _show_pending(self) -> None:
        if self._pending and self._answer is not None:
            self._answer.append("".join(self._pending))
            self._pending.clear()

    @on(Finished)
    async def _finished(self, message: Finished) -> None:
        self._refresh.pause()
        self._show_pending()
        self._stream = None
        answer, self._answer = self._answer, None
        c = message.completion
        if c is None:
            if answer is not None:
                await answer.remove()
            self.prompt.value = self.conversation.retract()
            hint = ""
            if isinstance(message.error, ContextOverflowError):
                hint = "\n\nHere: `/clear` starts over; `edgepack chat --truncate left` drops the oldest turns instead."
            await self.log_view.add("error", f"{message.error}{hint}")
        else:
            info = self.session.info if self.session else None
            meta = {"completion": c.to_json()}
            if info is not None:
                meta |= {"variant": info.variant, "backend": info.backend, "device": info.device}
            self.conversation.answer(c.text, meta)
            if answer is not None:
                answer.border_subtitle = _subtitle(c)
                if not c.text:
                    answer.set_text("*(no text)*")
            self.context = c.prompt_tokens + c.completion_tokens
            self.tokens_per_s = c.decode_tokens_per_s
        self._set_busy("")

    # -- variants -------------------------------------------------------------------------------
    def action_pick_variant(self) -> None:
        if not self.loader.variants:
            self.notify("This model is a single file, not a bundle: there is no other variant to switch to.")
            return
        current = self.session.info.variant if self.session else None
        self.app.push_screen(VariantPicker(self.loader.variants, current), self._switch)

    def _switch(self, variant: str | None) -> None:
        current = self.session.info.variant if self.session else None
        if variant is None or variant == current:
            return
        if self.busy:
            self.notify("Wait for the answer, or press Esc to stop it, before switching variants.")
            return
        if variant not in {v.id for v in self.loader.variants}:
            known = ", ".join(v.id for v in self.loader.variants) or "none (not a bundle)"
            self.notify(f"No variant {variant!r}; this bundle has: {known}.", severity="error")
            return
        old, self.session = self.session, None
        self._set_busy("loading")
        self._load(variant, old, self.conversation.messages())

    @work(thread=True, exclusive=True, group="model")
    def _load(self, variant: str | None, old: Session | None, messages: list[dict[str, str]], initial: bool = False) -> None:
        """Switch models off the UI thread; the loader falls back to the old variant when the new one fails."""
        session, error = self.loader.switch(old, variant)
        if session is not None and self._closing:
            session.close()
            return
        context = 0
        if session is not None and messages:
            try:
                context = len(session.chat_tokens(messages))
            except EdgepackError:
                pass  # the next answer reports the same problem where it matters
        self.post_message(Loaded(session, error, context, initial))

    @on(Loaded)
    async def _loaded(self, message: Loaded) -> None:
        if message.initial and message.error is not None:
            self.app.exit(message.error, return_code=1)  # the CLI reports it on one line, like any other command
            return
        self.session = message.session
        self.context = message.context
        self.tokens_per_s = None
        self._set_busy("")
        if message.error is not None:
            again = "" if message.session is not None else " No model is loaded: pick a variant with F2."
            await self.log_view.add("error", f"{message.error}{again}")
        if message.session is not None and self.conversation.turns:
            i = message.session.info
            await self.log_view.add("info", f"now answering: **{i.variant or i.name}** ({i.backend} on {i.device})")

    def _recount(self) -> None:
        if self.session is None:
            return
        if not self.conversation.messages():
            self.context = 0
            self._show_status()
        else:
            self._count(self.session, self.conversation.messages())

    @work(thread=True, group="count")
    def _count(self, session: Session, messages: list[dict[str, str]]) -> None:
        try:
            self.post_message(Counted(len(session.chat_tokens(messages))))
        except EdgepackError:
            return  # the next answer reports the same problem where it matters

    @on(Counted)
    def _counted(self, message: Counted) -> None:
        self.context = message.context
        self._show_status()

    # -- status ---------------------------------------------------------------------------------
    def _set_busy(self, busy: str) -> None:
        self.busy = busy
        self.refresh_bindings()  # "Stop" shows only while generating
        self._show_status()

    def _show_status(self) -> None:
        state = {"": "ready", "loading": "loading…", "generating": "generating… (Esc stops)"}[self.busy]
        if self.busy == "generating" and self._stop.is_set():
            state = "stopping…"
        info = self.session.info if self.session else None
        self.query_one(StatusBar).show(info, context=self.context, tokens_per_s=self.tokens_per_s, state=state)

    def on_unmount(self) -> None:
        """Free the model on the way out; ``close`` stops a running answer first."""
        self._closing = True
        if self.session is not None:
            self.session.close()


def _subtitle(c: Completion) -> str:
    why = {"stop": "", "length": ", hit max tokens", "cancelled": ", stopped"}[c.finish_reason]
    return f"{c.completion_tokens} tokens, {c.decode_tokens_per_s:.1f} tok/s{why}"
