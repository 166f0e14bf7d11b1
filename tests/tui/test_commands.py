from __future__ import annotations

import pytest

from edgepack.errors import UsageError
from edgepack.tui.commands import COMMANDS, Command, help_markdown, parse, temperature


@pytest.mark.parametrize(
    "line, expected",
    [
        ("hello", "hello"),
        ("/system You are terse.", Command("system", "You are terse.")),
        ("/system", Command("system", "")),
        ("/clear", Command("clear", "")),
        ("/save  notes/chat ", Command("save", "notes/chat")),
        ("/temp 0.2", Command("temp", "0.2")),
        ("/variant q8_0", Command("variant", "q8_0")),
        ("/help", Command("help", "")),
        ("//etc/hosts is a file", "/etc/hosts is a file"),
        ("a /slash later", "a /slash later"),
    ],
)
def test_parse(line, expected):
    assert parse(line) == expected


@pytest.mark.parametrize("line, message", [("/nope", "unknown command /nope"), ("/temp", "/temp needs a value"), ("/Clear", "unknown")])
def test_parse_rejects(line, message):
    with pytest.raises(UsageError, match=message):
        parse(line)


def test_temperature():
    assert temperature("0.25") == 0.25
    with pytest.raises(UsageError, match="give a number"):
        temperature("warm")


def test_help_lists_every_command():
    text = help_markdown()
    assert all(f"`/{name}" in text for name in COMMANDS) and "Ctrl+Q" in text
