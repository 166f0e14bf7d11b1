"""Render a model's own jinja chat template the way transformers does, so chat ids match ``apply_chat_template``.

With jinja2 alone, never transformers (the runtime-only install has none), in the environment
transformers' ``apply_chat_template`` sets up: a sandbox, ``trim_blocks`` and ``lstrip_blocks``,
loop controls, the ``{% generation %}`` block (assistant masks; rendered as its body), a
``tojson`` that keeps non-ASCII and takes ``indent``, ``separators`` and ``sort_keys``, the globals
``raise_exception`` and ``strftime_now``, and a message's reasoning under both names templates
read. The rendered text is tokenized without adding specials: a template that wants a BOS
writes ``{{ bos_token }}`` itself, hence no doubled BOS. tests/runtime/test_chat_template.py
renders every feature with both and compares, where transformers is installed.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidModelError, UsageError

# A message's reasoning, by the names it comes under; templates read the first (Qwen3) or "thinking" (gpt-oss).
_REASONING = ("reasoning_content", "thinking", "reasoning")


def render(
    source: str,
    messages: Sequence[dict[str, Any]],
    specials: dict[str, str],
    *,
    add_generation_prompt: bool,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The conversation as text; ``tools`` as transformers passes them (OpenAI's shape). Raises UsageError when the template rejects the messages."""
    import jinja2

    template = _compile(source)
    try:
        return template.render(
            messages=[_with_reasoning(dict(m)) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=None,
            **specials,
        )
    except jinja2.TemplateError as e:
        raise UsageError(f"the model's chat template rejected the conversation: {e}") from e


def _with_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def variables(source: str) -> set[str]:
    """The variables ``source`` reads from outside (``messages``, ``tools``, ...): what the template can take."""
    from jinja2 import meta

    _compile(source)  # InvalidModelError when it does not parse
    return meta.find_undeclared_variables(_environment().parse(source))


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidModelError(f"the model's chat template does not parse ({e}): use generate() with your own prompt format") from e


@functools.cache
def _environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _generation_extension()]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: _dt.datetime.now().strftime(fmt)
    return env


@functools.cache
def _generation_extension():
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it; the text is rendered unchanged."""
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            line = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(line)

        def _body(self, caller) -> str:
            return caller()

    return Generation
