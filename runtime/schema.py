"""JSON schemas edgepack enforces while sampling, as llama.cpp grammars (GBNF).

``grammar(schema)`` is the GBNF of the JSON values that validate against ``schema``;
``check(schema)`` only checks it. Both raise UsageError naming the first keyword they
cannot enforce and where it is (``#/properties/tags/uniqueItems``): a keyword edgepack
would skip could let an invalid answer through, so none is skipped. What is enforced:

- any schema: ``type`` (one or a list), ``enum``, ``const``, ``anyOf``, local ``$ref``
  (``#``, ``#/$defs/...``, ``#/definitions/...``), and annotations (``title``,
  ``description``, ``default``, ``examples``, ...);
- objects: ``properties``, ``required``, ``additionalProperties`` (properties are written
  in the schema's order, and only the listed ones; ``additionalProperties`` with a schema
  gives the value of every key when no ``properties`` are listed);
- arrays: ``items``, ``minItems``, ``maxItems``;
- strings: ``minLength``, ``maxLength``, ``pattern`` (Python's ``re`` syntax, which
  jsonschema checks with, without lookarounds or backreferences), ``format`` date, time,
  date-time, uuid;
- integers: ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``; numbers
  the same with whole-number bounds.

The answer's whitespace is at most one space or one newline with an indent between
tokens, so a model cannot run on in blank space. OpenAI's ``strict`` changes nothing
here: every schema edgepack accepts is enforced exactly.

The GBNF follows llama.cpp's grammar syntax (grammars/README.md: rules, literals,
classes, ``{m,n}`` repetition, at most 2000 repeats).
"""

from __future__ import annotations

import json
import math
import re
import re._parser as sre  # Python's own regex parser: jsonschema checks patterns with re.search
from typing import Any

from ..errors import UsageError

# Keywords that change nothing about which values validate.
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly", "$defs", "definitions"}
)
TYPE_KEYWORDS = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "boolean": frozenset(),
    "null": frozenset(),
}
SUPPORTED = ANNOTATIONS | {"type", "enum", "const", "anyOf", "$ref"} | frozenset().union(*TYPE_KEYWORDS.values())
FORMATS = ("date", "time", "date-time", "uuid")
MAX_REPEAT = 1000  # minItems/maxItems/minLength/maxLength above this: llama.cpp's grammar repeats at most 2000 times
_FRACTION = 6  # digits after the point of a number with bounds: few enough that float parsing keeps it inside them
# JSON string characters that stand for themselves (no quote, backslash or control character).
_PLAIN = r'[^"\\\x00-\x1F\x7F]'

_BASE = {
    "ws": r'("\n" [ ]{0,16} | " ")?',
    "char": _PLAIN + r' | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" char* "\""',
    "digits": r'"0" | [1-9] [0-9]{0,15}',
    "integer": r'"-"? digits',
    "number": r'"-"? digits ("." [0-9]{1,15})? ([eE] [-+]? [0-9]{1,3})?',
    "boolean": r'"true" | "false"',
    "null": r'"null"',
    "value": r"object | array | string | number | boolean | null",
    "object": r'"{" ws (string ws ":" ws value (ws "," ws string ws ":" ws value)*)? ws "}"',
    "array": r'"[" ws (value (ws "," ws value)*)? ws "]"',
}
_BASE_DEPS = {"string": ["char"], "integer": ["digits"], "number": ["digits"], "value": ["object", "array", "string", "number", "boolean", "null"],
              "object": ["ws", "string", "value"], "array": ["ws", "value"]}  # fmt: skip
_FORMAT_RULES = {
    "date": r'[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])',
    "time": r'([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? ("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "uuid": r'[0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{12}',
}


def grammar(schema: Any) -> str:
    """GBNF (root rule ``root``) whose strings are exactly JSON texts valid against ``schema``.

    ``{"type": "object"}`` gives any JSON object (OpenAI's ``json_object``). Raises UsageError
    naming the unsupported keyword or the malformed part and its place in the schema.
    """
    if not isinstance(schema, dict):
        raise UsageError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return _Grammar(schema).text()


def check(schema: Any) -> None:
    """Raise UsageError, as ``grammar`` does, unless every keyword of ``schema`` can be enforced."""
    grammar(schema)


def literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def _fail(path: str, message: str) -> UsageError:
    return UsageError(f"JSON schema at {path or '#'}: {message}")


class _Grammar:
    def __init__(self, root: dict) -> None:
        self.root = root
        self.rules: dict[str, str] = {}
        self.refs: dict[str, str] = {}  # $ref -> its rule name

    def text(self) -> str:
        self.rules["root"] = ""  # reserved first, so the root keeps its name
        self.rules["root"] = self.visit(self.root, "#")
        return "\n".join(f"{name} ::= {body}" for name, body in self.rules.items()) + "\n"

    # -- rules ---------------------------------------------------------------------------------
    def base(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _BASE[name]
            for dep in _BASE_DEPS.get(name, ()):
                self.base(dep)
        return name

    def rule(self, path: str, body: str) -> str:
        """A new rule named after ``path`` (``#/properties/a`` -> ``properties-a``)."""
        stem = "-".join(["root", *re.findall(r"[a-zA-Z0-9]+", path)])
        name, i = stem, 1
        while name in self.rules or name in _BASE:
            i += 1
            name = f"{stem}-{i}"
        self.rules[name] = body
        return name

    # -- schemas -------------------------------------------------------------------------------
    def visit(self, schema: Any, path: str) -> str:
        """A GBNF expression for the values valid against ``schema``."""
        if schema is True or schema == {}:
            return self.base("value")
        if not isinstance(schema, dict):
            raise _fail(path, f"a schema must be an object, got {json.dumps(schema)}")
        for key in schema:
            if key not in SUPPORTED:
                raise _fail(path, f"keyword '{key}' is not supported by edgepack's constrained sampling: remove it "
                                  "(supported: type, enum, const, anyOf, $ref, properties, required, additionalProperties, items, minItems, "
                                  "maxItems, minLength, maxLength, pattern, format, minimum, maximum, exclusiveMinimum, exclusiveMaximum)")  # fmt: skip
        rest = {k for k in schema if k not in ANNOTATIONS}
        if "$ref" in schema:
            if rest != {"$ref"}:
                raise _fail(path, f"'$ref' beside {', '.join(sorted(rest - {'$ref'}))} is not supported: move those into the referenced schema")
            return self.ref(schema["$ref"], path)
        if "anyOf" in schema:
            if rest != {"anyOf"}:
                raise _fail(path, f"'anyOf' beside {', '.join(sorted(rest - {'anyOf'}))} is not supported: repeat those inside each choice")
            choices = schema["anyOf"]
            if not isinstance(choices, list) or not choices:
                raise _fail(path, "'anyOf' must be a non-empty array of schemas")
            return "(" + " | ".join(self.visit(s, f"{path}/anyOf/{i}") for i, s in enumerate(choices)) + ")"
        types = self.types(schema, path)
        if "enum" in schema or "const" in schema:
            return self.constants(schema, types, rest, path)
        alternatives = [self.typed(t, schema, path) for t in types]
        return alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"

    def types(self, schema: dict, path: str) -> list[str]:
        """The JSON types ``schema`` allows; without ``type``, those its keywords are about (any when none)."""
        t = schema.get("type")
        if t is None:
            used = [name for name, keys in TYPE_KEYWORDS.items() if keys & schema.keys() and name != "integer"]
            return used or list(TYPE_KEYWORDS)
        ts = t if isinstance(t, list) else [t]
        bad = [x for x in ts if x not in TYPE_KEYWORDS]
        if not ts or bad:
            raise _fail(f"{path}/type", f"unknown type {json.dumps(bad[0] if bad else t)}: use {', '.join(TYPE_KEYWORDS)}")
        return list(dict.fromkeys(ts))

    def constants(self, schema: dict, types: list[str], rest: set[str], path: str) -> str:
        key = "enum" if "enum" in schema else "const"
        others = rest - {key, "type"}
        if others:
            raise _fail(path, f"'{key}' beside {', '.join(sorted(others))} is not supported: list only the allowed values")
        values = schema["enum"] if key == "enum" else [schema["const"]]
        if not isinstance(values, list) or not values:
            raise _fail(f"{path}/enum", "'enum' must be a non-empty array")
        for v in values:
            if not any(_is_type(v, t) for t in types):
                raise _fail(f"{path}/{key}", f"{json.dumps(v)} is not of type {' or '.join(types)}")
        return "(" + " | ".join(literal(json.dumps(v, ensure_ascii=False)) for v in values) + ")"

    def typed(self, t: str, schema: dict, path: str) -> str:
        keys = TYPE_KEYWORDS[t] & schema.keys()
        if t in ("boolean", "null"):
            return self.base(t)
        if not keys:
            return self.base({"object": "object", "array": "array", "string": "string", "integer": "integer", "number": "number"}[t])
        return getattr(self, f"_{t}")(schema, path)

    def ref(self, ref: Any, path: str) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _fail(f"{path}/$ref", f"only references inside the schema (#, #/$defs/...) are supported, got {json.dumps(ref)}")
        if ref not in self.refs:
            target: Any = self.root
            for part in ref[2:].split("/") if ref != "#" else []:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise _fail(f"{path}/$ref", f"{ref} points at nothing in the schema")
                target = target[part]
            self.refs[ref] = name = self.rule(f"ref-{ref}", "")  # named first: a schema may refer to itself
            self.rules[name] = self.visit(target, ref)
        return self.refs[ref]

    # -- one type each -------------------------------------------------------------------------
    def _object(self, schema: dict, path: str) -> str:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", False if props else True)
        if not isinstance(props, dict):
            raise _fail(f"{path}/properties", "'properties' must be an object of schemas")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _fail(f"{path}/required", "'required' must be an array of property names")
        if not props and required and extra is False:
            raise _fail(f"{path}/required", f"'required' names {required[0]!r}, which no object may have here: list it in 'properties'")
        missing = [r for r in required if r not in props]
        if missing and props:
            raise _fail(f"{path}/required", f"'required' names {missing[0]!r}, which is not in 'properties': add it there")
        if extra is not False and extra is not True and not isinstance(extra, dict):
            raise _fail(f"{path}/additionalProperties", "'additionalProperties' must be a boolean or a schema")
        ws = self.base("ws")
        if not props and extra is False:
            return self.rule(path, f'"{{" {ws} "}}"')
        if not props:  # a map: any keys, each value valid against additionalProperties
            if required:
                raise _fail(f"{path}/required", "'required' without 'properties' is not supported: list the required keys in 'properties'")
            value = self.visit(extra, f"{path}/additionalProperties")
            kv = f'{self.base("string")} {ws} ":" {ws} {value}'
            return self.rule(path, f'"{{" {ws} ({kv} ({ws} "," {ws} {kv})*)? {ws} "}}"')
        # The listed properties in order; rest(i, first) writes properties i.. (first: no comma before the next one).
        # Extra keys, when allowed, are left out: an object without them is valid too.
        names = list(props)
        kvs = [f"{literal(json.dumps(n, ensure_ascii=False))} {ws} \":\" {ws} {self.visit(props[n], _join(path, 'properties', n))}" for n in names]
        memo: dict[tuple[int, bool], str] = {}

        def rest(i: int, first: bool) -> str:
            if i == len(names):
                return ""
            if (i, first) not in memo:
                here = " ".join(x for x in ("" if first else f'{ws} "," {ws}', kvs[i], rest(i + 1, False)) if x)
                if names[i] in required:
                    body = here
                else:
                    skip = rest(i + 1, first)
                    body = f"{here} | {skip}" if skip else f"({here})?"
                memo[i, first] = self.rule(f"{path}-{i}{'' if first else 'c'}", body)
            return memo[i, first]

        return self.rule(path, f'"{{" {ws} {rest(0, True)} {ws} "}}"')

    def _array(self, schema: dict, path: str) -> str:
        lo, hi = _count(schema, "minItems", path), _count(schema, "maxItems", path)
        if hi is not None and hi < lo:
            raise _fail(path, f"maxItems {hi} is below minItems {lo}: no array fits")
        ws = self.base("ws")
        item = self.visit(schema.get("items", True), f"{path}/items")
        if hi == 0:
            return self.rule(path, f'"[" {ws} "]"')
        tail = "" if hi == 1 else f'({ws} "," {ws} {item}){_times(max(lo - 1, 0), None if hi is None else hi - 1)}'
        items = f"{item} {tail}".strip() if lo else f"({item} {tail})?"
        return self.rule(path, f'"[" {ws} {items} {ws} "]"')

    def _string(self, schema: dict, path: str) -> str:
        kinds = [k for k in ("pattern", "format") if k in schema]
        lengths = "minLength" in schema or "maxLength" in schema
        if len(kinds) > 1 or (kinds and lengths):
            both = [*kinds, *(["minLength/maxLength"] if lengths else [])]
            raise _fail(path, f"{' and '.join(both)} together are not supported: keep one (a pattern can bound the length)")
        if "format" in schema:
            fmt = schema["format"]
            if fmt not in FORMATS:
                raise _fail(f"{path}/format", f"format {json.dumps(fmt)} is not supported: use {', '.join(FORMATS)}, or a pattern")
            body = f'{_FORMAT_RULES["date"]} "T" {_FORMAT_RULES["time"]}' if fmt == "date-time" else _FORMAT_RULES[fmt]
            return self.rule(path, f'"\\"" {body} "\\""')
        if "pattern" in schema:
            return self.rule(path, f'"\\"" {_pattern(schema["pattern"], f"{path}/pattern")} "\\""')
        lo, hi = _count(schema, "minLength", path), _count(schema, "maxLength", path)
        if hi is not None and hi < lo:
            raise _fail(path, f"maxLength {hi} is below minLength {lo}: no string fits")
        chars = "" if hi == 0 else self.base("char") + _times(lo, hi)
        return self.rule(path, f'"\\"" {chars} "\\""')

    def _integer(self, schema: dict, path: str) -> str:
        lo, hi = _bounds(schema, path, integer=True)
        if lo is None and hi is None:
            return self.base("integer")
        if lo is not None and hi is not None and lo > hi:
            raise _fail(path, "no integer lies within minimum/maximum")
        parts = []
        if hi is None or hi >= 0:  # the non-negative ones
            parts.append(_int_range(max(lo or 0, 0), hi))
        if lo is None or lo < 0:  # the negative ones, by magnitude
            parts.append('"-" ' + _int_range(max(1, -hi) if hi is not None else 1, None if lo is None else -lo))
        return self.rule(path, " | ".join(parts))

    def _number(self, schema: dict, path: str) -> str:
        lo, hi = _bounds(schema, path, integer=False)
        if lo is None and hi is None:
            return self.base("number")
        (a, a_in), (b, b_in) = lo or (None, True), hi or (None, True)
        if a is not None and b is not None and (a > b or (a == b and not (a_in and b_in))):
            raise _fail(path, "no number lies within minimum/maximum")
        parts = []
        if b is None or b > 0 or (b == 0 and b_in):  # x >= 0
            low, low_in = (0, True) if a is None or a < 0 else (a, a_in)
            parts.append(_magnitude(low, low_in, b, b_in))
        if a is None or a < 0:  # x < 0, as "-" and its magnitude: x <= b means magnitude >= -b
            low, low_in = (0, b is None or b > 0 or b_in) if b is None or b >= 0 else (-b, b_in)  # "-0" when 0 may be
            parts.append('"-" (' + _magnitude(low, low_in, None if a is None else -a, a_in) + ")")
        return self.rule(path, " | ".join(parts))


def _join(path: str, *parts: str) -> str:
    return "/".join([path, *(p.replace("~", "~0").replace("/", "~1") for p in parts)])


def _is_type(v: Any, t: str) -> bool:
    return {
        "object": isinstance(v, dict), "array": isinstance(v, list), "string": isinstance(v, str), "null": v is None,
        "boolean": isinstance(v, bool), "number": isinstance(v, (int, float)) and not isinstance(v, bool),
        "integer": (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    }[t]  # fmt: skip


def _count(schema: dict, key: str, path: str) -> int | None:
    v = schema.get(key)
    if v is None:
        return 0 if key.startswith("min") else None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _fail(f"{path}/{key}", f"'{key}' must be a whole number >= 0, got {json.dumps(v)}")
    if v > MAX_REPEAT:
        raise _fail(f"{path}/{key}", f"'{key}' above {MAX_REPEAT} is not supported (got {v})")
    return v


def _times(lo: int, hi: int | None) -> str:
    """GBNF repetition suffix for ``lo`` to ``hi`` (None: no limit) times."""
    if hi is None:
        return "*" if lo == 0 else "+" if lo == 1 else f"{{{lo},}}"
    return "" if lo == hi == 1 else "?" if (lo, hi) == (0, 1) else f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}"


def _bounds(schema: dict, path: str, integer: bool):
    """(lo, hi) from minimum/maximum and their exclusive forms: inclusive ints for integers, (value, inclusive) for numbers."""
    found = {}
    for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        v = schema.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(f"{path}/{key}", f"'{key}' must be a number, got {json.dumps(v)}")
        if not integer and not float(v).is_integer():
            raise _fail(f"{path}/{key}", f"'{key}' {v} on a number is not supported: edgepack bounds numbers by whole numbers only")
        found[key] = v
    if integer:
        lows = [math.ceil(found["minimum"])] if "minimum" in found else []
        lows += [math.floor(found["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in found else []
        highs = [math.floor(found["maximum"])] if "maximum" in found else []
        highs += [math.ceil(found["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in found else []
        return (max(lows) if lows else None), (min(highs) if highs else None)
    lows = [(int(found["minimum"]), True)] if "minimum" in found else []
    lows += [(int(found["exclusiveMinimum"]), False)] if "exclusiveMinimum" in found else []
    highs = [(int(found["maximum"]), True)] if "maximum" in found else []
    highs += [(int(found["exclusiveMaximum"]), False)] if "exclusiveMaximum" in found else []
    # the tighter bound; at equal values the exclusive one
    lo = max(lows, key=lambda b: (b[0], not b[1])) if lows else None
    hi = min(highs, key=lambda b: (b[0], b[1])) if highs else None
    return lo, hi


def _int_range(lo: int, hi: int | None) -> str:
    """GBNF for the decimal integers ``lo``..``hi`` (``hi`` None: no limit), ``lo`` >= 0, without leading zeros."""
    if hi is not None and hi > 10**16:
        hi = None  # past 16 digits: the plain rule's own limit
    top = len(str(hi)) if hi is not None else len(str(lo))
    parts = []
    for n in range(len(str(lo)), top + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = min(hi, 10**n - 1) if hi is not None else 10**n - 1
        if a <= b:
            parts.append(_same_length(str(a), str(b)))
    if hi is None:  # and every longer number
        parts.append(f"[1-9] [0-9]{{{len(str(lo))},15}}")
    return "(" + " | ".join(parts) + ")"


def _same_length(a: str, b: str) -> str:
    """GBNF for the digit strings from ``a`` to ``b``, both of the same length."""
    if a == b:
        return f'"{a}"'
    if set(a) == {"0"} and set(b) == {"9"}:
        return f"[0-9]{_times(len(a), len(a))}"
    if len(a) == 1:
        return f"[{a}-{b}]"
    if a[0] == b[0]:
        return f'"{a[0]}" {_same_length(a[1:], b[1:])}'
    k = len(a) - 1
    parts = [f'"{a[0]}" {_same_length(a[1:], "9" * k)}']
    if int(a[0]) + 1 <= int(b[0]) - 1:
        parts.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}] [0-9]{_times(k, k)}")
    parts.append(f'"{b[0]}" {_same_length("0" * k, b[1:])}')
    return "(" + " | ".join(parts) + ")"


def _magnitude(a: int, a_in: bool, b: int | None, b_in: bool) -> str:
    """GBNF for decimals x >= 0 with a <= x <= b (strict where not ``_in``), a and b whole numbers, no exponent."""
    frac, nonzero, zeros = f'"." [0-9]{{1,{_FRACTION}}}', f'"." [0-9]{{0,{_FRACTION - 1}}} [1-9]', f'("." "0"{{1,{_FRACTION}}})?'
    parts = []
    if a_in:
        parts.append(f'"{a}" {zeros}' if a == b else f'"{a}" ({frac})?')
    elif b is None or a < b:
        parts.append(f'"{a}" {nonzero}')
    if b is None:
        parts.append(f"{_int_range(a + 1, None)} ({frac})?")
    elif a < b:
        if a + 1 <= b - 1:
            parts.append(f"{_int_range(a + 1, b - 1)} ({frac})?")
        if b_in:
            parts.append(f'"{b}" {zeros}')
    return " | ".join(parts)


# -- patterns ----------------------------------------------------------------------------------
_CATEGORIES = {"CATEGORY_DIGIT": [(48, 57)], "CATEGORY_WORD": [(48, 57), (65, 90), (95, 95), (97, 122)], "CATEGORY_SPACE": [(32, 32)]}


def _pattern(pattern: Any, path: str) -> str:
    """GBNF for the contents of a JSON string that ``re.search(pattern)`` matches.

    Characters that a JSON string must escape (quote, backslash, controls) are left out of
    classes and dots, so answers only ever write plain characters where a pattern allows any.
    """
    if not isinstance(pattern, str):
        raise _fail(path, f"'pattern' must be a string, got {json.dumps(pattern)}")
    try:
        parsed = sre.parse(pattern)
    except re.error as e:
        raise _fail(path, f"pattern {pattern!r} is not a valid regular expression: {e}") from e
    if parsed.state.flags & ~re.UNICODE:
        raise _fail(path, f"pattern {pattern!r}: inline flags are not supported")
    items = list(parsed)
    start = bool(items) and str(items[0][0]) == "AT" and str(items[0][1]) in ("AT_BEGINNING", "AT_BEGINNING_STRING")
    end = bool(items) and str(items[-1][0]) == "AT" and str(items[-1][1]) in ("AT_END", "AT_END_STRING")
    body = _regex(items[int(start) : len(items) - int(end)] if (start or end) else items, pattern, path)
    anywhere = f"{_PLAIN}*"
    return " ".join(x for x in ("" if start else anywhere, f"({body})" if body else "", "" if end else anywhere) if x) or '""'


def _regex(items: list, pattern: str, path: str) -> str:
    out = []
    for op, arg in items:
        op = str(op)
        if op == "LITERAL":
            out.append(_char(arg, pattern, path))
        elif op == "NOT_LITERAL":
            out.append(_class([(arg, arg)], negate=True))
        elif op == "ANY":
            out.append(_PLAIN)
        elif op == "IN":
            negate = bool(arg) and str(arg[0][0]) == "NEGATE"
            ranges = []
            for kind, v in arg[int(negate) :]:
                kind = str(kind)
                if kind == "LITERAL":
                    ranges.append((v, v))
                elif kind == "RANGE":
                    ranges.append(v)
                elif kind == "CATEGORY" and str(v) in _CATEGORIES:
                    ranges += _CATEGORIES[str(v)]
                else:
                    raise _fail(path, f"pattern {pattern!r}: {str(v).lower().replace('category_', 'class ')} inside [...] is not supported")
            out.append(_class(ranges, negate))
        elif op == "CATEGORY":
            name = str(arg)
            negate = name.startswith("CATEGORY_NOT_")
            out.append(_class(_CATEGORIES[name.replace("NOT_", "")], negate))
        elif op == "BRANCH":
            out.append("(" + " | ".join(_regex(list(b), pattern, path) or '""' for b in arg[1]) + ")")
        elif op == "SUBPATTERN":
            if arg[1] or arg[2]:
                raise _fail(path, f"pattern {pattern!r}: inline flags are not supported")
            out.append("(" + (_regex(list(arg[3]), pattern, path) or '""') + ")")
        elif op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, sub = arg
            if lo > MAX_REPEAT or (hi != sre.MAXREPEAT and hi > MAX_REPEAT):
                raise _fail(path, f"pattern {pattern!r}: repeats above {MAX_REPEAT} are not supported")
            out.append("(" + (_regex(list(sub), pattern, path) or '""') + ")" + _times(lo, None if hi == sre.MAXREPEAT else hi))
        else:
            what = {"AT": "anchors inside the pattern", "GROUPREF": "backreferences", "ASSERT": "lookarounds", "ASSERT_NOT": "lookarounds"}
            raise _fail(path, f"pattern {pattern!r}: {what.get(op, op.lower())} are not supported")
    return " ".join(out)


def _char(code: int, pattern: str, path: str) -> str:
    c = chr(code)
    if c == '"':
        return r'"\\\""'
    if c == "\\":
        return r'"\\\\"'
    if code < 0x20 or code == 0x7F:
        raise _fail(path, f"pattern {pattern!r}: control characters are not supported")
    return literal(c)


def _class(ranges: list[tuple[int, int]], negate: bool) -> str:
    """A GBNF character class of ``ranges`` (or all but them), never matching what JSON must escape."""
    if negate:
        return "[^" + _EXCLUDED + "".join(_span(a, b) for a, b in ranges) + "]"
    kept = []
    for a, b in ranges:  # each range minus the characters JSON escapes
        for lo, hi in ((0x20, 0x21), (0x23, 0x5B), (0x5D, 0x7E), (0x80, 0x10FFFF)):
            if max(a, lo) <= min(b, hi):
                kept.append((max(a, lo), min(b, hi)))
    if not kept:
        raise UsageError("a character class in the pattern allows only characters a JSON string must escape")
    return "[" + "".join(_span(a, b) for a, b in kept) + "]"


_EXCLUDED = "\\x00-\\x1F\\x22\\x5C\\x7F"


def _span(a: int, b: int) -> str:
    return f"\\U{a:08X}" if a == b else f"\\U{a:08X}-\\U{b:08X}"
