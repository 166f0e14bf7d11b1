"""The conversation the chat holds, and ``/save`` as Markdown plus JSON.

Kept free of Textual so that a transcript can be built, saved and read back
without a terminal. The JSON is the record (schema below); the Markdown is for
people and is rendered from the same data::

    {
      "schema": 1, "edgepack_version": "0.1.0", "saved": "2026-11-27T10:00:00Z",
      "model": ModelInfo.to_json() of the session loaded when saving,
      "sampling": {"temperature", "top_p", ...},
      "system": "the system prompt or empty",
      "messages": [{"role": "user"|"assistant", "content": "...",
                    "meta": {"variant", "backend", "device", "completion": Completion.to_json()}}]
    }
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EdgepackError, UsageError
from ..fsutil import atomic_path

SCHEMA = 1


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    content: str
    meta: dict[str, Any] = field(default_factory=dict)  # assistant turns: which variant answered, counts, timings


@dataclass
class Conversation:
    """What the model sees: an optional system prompt, then alternating user and assistant turns."""

    system: str = ""
    turns: list[Turn] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        """The conversation in the ``[{"role", "content"}]`` form ``Session.chat_stream`` takes."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": t.role, "content": t.content} for t in self.turns]

    def ask(self, text: str) -> None:
        self.turns.append(Turn("user", text))

    def answer(self, text: str, meta: dict[str, Any]) -> None:
        self.turns.append(Turn("assistant", text, meta))

    def retract(self) -> str:
        """Remove the last question (its answer failed) and return it, so the user can resend it."""
        if not self.turns or self.turns[-1].role != "user":
            return ""
        return self.turns.pop().content

    def clear(self) -> None:
        """Forget the turns; the system prompt stays."""
        self.turns.clear()

    def to_json(self, model: dict[str, Any], sampling: dict[str, Any]) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "edgepack_version": __version__,
            "saved": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "model": model,
            "sampling": sampling,
            "system": self.system,
            "messages": [{"role": t.role, "content": t.content, "meta": t.meta} for t in self.turns],
        }


def to_markdown(record: dict[str, Any]) -> str:
    """A readable transcript rendered from the JSON record ``Conversation.to_json`` makes."""
    model = record["model"]
    name = model.get("name") or Path(model.get("path", "model")).name
    lines = [f"# Chat with {name}", ""]
    lines.append(f"- saved: {record['saved']} (edgepack {record['edgepack_version']})")
    where = ", ".join(str(model[k]) for k in ("variant", "backend", "device") if model.get(k))
    lines.append(f"- model: {model.get('path', '?')} ({where})")
    sampling = record["sampling"]
    lines.append("- sampling: " + ", ".join(f"{k}={v}" for k, v in sampling.items() if v not in (None, [])))
    lines.append("")
    if record["system"]:
        lines += ["## System", "", record["system"], ""]
    for m in record["messages"]:
        if m["role"] == "user":
            lines += ["## You", "", m["content"], ""]
            continue
        meta = m["meta"]
        lines += [f"## {name}" + (f" ({meta['variant']})" if meta.get("variant") else ""), "", m["content"], ""]
        c = meta.get("completion")
        if c:
            stopped = ", stopped" if c["finish_reason"] == "cancelled" else ""
            lines += [f"*{c['completion_tokens']} tokens, {c['decode_tokens_per_s']:.1f} tokens/s{stopped}*", ""]
    return "\n".join(lines)


def default_path(now: _dt.datetime | None = None) -> Path:
    """``edgepack-chat-YYYYmmdd-HHMMSS.md`` in the current folder, where a user looks first."""
    now = now or _dt.datetime.now()
    return Path.cwd() / f"edgepack-chat-{now:%Y%m%d-%H%M%S}.md"


def save_paths(arg: str) -> tuple[Path, Path]:
    """The Markdown and JSON paths ``/save ARG`` writes: ``notes``, ``notes.md`` and ``notes.json`` all give the pair.

    An existing folder gets a timestamped pair inside it; an empty ARG gets one in the current folder.
    """
    if not arg.strip():
        md = default_path()
    else:
        p = Path(arg.strip()).expanduser()
        if p.is_dir():
            md = p / default_path().name
        elif p.suffix.lower() in (".md", ".json"):
            md = p.with_suffix(".md")
        else:
            md = p.with_name(p.name + ".md")
    return md, md.with_suffix(".json")


def save(conversation: Conversation, arg: str, model: dict[str, Any], sampling: dict[str, Any]) -> tuple[Path, Path]:
    """Write the transcript as Markdown and JSON (each atomically) and return both paths.

    Raises UsageError when the folder cannot be written, DiskFullError when the disk is full.
    """
    md, js = save_paths(arg)
    record = conversation.to_json(model, sampling)
    try:
        for path, text in ((js, json.dumps(record, indent=2, ensure_ascii=False) + "\n"), (md, to_markdown(record))):
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")  # chats hold any script, whatever the locale
    except EdgepackError:  # DiskFullError already says what to do
        raise
    except OSError as e:
        raise UsageError(f"cannot write the transcript to {md} ({e.strerror or e}): give another path, e.g. /save ~/chat") from e
    return md, js
