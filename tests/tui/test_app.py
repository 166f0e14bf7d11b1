"""Pilot tests of the chat UI on a scripted Session (the real backend is driven in test_real.py)."""

from __future__ import annotations

import json

import pytest
from textual.geometry import Region

from edgepack.errors import BackendError
from edgepack.runtime.base import SamplingParams
from edgepack.tui.app import ChatApp
from edgepack.tui.screens import VariantPicker
from edgepack.tui.widgets import MessageView, PromptInput

pytestmark = pytest.mark.anyio  # anyio's pytest plugin runs the async tests on asyncio
SIZE = (100, 30)


async def until(pilot, condition, timeout: float = 10.0) -> None:
    """Let the app run until ``condition()`` holds; fail after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for {condition.__doc__ or condition}")


async def ready(pilot) -> None:
    await until(pilot, lambda: pilot.app.screen.session is not None and not pilot.app.screen.busy)


async def type_and_send(pilot, text: str) -> None:
    pilot.app.screen.query_one(PromptInput).value = text
    await pilot.press("enter")


def views(app, role: str) -> list[MessageView]:
    return [v for v in app.screen.query(MessageView) if role in v.classes]


def status(app) -> str:
    return " ".join(str(w.render()) for w in app.screen.query("StatusBar Static"))


async def test_send_streams_a_markdown_answer_and_updates_the_status_bar(make_opener, reply):
    opener = make_opener()
    app = ChatApp(opener, sampling=SamplingParams(temperature=0))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert "scripted · q4_k_m · llama.cpp · cpu · ctx 0/4096 · - tok/s" in status(app)
        await type_and_send(pilot, "What is the capital of France?")
        await until(pilot, lambda: not app.screen.busy)
        [question], [answer] = views(app, "user"), views(app, "assistant")
        assert question.source == "What is the capital of France?"
        assert answer.source == reply
        shown = "\n".join(strip.text for strip in answer.render_lines(Region(0, 0, *answer.outer_size)))
        assert "Paris" in shown and "• river: Seine" in shown and "#" not in shown and "**" not in shown  # rendered, not raw
        c = app.screen.conversation.turns[-1].meta["completion"]
        assert c["finish_reason"] == "stop" and c["completion_tokens"] == 17  # a token per word, plus the final newline
        assert f"ctx {c['prompt_tokens'] + c['completion_tokens']}/4096" in status(app)
        assert "tok/s" in answer.border_subtitle and "ready" in status(app)
        assert "<|im_start|>user\nWhat is the capital of France?" in opener.opened[0].prompts[0]


async def test_tokens_appear_while_the_answer_is_generated(make_opener, reply):
    opener = make_opener(gated=True)
    app = ChatApp(opener)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "hi")
        session = opener.opened[0]
        session.release(3)
        await until(pilot, lambda: views(app, "assistant")[0].source == "## Paris\n\nThe")
        assert app.screen.busy == "generating" and "Esc stops" in status(app)
        session.release(1000)
        await until(pilot, lambda: not app.screen.busy)
        assert views(app, "assistant")[0].source == reply


@pytest.mark.parametrize("key", ["escape", "ctrl+c"])
async def test_stop_keeps_the_partial_answer_and_the_app_running(key, make_opener):
    opener = make_opener(gated=True)
    app = ChatApp(opener)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "hi")
        session = opener.opened[0]
        session.release(2)
        await until(pilot, lambda: views(app, "assistant")[0].source == "## Paris")
        await pilot.press(key)
        await until(pilot, lambda: not app.screen.busy)
        turn = app.screen.conversation.turns[-1]
        assert turn.meta["completion"]["finish_reason"] == "cancelled"
        assert turn.content == "## Paris" and views(app, "assistant")[0].border_subtitle.endswith("stopped")
        assert app.is_running
        # the conversation goes on after a stop, the partial answer included
        session.release(1000)
        await type_and_send(pilot, "go on")
        await until(pilot, lambda: not app.screen.busy and len(app.screen.conversation.turns) == 4)
        assert "<|im_start|>assistant\n## Paris<|im_end|>" in session.prompts[-1]


async def test_ctrl_c_when_idle_does_not_quit(make_opener):
    app = ChatApp(make_opener())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+c")
        await pilot.pause(0.1)
        assert app.is_running


async def test_input_history_walks_back_and_forth_and_keeps_the_draft(make_opener):
    app = ChatApp(make_opener())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for text in ("/temp 0.5", "/temp 0.3"):
            await type_and_send(pilot, text)
        prompt = app.screen.query_one(PromptInput)
        prompt.value = "draft"
        await pilot.press("up")
        assert prompt.value == "/temp 0.3"
        await pilot.press("up", "up")
        assert prompt.value == "/temp 0.5"
        await pilot.press("down")
        assert prompt.value == "/temp 0.3"
        await pilot.press("down")
        assert prompt.value == "draft"


async def test_commands_system_temp_clear_help(make_opener):
    opener = make_opener()
    app = ChatApp(opener, system="Be brief.")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert views(app, "info")[0].source == "Be brief."
        await type_and_send(pilot, "/temp 0.2")
        assert app.screen.sampling.temperature == 0.2
        await type_and_send(pilot, "/temp hot")
        await type_and_send(pilot, "/temp -1")
        await type_and_send(pilot, "/frobnicate")
        errors = [v.source for v in views(app, "error")]
        assert "give a number" in errors[0] and "temperature must be >= 0" in errors[1] and "/help" in errors[2]
        assert app.screen.sampling.temperature == 0.2
        await type_and_send(pilot, "/system You are a pirate.")
        await type_and_send(pilot, "ahoy")
        await until(pilot, lambda: not app.screen.busy)
        assert opener.opened[0].prompts[-1].startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")
        context = app.screen.context
        await type_and_send(pilot, "/clear")
        await until(pilot, lambda: app.screen.context < context)
        assert app.screen.conversation.turns == [] and app.screen.conversation.system == "You are a pirate."
        assert [v.source for v in app.screen.query(MessageView)] == ["You are a pirate."]
        await type_and_send(pilot, "/help")
        assert "`/save [PATH]`" in views(app, "info")[-1].source
        await type_and_send(pilot, "//etc is a folder")
        await until(pilot, lambda: not app.screen.busy)
        assert app.screen.conversation.turns[0].content == "/etc is a folder"


async def test_save_writes_markdown_and_json(tmp_path, make_opener, reply):
    app = ChatApp(make_opener(), system="Be brief.")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "What is the capital of France?")
        await until(pilot, lambda: not app.screen.busy)
        await type_and_send(pilot, f"/save {tmp_path / 'chat'}")
        assert f"saved `{tmp_path / 'chat.md'}`" in views(app, "info")[-1].source
    record = json.loads((tmp_path / "chat.json").read_text())
    assert record["system"] == "Be brief." and record["model"]["variant"] == "q4_k_m"
    assert [(m["role"], m["content"]) for m in record["messages"]] == [
        ("user", "What is the capital of France?"),
        ("assistant", reply),
    ]
    assert record["messages"][1]["meta"]["completion"]["finish_reason"] == "stop"
    md = (tmp_path / "chat.md").read_text()
    assert "## You\n\nWhat is the capital of France?" in md and "## System\n\nBe brief." in md and reply in md


async def test_save_to_an_unwritable_place_says_so(tmp_path, make_opener):
    blocker = tmp_path / "file"
    blocker.write_text("")
    app = ChatApp(make_opener())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, f"/save {blocker}/sub/chat")
        assert "cannot write the transcript" in views(app, "error")[-1].source
    assert blocker.read_text() == ""


async def test_switch_variant_keeps_the_conversation(make_opener, variants, reply):
    opener = make_opener(variants=variants)
    app = ChatApp(opener)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "first question")
        await until(pilot, lambda: not app.screen.busy)
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, VariantPicker))
        await pilot.press("down", "enter")
        await ready(pilot)
        first, second = opener.opened
        assert first.closed and not second.closed and app.screen.session is second
        assert second.info.variant == "q8_0" and "q8_0" in status(app)
        assert app.screen.context > 0  # the kept conversation, counted on the new variant
        assert "now answering: **q8_0**" in views(app, "info")[-1].source
        await type_and_send(pilot, "second question")
        await until(pilot, lambda: not app.screen.busy)
        assert "first question" in second.prompts[0] and reply.strip() in second.prompts[0]
        assert [t.meta.get("variant") for t in app.screen.conversation.turns] == [None, "q4_k_m", None, "q8_0"]


async def test_picker_escape_and_unknown_variant_change_nothing(make_opener, variants):
    opener = make_opener(variants=variants)
    app = ChatApp(opener)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, VariantPicker))
        await pilot.press("escape")
        await type_and_send(pilot, "/variant nope")
        await pilot.pause(0.1)
        assert len(opener.opened) == 1 and app.screen.session.info.variant == "q4_k_m"


async def test_a_variant_that_fails_to_load_falls_back_to_the_previous_one(make_opener, variants):
    opener = make_opener(variants=variants, broken=("int4",))
    app = ChatApp(opener)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "/variant int4")
        await until(pilot, lambda: len(opener.opened) == 2 and not app.screen.busy)
        assert app.screen.session.info.variant == "q4_k_m" and not app.screen.session.closed
        assert "could not load variant int4" in views(app, "error")[-1].source


async def test_a_single_file_has_no_variants_to_pick(make_opener):
    app = ChatApp(make_opener())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f2")
        await pilot.pause(0.1)
        assert not isinstance(app.screen, VariantPicker)
        assert any("not a bundle" in str(n.message) for n in app._notifications)


async def test_context_overflow_is_reported_and_the_question_given_back(make_opener):
    app = ChatApp(make_opener(n_ctx=64), sampling=SamplingParams(max_tokens=60))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "a question that is long enough to overflow")
        await until(pilot, lambda: views(app, "error"))
        assert "context holds 64" in views(app, "error")[0].source and "/clear" in views(app, "error")[0].source
        assert app.screen.conversation.turns == [] and not views(app, "assistant")
        assert app.screen.query_one(PromptInput).value == "a question that is long enough to overflow"


async def test_a_model_that_does_not_load_ends_the_app_with_the_error(make_opener):
    app = ChatApp(make_opener(broken=("bad",), variant="bad"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: not app.is_running)
    assert isinstance(app.return_value, BackendError)


async def test_quit_during_an_answer_stops_it_and_frees_the_model(make_opener):
    opener = make_opener(gated=True)
    app = ChatApp(opener)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "hi")
        opener.opened[0].release(1)
        await until(pilot, lambda: views(app, "assistant")[0].source)
        await pilot.press("ctrl+q")
    assert opener.opened[0].closed and app.return_value is None
