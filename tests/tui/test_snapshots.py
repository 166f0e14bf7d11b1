"""SVG snapshots of the chat (pytest-textual-snapshot); update with ``pytest tests/tui --snapshot-update`` and review the SVGs."""

from __future__ import annotations

import pytest

from edgepack.runtime.base import SamplingParams
from edgepack.tui.app import ChatApp
from edgepack.tui.widgets import PromptInput

SIZE = (100, 32)


class SteppingClock:
    """Stands in for ``time`` in the runtime's generation loop so tokens/s, shown on screen, is the same every run."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.025
        return self.now


@pytest.fixture(autouse=True)
def _steady_clock(monkeypatch):
    monkeypatch.setattr("edgepack.runtime.base.time", SteppingClock())


async def _idle(pilot) -> None:
    for _ in range(500):
        if pilot.app.screen.session is not None and not pilot.app.screen.busy:
            break
        await pilot.pause(0.02)
    pilot.app.screen.query_one(PromptInput).cursor_blink = False  # a blinking cursor is caught on or off at random
    await pilot.pause(0.1)  # let the Markdown settle


async def _say(pilot, text: str) -> None:
    await _idle(pilot)
    pilot.app.screen.query_one(PromptInput).value = text
    await pilot.press("enter")
    await _idle(pilot)


def test_conversation(snap_compare, make_opener):
    app = ChatApp(make_opener(), system="Answer briefly.", sampling=SamplingParams(temperature=0))

    async def run_before(pilot):
        await _say(pilot, "What is the capital of France?")

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_help(snap_compare, make_opener):
    async def run_before(pilot):
        await _say(pilot, "/help")

    # tall enough that the whole table shows: a scrolled log's offset depends on when layout settles
    assert snap_compare(ChatApp(make_opener()), terminal_size=(100, 48), run_before=run_before)


def test_variant_picker(snap_compare, make_opener, variants):
    async def run_before(pilot):
        await _idle(pilot)
        await pilot.press("f2")
        await pilot.pause(0.2)

    assert snap_compare(ChatApp(make_opener(variants=variants)), terminal_size=SIZE, run_before=run_before)
