"""The chat's slash commands: parsing and help text, without Textual.

A line that starts with ``/`` is a command; ``//`` sends a literal ``/`` so a
message may still start with one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

# name -> (argument, what it does); the order is the order /help lists them.
COMMANDS = {
    "system": ("TEXT", "set the system prompt; `/system` alone removes it"),
    "clear": ("", "forget the conversation (the system prompt stays)"),
    "save": ("[PATH]", "write the transcript as PATH.md and PATH.json (default: edgepack-chat-DATE.md here)"),
    "temp": ("X", "set the sampling temperature (0 is greedy)"),
    "variant": ("[ID]", "switch to another variant of the bundle, keeping the conversation"),
    "help": ("", "show this help"),
}

KEYS = (
    ("Enter", "send"),
    ("Up / Down", "previous / next input"),
    ("Esc or Ctrl+C", "stop the answer being generated"),
    ("F2", "pick a variant"),
    ("Ctrl+Q", "quit"),
)


@dataclass(frozen=True)
class Command:
    name: str
    arg: str


def parse(line: str) -> Command | str:
    """A ``Command`` for ``/name arg``, else the text to send (``//x`` sends ``/x``).

    Raises UsageError for an unknown command or a missing argument.
    """
    if not line.startswith("/") or line.startswith("//"):
        return line[1:] if line.startswith("//") else line
    name, _, arg = line[1:].partition(" ")
    if name not in COMMANDS:
        raise UsageError(f"unknown command /{name}: type /help for the list (start with // to send a literal /)")
    arg = arg.strip()
    if name == "temp" and not arg:
        raise UsageError("/temp needs a value, e.g. /temp 0.7 (0 is greedy)")
    return Command(name, arg)


def temperature(arg: str) -> float:
    """The number in ``/temp X``; its range is checked by ``SamplingParams.from_kwargs``."""
    try:
        return float(arg)
    except ValueError as e:
        raise UsageError(f"/temp {arg}: give a number such as 0.7 (0 is greedy)") from e


def help_markdown() -> str:
    rows = [f"| `/{n}{' ' + a if a else ''}` | {d} |" for n, (a, d) in COMMANDS.items()]
    keys = [f"| {k} | {d} |" for k, d in KEYS]
    return "\n".join(["| Command | |", "|---|---|", *rows, "", "| Key | |", "|---|---|", *keys])
