"""Ollama Modelfiles for a bundle's GGUF variants, with a TEMPLATE only where it is proven to match the model's own.

Ollama renders a chat with a Go template (its Modelfile's TEMPLATE), not with the jinja template the
GGUF carries. Translating arbitrary jinja is not possible, so edgepack knows three common shapes
(ChatML, Llama 3, Gemma) as Go templates, and picks the one that, rendered the way Ollama renders
a chat, gives the same text as the model's own template (``runtime.chat_template``, what
``edgepack chat`` feeds the model) for every sample conversation in ``PROBES``. A template that
adds a default system message when none is given (SmolLM2's, Qwen2.5's) becomes the Modelfile's
SYSTEM, which Ollama puts first in the same case. No shape matching: no TEMPLATE, and one line
saying so (Ollama then picks a template of its own from the GGUF's).

How Ollama renders a chat (its template/template.go and server/routes.go): SYSTEM is prepended
as a system message when the first message is not one; consecutive messages of one role are
joined with a blank line; the template gets ``.Messages`` (system messages included, each with
``.Role`` and ``.Content``) and ``.System`` (the system messages joined); the prompt is then
tokenized with the vocabulary's own specials, so a BOS the GGUF adds is not in the template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UsageError
from .gguf_header import gguf_metadata
from .gotemplate import GoTemplateError
from .gotemplate import render as go_render


@dataclass(frozen=True)
class Shape:
    name: str
    template: str  # Go text/template, as Ollama reads it
    stops: tuple[str, ...]  # the end-of-turn text: Ollama stops there


SHAPES = (
    Shape(
        "ChatML",  # Qwen2/2.5, SmolLM2, Hermes
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_end|>",),
    ),
    Shape(
        "Llama 3",  # Llama 3 Instruct: BOS comes from the vocabulary
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>",),
    ),
    Shape(
        "Gemma",  # Gemma 2 and 3: the system message opens the first user turn; the assistant is "model"
        '{{- range $i, $m := .Messages }}\n{{- if eq .Role "user" }}<start_of_turn>user\n'
        "{{ if and (eq $i 1) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
        '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}\n'
        "{{- end }}<start_of_turn>model\n",
        ("<end_of_turn>",),
    ),
)

# Sample conversations a TEMPLATE must render exactly as the model's own template does.
PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is the capital of France?"},),
    ({"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}),
    (
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Count to three, please."},
    ),
    (
        {"role": "system", "content": "Be brief.\nUse lists."},
        {"role": "user", "content": "Two fruits?"},
        {"role": "assistant", "content": "- apple\n- pear"},
        {"role": "user", "content": "Two more."},
    ),
)

# Sampling defaults when the model's generation_config asks for none: edgepack's own (runtime SamplingParams),
# so `ollama run` samples as `edgepack run` does. Ollama's defaults differ (temperature 0.8, repeat_penalty 1.1).
DEFAULTS = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.0, "repeat_penalty": 1.0}
N_CTX = 4096  # edgepack's default context, capped at the trained one as the runtime caps it
_FROM_GENERATION_CONFIG = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}


@dataclass(frozen=True)
class Match:
    shape: Shape
    system: str | None  # the default system message the model's template adds, as Ollama's SYSTEM


def ollama_values(messages: Sequence[dict[str, str]], system: str | None) -> dict[str, Any]:
    """The data Ollama executes a chat TEMPLATE on, for ``messages`` under a Modelfile whose SYSTEM is ``system``."""
    msgs = [dict(m) for m in messages]
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    collated: list[dict[str, str]] = []
    for m in msgs:
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    joined = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    return {"System": joined, "Messages": collated, "Tools": None, "Response": "", "Think": False}


def ollama_prompt(template: str, messages: Sequence[dict[str, str]], system: str | None) -> str:
    """The prompt text Ollama renders for ``messages`` with TEMPLATE ``template`` and SYSTEM ``system``."""
    return go_render(template, ollama_values(messages, system))


def match(jinja: str, specials: dict[str, str], add_bos: bool) -> Match | None:
    """The shape (and default system message) whose Ollama rendering equals ``jinja``'s for every probe, or None."""
    from .runtime.chat_template import render

    bos = specials.get("bos_token", "") if add_bos else ""
    try:
        want = [render(jinja, p, specials, add_generation_prompt=True) for p in PROBES]
    except (UsageError, ValueError):  # a template that rejects a plain conversation has no Ollama equivalent either
        return None
    for shape in SHAPES:
        try:
            system = _default_system(shape, want[0], bos)
            if all(bos + ollama_prompt(shape.template, p, system) == w for p, w in zip(PROBES, want)):
                return Match(shape, system)
        except GoTemplateError:
            continue
    return None


def _default_system(shape: Shape, want: str, bos: str) -> str | None:
    """The system message ``want`` (the model's rendering of the first probe) holds though the probe has none."""
    if bos + ollama_prompt(shape.template, PROBES[0], None) == want:
        return None
    marker = "\x00system\x00"
    before, _, after = (bos + ollama_prompt(shape.template, PROBES[0], marker)).partition(marker)
    if want.startswith(before) and want.endswith(after) and len(want) > len(before) + len(after):
        return want[len(before) : len(want) - len(after)]
    return None


def modelfile(gguf: Path, from_path: str, *, name: str, variant: str, generation_config: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """(the Modelfile's text, None) for the GGUF at ``gguf`` named in FROM as ``from_path``; when no TEMPLATE can be
    written, the second item says why in one line. Raises UsageError for text a Modelfile cannot carry."""
    meta = gguf_metadata(gguf)
    jinja = meta.get("tokenizer.chat_template")
    lines = [f"# Ollama Modelfile for {name}, variant {variant}, written by edgepack {__version__}.",
             f"# Create the model: ollama create {name}-{variant.removeprefix('gguf-')} -f Modelfile", f"FROM {from_path}"]
    reason = None
    if not jinja:
        reason = "no TEMPLATE: the model has no chat template (a base model): use it for completion"
    elif (found := match(jinja, _specials(gguf, meta), bool(meta.get("tokenizer.ggml.add_bos_token")))) is None:
        reason = (f"no TEMPLATE: the model's chat template is none of the shapes edgepack writes for Ollama "
                  f"({', '.join(s.name for s in SHAPES)}); Ollama picks one from the GGUF, or write one by hand")
    else:
        lines.insert(2, f"# TEMPLATE: the model's chat template as {found.shape.name}, checked to give the same prompt "
                        f"text as edgepack on {len(PROBES)} sample conversations.")
        lines.append(f'TEMPLATE """{_triple(found.shape.template)}"""')
        if found.system:
            lines.append(f'SYSTEM """{_triple(found.system)}"""')
        lines += [f'PARAMETER stop "{s}"' for s in found.shape.stops]
    if reason:
        lines.insert(2, f"# {reason}")
    lines += [f"PARAMETER {k} {v}" for k, v in parameters(meta, generation_config).items()]
    return "\n".join(lines) + "\n", f"{variant}: {reason}" if reason else None


def parameters(meta: dict[str, Any], generation_config: dict[str, Any] | None) -> dict[str, Any]:
    """Ollama's sampling and context PARAMETERs: edgepack's defaults, the model's generation_config where it samples."""
    out: dict[str, Any] = dict(DEFAULTS)
    gc = generation_config or {}
    if gc.get("do_sample"):  # the makers' recommended sampling; without do_sample transformers ignores these too
        for key, param in _FROM_GENERATION_CONFIG.items():
            if isinstance(gc.get(key), (int, float)) and not isinstance(gc.get(key), bool):
                out[param] = gc[key]
    if out["repeat_penalty"] != 1.0:
        out["repeat_last_n"] = -1  # edgepack's penalty covers the whole context; Ollama's the last 64 tokens unless told
    trained = meta.get(f"{meta.get('general.architecture')}.context_length")
    out["num_ctx"] = min(N_CTX, trained) if isinstance(trained, int) else N_CTX
    return out


def _specials(gguf: Path, meta: dict[str, Any]) -> dict[str, str]:
    """``bos_token`` and ``eos_token`` as the jinja template sees them, read from the GGUF's vocabulary."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.tokens")
    out = {}
    for name, key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")):
        tid = meta.get(key)
        if field is not None and isinstance(tid, int) and 0 <= tid < len(field.data):
            out[name] = bytes(field.parts[field.data[tid]]).decode("utf-8", "replace")
    return out


def _triple(text: str) -> str:
    """``text`` as Ollama's parser reads it between triple quotes: verbatim, so no \"\"\" and only printable characters."""
    if '"""' in text or any(not (c.isprintable() or c in "\n\t") for c in text):
        raise UsageError(f"a Modelfile cannot carry {text[:60]!r} (triple quotes or control characters): write the Modelfile by hand")
    return text
