"""The chat on the real llama.cpp backend and the real SmolLM2 GGUF, driven by Pilot."""

from __future__ import annotations

import json

import pytest

from edgepack.runtime import Loader
from edgepack.runtime.base import SamplingParams
from edgepack.tui.app import ChatApp
from edgepack.tui.screens import VariantPicker
from edgepack.tui.widgets import MessageView, PromptInput

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
SIZE = (100, 30)


async def until(pilot, condition, timeout: float = 180.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s")


async def idle(pilot) -> None:
    await until(pilot, lambda: pilot.app.screen.session is not None and not pilot.app.screen.busy)


async def say(pilot, text: str) -> None:
    pilot.app.screen.query_one(PromptInput).value = text
    await pilot.press("enter")


def status(app) -> str:
    return " ".join(str(w.render()) for w in app.screen.query("StatusBar Static"))


def answers(app) -> list[MessageView]:
    return [v for v in app.screen.query(MessageView) if "assistant" in v.classes]


async def test_chat_streams_stops_and_saves_on_llamacpp(smollm2_gguf, tmp_path):
    sampling = SamplingParams(temperature=0, max_tokens=400)
    app = ChatApp(Loader(smollm2_gguf, n_ctx=1024), sampling=sampling, system="You are a helpful assistant.")
    async with app.run_test(size=SIZE) as pilot:
        await idle(pilot)
        session = app.screen.session
        assert session.info.backend == "llama.cpp"
        # stop a long answer as soon as it starts to stream
        await say(pilot, "Write a very long story about a dragon who learns to read.")
        await until(pilot, lambda: answers(app) and answers(app)[0].source)
        await pilot.press("escape")
        await idle(pilot)
        stopped = app.screen.conversation.turns[-1]
        c = stopped.meta["completion"]
        assert c["finish_reason"] == "cancelled" and 0 < c["completion_tokens"] < 400
        assert stopped.content == answers(app)[0].source == c["text"]
        # a short answer streams to the end, and the status bar reports it
        await pilot.press("slash", "t", "e", "m", "p", "space", "0", "enter")
        app.screen.sampling.max_tokens = 24
        await say(pilot, "What is the capital of France?")
        await idle(pilot)
        c = app.screen.conversation.turns[-1].meta["completion"]
        assert c["finish_reason"] in ("stop", "length") and c["text"].strip() and c["decode_tokens_per_s"] > 0
        assert answers(app)[-1].source == c["text"]
        shown = status(app)
        assert f"ctx {c['prompt_tokens'] + c['completion_tokens']}/1024" in shown
        assert f"{c['decode_tokens_per_s']:.1f} tok/s" in shown
        # the kept conversation, the stopped answer included, was the prompt of the second answer
        assert c["prompt_tokens"] > len(session.chat_tokens(app.screen.conversation.messages()[:2]))
        await say(pilot, f"/save {tmp_path / 'chat'}")
        await pilot.pause(0.1)
    record = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "user", "assistant"]
    assert record["model"]["backend"] == "llama.cpp" and record["system"] == "You are a helpful assistant."


async def test_switch_variant_mid_conversation_on_a_real_bundle(two_variant_bundle):
    opened = []

    class Counting(Loader):
        def open(self, variant):
            opened.append(super().open(variant))
            return opened[-1]

    app = ChatApp(Counting(two_variant_bundle, n_ctx=512), sampling=SamplingParams(temperature=0, max_tokens=8))
    async with app.run_test(size=SIZE) as pilot:
        await idle(pilot)
        assert app.screen.session.info.variant == "a"  # the first variant in the manifest
        await say(pilot, "What is the capital of France?")
        await idle(pilot)
        first = app.screen.conversation.turns[-1].meta
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, VariantPicker))
        await pilot.press("down", "enter")
        await idle(pilot)
        assert app.screen.session.info.variant == "b" and "· b ·" in status(app)
        await say(pilot, "And of Germany?")
        await idle(pilot)
        second = app.screen.conversation.turns[-1].meta
    assert (first["variant"], second["variant"]) == ("a", "b")
    c1, c2 = first["completion"], second["completion"]
    assert c2["prompt_tokens"] > c1["prompt_tokens"] + c1["completion_tokens"]  # b saw the whole conversation
    assert len(opened) == 2
