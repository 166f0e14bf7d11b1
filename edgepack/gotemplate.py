"""A renderer for the part of Go's text/template that edgepack's Ollama templates use, so an export can check them.

Ollama renders a Modelfile's TEMPLATE with Go's text/template. Edgepack writes such templates
(``ollama.py``) and, before writing one, renders it here for sample conversations and compares the
text with what the model's own jinja chat template gives. The subset follows the Go documentation
(pkg.go.dev/text/template): text and actions; ``{{-`` and ``-}}`` trim the white space (space, tab,
CR, LF) beside them; ``if``/``else if``/``else``/``end``; ``range PIPELINE``, ``range $x := ...`` and
``range $i, $x := ...`` over a list, with dot set to the element; fields (``.Role``, ``$.System``,
``$m.Content``); string and integer literals; ``(...)``; and the builtins ``eq``, ``ne``, ``and``,
``or``, ``not`` and ``len``. Truth is Go's: false, 0, "", nil and empty lists are false. Anything
else raises GoTemplateError rather than guessing, so a template outside the subset is never
claimed to match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
_SPACE = " \t\r\n"
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<int>-?\d+)|(?P<var>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)|(?P<word>\w+)|(?P<p>[()]))')


class GoTemplateError(ValueError):
    """The template uses something outside the subset, or its data lacks a field it reads."""


@dataclass
class _Node:
    kind: str  # text | out | if | range
    text: str = ""
    pipe: list[Any] = field(default_factory=list)
    names: tuple[str, ...] = ()  # range's variables
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


def render(source: str, data: dict[str, Any]) -> str:
    """``source`` executed on ``data`` (a dict; lists of dicts for ranges). Raises GoTemplateError."""
    nodes, _ = _parse(_lex(source), 0, top=True)
    out: list[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)


def _lex(source: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) in order, with the trim markers applied to the text beside them."""
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(source):
        text = source[pos : m.start()]
        if trim_next:
            text = text.lstrip(_SPACE)
        if m.group(1):
            text = text.rstrip(_SPACE)
        parts.append(("text", text))
        body = m.group(2).strip()
        if body.startswith("/*"):
            raise GoTemplateError("comments are outside the subset")
        parts.append(("action", body))
        pos, trim_next = m.end(), bool(m.group(3))
    if "{{" in source[pos:] or "}}" in source[pos:]:
        raise GoTemplateError(f"unclosed action near {source[pos:pos + 40]!r}")
    text = source[pos:]
    parts.append(("text", text.lstrip(_SPACE) if trim_next else text))
    return parts


def _parse(parts: list[tuple[str, str]], i: int, *, top: bool = False) -> tuple[list[_Node], int]:
    """Nodes from ``parts[i:]`` up to the ``else``/``end`` closing this level; the index of that closing action."""
    nodes: list[_Node] = []
    while i < len(parts):
        kind, s = parts[i]
        if kind == "text":
            if s:
                nodes.append(_Node("text", text=s))
            i += 1
            continue
        word = s.split(None, 1)[0] if s else ""
        if word in ("end", "else"):
            if top:
                raise GoTemplateError(f"unexpected {{{{{s}}}}}")
            return nodes, i
        if word == "if":
            node, i = _parse_if(parts, i, s[2:])
        elif word == "range":
            node, i = _parse_range(parts, i, s[5:])
        elif word in ("with", "define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"{{{{{s}}}}} is outside the subset")
        else:
            node, i = _Node("out", pipe=_expr(s)), i + 1
        nodes.append(node)
    if not top:
        raise GoTemplateError("missing {{end}}")
    return nodes, i


def _parse_if(parts: list[tuple[str, str]], i: int, cond: str) -> tuple[_Node, int]:
    node = _Node("if", pipe=_expr(cond))
    node.body, i = _parse(parts, i + 1)
    closing = parts[i][1]
    if closing.startswith("else if "):  # an else-if chain nests as an if in the else branch, sharing the one {{end}}
        inner, i = _parse_if(parts, i, closing[len("else if ") :])
        node.orelse = [inner]
        return node, i
    if closing == "else":
        node.orelse, i = _parse(parts, i + 1)
        closing = parts[i][1]
    if closing != "end":
        raise GoTemplateError(f"{{{{{closing}}}}} where {{{{end}}}} was expected")
    return node, i + 1


def _parse_range(parts: list[tuple[str, str]], i: int, spec: str) -> tuple[_Node, int]:
    names: tuple[str, ...] = ()
    if ":=" in spec:
        left, spec = spec.split(":=", 1)
        names = tuple(n.strip() for n in left.split(","))
        if not all(re.fullmatch(r"\$\w+", n) for n in names) or len(names) > 2:
            raise GoTemplateError(f"range variables {left.strip()!r} are outside the subset")
    node = _Node("range", pipe=_expr(spec), names=names)
    node.body, i = _parse(parts, i + 1)
    if parts[i][1] != "end":
        raise GoTemplateError("{{else}} in a range is outside the subset")
    return node, i + 1


def _expr(s: str) -> list[Any]:
    """A command as a nested list: [function, args...] or [term]; terms are ("str"|"int"|"var"|"field", value)."""
    tokens, pos = [], 0
    s = s.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            raise GoTemplateError(f"cannot read {s[pos:]!r}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(s) and s[pos] in _SPACE:
            pos += 1
    items, rest = _command(tokens, 0)
    if rest != len(tokens):
        raise GoTemplateError(f"unexpected ')' in {s!r}")
    if not items:
        raise GoTemplateError("empty action")
    return items


def _command(tokens: list[tuple[str, str]], i: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    while i < len(tokens):
        kind, v = tokens[i]
        if v == ")":
            return items, i
        if v == "(":
            inner, i = _command(tokens, i + 1)
            if i >= len(tokens) or tokens[i][1] != ")":
                raise GoTemplateError("missing ')'")
            items.append(("call", inner))
        elif kind == "str":
            items.append(("str", _unquote(v)))
        elif kind == "int":
            items.append(("int", int(v)))
        elif kind == "word":
            if v not in _FUNCS and v not in ("and", "or", "true", "false", "nil"):
                raise GoTemplateError(f"function {v!r} is outside the subset")
            items.append(("word", v))
        else:
            items.append((kind, v))
        i += 1
    return items, i


def _unquote(lit: str) -> str:
    escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1)) or _bad_escape(m.group(0)), lit[1:-1])


def _bad_escape(esc: str) -> str:
    raise GoTemplateError(f"string escape {esc} is outside the subset")


def truth(v: Any) -> bool:
    """Go's truth: false, 0, "", nil and empty lists and maps are false."""
    return v is not None and v is not False and v != 0 and v != "" and (not hasattr(v, "__len__") or len(v) > 0)


def _eq(a: Any, b: Any) -> bool:
    if type(a) is not type(b) and not (isinstance(a, int) and isinstance(b, int)):
        raise GoTemplateError(f"eq of {type(a).__name__} and {type(b).__name__}: incompatible types for comparison")
    return a == b


_FUNCS = {
    "eq": lambda a, b: _eq(a, b),
    "ne": lambda a, b: not _eq(a, b),
    "not": lambda a: not truth(a),
    "len": lambda a: len(a),
}


def _eval(items: list[Any], dot: Any, scope: dict[str, Any]) -> Any:
    head = items[0]
    if head[0] == "word" and head[1] in ("and", "or"):  # short-circuit, returning the deciding argument (Go 1.18+)
        last = None
        for arg in items[1:]:
            last = _value(arg, dot, scope)
            if truth(last) != (head[1] == "and"):
                return last
        return last
    if head[0] == "word" and head[1] in _FUNCS:
        args = [_value(a, dot, scope) for a in items[1:]]
        try:
            return _FUNCS[head[1]](*args)
        except TypeError as e:
            raise GoTemplateError(f"{head[1]}: wrong number of arguments ({len(args)})") from e
    if len(items) != 1:
        raise GoTemplateError(f"{items!r} is not a call of a function in the subset")
    return _value(head, dot, scope)


def _value(item: tuple[str, Any], dot: Any, scope: dict[str, Any]) -> Any:
    kind, v = item
    if kind in ("str", "int"):
        return v
    if kind == "call":
        return _eval(v, dot, scope)
    if kind == "word":
        return {"true": True, "false": False, "nil": None}[v]
    if kind == "field":
        return dot if v == "." else _fields(dot, v[1:].split("."))
    name, *path = v.split(".")
    if name not in scope:
        raise GoTemplateError(f"undefined variable {name}")
    return _fields(scope[name], path)


def _fields(obj: Any, path: list[str]) -> Any:
    for name in path:
        if not isinstance(obj, dict) or name not in obj:
            raise GoTemplateError(f"can't evaluate field {name}")
        obj = obj[name]
    return obj


def _run(nodes: list[_Node], dot: Any, scope: dict[str, Any], out: list[str]) -> None:
    for n in nodes:
        if n.kind == "text":
            out.append(n.text)
        elif n.kind == "out":
            v = _eval(n.pipe, dot, scope)
            if isinstance(v, bool):
                out.append("true" if v else "false")
            elif isinstance(v, (str, int)):
                out.append(str(v))
            else:
                raise GoTemplateError(f"printing a {type(v).__name__} is outside the subset")
        elif n.kind == "if":
            _run(n.body if truth(_eval(n.pipe, dot, scope)) else n.orelse, dot, scope, out)
        else:
            items = _eval(n.pipe, dot, scope)
            if items is None:
                continue
            if not isinstance(items, list):
                raise GoTemplateError(f"range over a {type(items).__name__} is outside the subset")
            for index, item in enumerate(items):
                inner = dict(scope)
                if len(n.names) == 1:
                    inner[n.names[0]] = item
                elif len(n.names) == 2:
                    inner[n.names[0]], inner[n.names[1]] = index, item
                _run(n.body, item, inner, out)
