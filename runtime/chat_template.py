"""Render a model's own jinja chat template the way transformers does, so chat ids match ``apply_chat_template``.

Same environment as transformers' ``apply_chat_template``: a sandbox, ``trim_blocks`` and
``lstrip_blocks``, loop controls, a ``tojson`` that keeps non-ASCII, and the globals
``raise_exception`` and ``strftime_now``. The rendered text is tokenized without adding
specials: a template that wants a BOS writes ``{{ bos_token }}`` itself, hence no doubled BOS.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidModelError, UsageError


def render(source: str, messages: Sequence[dict[str, Any]], specials: dict[str, str], *, add_generation_prompt: bool) -> str:
    """The conversation as text. Raises UsageError when the template rejects the messages."""
    import jinja2

    template = _compile(source)
    try:
        return template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **specials,
        )
    except jinja2.TemplateError as e:
        raise UsageError(f"the model's chat template rejected the conversation: {e}") from e


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: _dt.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidModelError(f"the model's chat template does not parse ({e}): use generate() with your own prompt format") from e
