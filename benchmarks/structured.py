"""Structured output (issue 15, item 4): JSON-schema answers on both backends, checked with jsonschema.

    flock /tmp/edgepack-cpu.lock .venv/bin/python benchmarks/structured.py [--gguf F.gguf] [--onnx DIR] [--samples 20]
                                                                          [--threads 2] [--out structured.json]

Five schemas of different shapes (``SCHEMAS``: nested objects, arrays with minItems/maxItems,
enums, numbers and integers with ranges, required and optional properties, patterns and a
date format), each asked for by its own chat prompt, ``--samples`` answers each at
temperature 0.8 (seeds 0..), ``max_tokens`` 512, on llama.cpp (GGUF) and ONNX (onnxruntime-genai).

Per backend and schema: answers that ended by themselves (``stop``), those cut at ``length``,
and how many of the ``stop`` ones validate (``jsonschema``; the bar is all of them, and at
least 95% ending by themselves). Decode speed: the median decode tok/s of the constrained
answers against unconstrained answers to the same prompts (``max_tokens`` 128, seeds 0..4),
and on llama.cpp also with the grammar applied to the whole vocabulary at every token
(``llama_sampler_sample`` on the chain), what ``LlamaCppSession._sample``'s shortcut saves.
Default models: the SmolLM2-135M Q4_1 GGUF and int4 ONNX folder the tests keep in pytest's cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "d"
GGUF = CACHE / "edgepack-smollm2" / "sources" / "pypi" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
ONNX = CACHE / "edgepack-onnx"

SCHEMAS = {
    "person": (  # nested objects, an integer range, a pattern
        "Invent a person and give their name, age and home address as JSON.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "maxLength": 60},
                        "city": {"type": "string", "maxLength": 40},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["city", "zip"],
                },
            },
            "required": ["name", "age", "address"],
        },
    ),
    "article": (  # arrays with minItems/maxItems
        "Suggest a blog post about gardening: a title and a few tags, as JSON.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "minLength": 5, "maxLength": 80},
                "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,15}$"}, "minItems": 2, "maxItems": 5},
                "scores": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 5}, "maxItems": 3},
            },
            "required": ["title", "tags"],
            "additionalProperties": False,
        },
    ),
    "order": (  # enums, a boolean, const
        "A customer orders three coffees for tomorrow morning. Record the order as JSON.",
        {
            "type": "object",
            "properties": {
                "item": {"enum": ["coffee", "tea", "juice"]},
                "size": {"type": "string", "enum": ["small", "medium", "large"]},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 20},
                "status": {"const": "pending"},
                "express": {"type": "boolean"},
            },
            "required": ["item", "size", "quantity", "status", "express"],
        },
    ),
    "weather": (  # numbers with ranges, exclusive bounds, a nullable field
        "Report today's weather in Paris as JSON: temperature in Celsius, humidity percent, wind speed.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "temperature": {"type": "number", "minimum": -50, "maximum": 60},
                "humidity": {"type": "number", "minimum": 0, "maximum": 100},
                "wind": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 200},
                "warning": {"type": ["string", "null"], "maxLength": 60},
            },
            "required": ["city", "temperature", "humidity"],
        },
    ),
    "event": (  # required and optional properties, a date format, anyOf, an array of objects
        "Plan a team meeting next week as JSON: a name, the date, the time and who attends.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 50},
                "date": {"type": "string", "format": "date"},
                "time": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"},
                "online": {"type": "boolean"},
                "room": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 999}, {"type": "string", "maxLength": 20}]},
                "attendees": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string", "maxLength": 30}, "role": {"enum": ["host", "guest"]}},
                        "required": ["name"],
                    },
                    "minItems": 1,
                    "maxItems": 4,
                },
            },
            "required": ["name", "date", "time", "attendees"],
        },
    ),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ask(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def run_backend(path: Path, threads: int, samples: int) -> dict:
    import jsonschema

    import edgepack

    out: dict = {"model": str(path), "schemas": {}}
    with edgepack.load(path, threads=threads, n_ctx=2048) as s:
        out["backend"] = s.info.backend
        constrained, free = [], []
        for name, (prompt, schema) in SCHEMAS.items():
            row = {"samples": samples, "stop": 0, "length": 0, "valid": 0, "invalid": [], "tokens": []}
            for seed in range(samples):
                c = s.chat(_ask(prompt), schema=schema, temperature=0.8, max_tokens=512, seed=seed)
                row[c.finish_reason] = row.get(c.finish_reason, 0) + 1
                row["tokens"].append(c.completion_tokens)
                constrained.append(c.decode_tokens_per_s)
                if c.finish_reason == "stop":
                    try:
                        jsonschema.validate(json.loads(c.text), schema, format_checker=jsonschema.FormatChecker())
                        row["valid"] += 1
                    except (ValueError, jsonschema.ValidationError) as e:
                        row["invalid"].append({"seed": seed, "text": c.text, "error": str(e)[:300]})
            row["median_tokens"] = statistics.median(row.pop("tokens"))
            out["schemas"][name] = row
            _log(f"{s.info.backend:9} {name:8} stop {row['stop']}/{samples}  valid {row['valid']}/{row['stop']}  median {row['median_tokens']} tokens")
            for seed in range(5):
                free.append(s.chat(_ask(prompt), temperature=0.8, max_tokens=128, seed=seed).decode_tokens_per_s)
        out["decode_tok_s"] = {"constrained": statistics.median(constrained), "free": statistics.median(free)}
        if s.info.backend == "llama.cpp":
            out["decode_tok_s"]["constrained_full_vocab"] = _full_vocab_speed(s)
    total = {k: sum(r[k] for r in out["schemas"].values()) for k in ("samples", "stop", "length", "valid")}
    out["total"] = total
    return out


def _full_vocab_speed(session) -> float:
    """Median decode tok/s with the grammar applied to every token of the vocabulary each step (no shortcut)."""
    from edgepack.runtime import llamacpp

    session._sample = lambda chain, idx: llamacpp.ll.llama_sampler_sample(chain, session._ctx, idx)
    try:
        speeds = [session.chat(_ask(p), schema=sc, temperature=0.8, max_tokens=512, seed=seed).decode_tokens_per_s
                  for p, sc in SCHEMAS.values() for seed in range(3)]  # fmt: skip
    finally:
        del session._sample
    return statistics.median(speeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=GGUF)
    ap.add_argument("--onnx", type=Path, default=None, help="an ONNX folder (default: the SmolLM2 int4 build in pytest's cache)")
    ap.add_argument("--samples", type=int, default=20, help="answers per schema and backend")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("structured.json"))
    args = ap.parse_args()
    onnx = args.onnx or next(iter(sorted(ONNX.glob("smollm2-int4-*"))), None)
    if not args.gguf.is_file() or onnx is None:
        raise SystemExit("no model: give --gguf and --onnx, or run tests/runtime/test_onnx.py once to build the cached ones")
    result = {"samples_per_schema": args.samples, "temperature": 0.8, "max_tokens": 512, "threads": args.threads,
              "backends": [run_backend(args.gguf, args.threads, args.samples), run_backend(onnx, args.threads, args.samples)]}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'backend':10} {'schema':8} {'stop':>7} {'length':>6} {'valid/stop':>10}")
    for b in result["backends"]:
        for name, r in b["schemas"].items():
            print(f"{b['backend']:10} {name:8} {r['stop']:>3}/{r['samples']:<3} {r['length']:>6} {r['valid']:>5}/{r['stop']:<4}")
        t, d = b["total"], b["decode_tok_s"]
        speeds = ", ".join(f"{k} {v:.1f}" for k, v in d.items())
        print(f"{b['backend']:10} {'total':8} {t['stop']:>3}/{t['samples']:<3} {t['length']:>6} {t['valid']:>5}/{t['stop']:<4}  decode tok/s: {speeds}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
