"""Chat templates are rendered with jinja2 alone, as transformers renders them, and the runtime never imports transformers.

transformers is the reference where it is installed (the convert extra): the same template and
messages go through both. Without it the features are checked by what they must produce, and
SmolLM2's chat ids against ids transformers made (data/smollm2_chat_ids.json, itself checked
against transformers where it is installed), so the parity holds in the runtime-only install too.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest

import edgepack
from edgepack.errors import UsageError
from edgepack.runtime.chat_template import render

from chat_cases import CHATS

GOLDEN = Path(__file__).parent / "data" / "smollm2_chat_ids.json"
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
# Every extension, filter, global and whitespace rule transformers sets up, in one template.
FEATURES = """\
{%- set ns = namespace(turns=0) -%}
{{ bos_token }}
{% for m in messages %}
    {% if m.role == 'stop' %}{% break %}{% endif %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|{{ m.role }}|>{{ m.content }}
    {% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}
    {% if m.thinking %}[{{ m.thinking }}]{% endif %}
    {% if m.role == 'assistant' %}
{% generation %}{{ m.content | tojson }}{% endgeneration %}
    {% endif %}
{% endfor %}
{{ {"b": [1, 2], "a": "é"} | tojson(indent=2, sort_keys=True) }}
{{ {"a": "é", "b": "<&>"} | tojson(ensure_ascii=True, separators=(",", ":")) }}
{{ ns.turns }} {{ strftime_now("%Y") }}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""
MESSAGES = [
    {"role": "system", "content": "Be terse."},
    {"role": "skip", "content": "never shown"},
    {"role": "user", "content": "Hi ünï 😀"},
    {"role": "assistant", "content": "Hello \"you\"", "reasoning": "greet back"},
    {"role": "stop", "content": "the loop ends here"},
    {"role": "user", "content": "never shown either"},
]
RAISES = "{% if messages[0].role != 'user' %}{{ raise_exception('the first message must be the user') }}{% endif %}"


def test_features_render_as_transformers_documents_them():
    text = render(FEATURES, MESSAGES, SPECIALS, add_generation_prompt=True)
    assert text.startswith("<s>\n<|system|>Be terse.\n<|user|>Hi ünï 😀\n")  # trim_blocks, lstrip_blocks
    assert "never shown" not in text and "the loop ends here" not in text  # continue, break
    assert "<think>greet back</think>[greet back]" in text  # "reasoning" under both names templates read
    assert '"Hello \\"you\\""' in text  # {% generation %} renders its body
    assert '{\n  "a": "é",\n  "b": [\n    1,\n    2\n  ]\n}' in text  # indent, sort_keys, non-ASCII kept
    assert '{"a":"\\u00e9","b":"<&>"}' in text  # ensure_ascii, separators, no HTML escaping
    assert text.endswith(f"\n3 {datetime.datetime.now():%Y}\n<|assistant|>")
    with pytest.raises(UsageError, match="the first message must be the user"):
        render(RAISES, MESSAGES, SPECIALS, add_generation_prompt=False)


def test_features_render_exactly_as_transformers():
    transformers = pytest.importorskip("transformers", reason="transformers (the convert extra) is the reference")
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")), **SPECIALS)
    for generation_prompt in (True, False):
        expected = tok.apply_chat_template(MESSAGES, chat_template=FEATURES, tokenize=False, add_generation_prompt=generation_prompt)
        assert render(FEATURES, MESSAGES, SPECIALS, add_generation_prompt=generation_prompt) == expected
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="the first message must be the user"):
        tok.apply_chat_template(MESSAGES, chat_template=RAISES, tokenize=False)


def test_smollm2_chat_ids_equal_transformers(smollm2_gguf):
    """The real model's chat ids through llama.cpp equal transformers' (recorded; recorded ones re-checked where it is installed)."""
    golden = json.loads(GOLDEN.read_text())["ids"]
    with edgepack.load(smollm2_gguf, threads=1, n_ctx=256) as s:
        assert [s.chat_tokens(c) for c in CHATS] == golden


def test_the_recorded_ids_are_transformers(smollm2):
    transformers = pytest.importorskip("transformers", reason="transformers (the convert extra) is the reference")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    expected = [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)) for c in CHATS]
    assert json.loads(GOLDEN.read_text())["ids"] == expected


def test_loading_and_chatting_imports_no_transformers_or_torch(smollm2_gguf):
    """What an app embedding the runtime loads: a fresh interpreter, load + chat on a GGUF, then sys.modules."""
    code = (
        "import sys, edgepack\n"
        f"with edgepack.load({str(smollm2_gguf)!r}, threads=1, n_ctx=256) as s:\n"
        "    s.chat([{'role': 'user', 'content': 'Hi'}], max_tokens=4, temperature=0)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'safetensors', 'onnx', 'gptqmodel'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
