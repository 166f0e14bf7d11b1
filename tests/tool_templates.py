"""Chat templates of our own that take tools, one per family's wire format (the families' own template text is not shipped).

Each renders the tools, an assistant message's tool calls and a tool's result the way its family does:
where the tools go, the call markers, the role of a tool result. ``NO_TOOLS`` is a template that takes none.
"""

from __future__ import annotations

# Qwen 2.5/3 and Hermes: ChatML, tools listed in the system turn, calls in <tool_call> tags, results as a user turn.
HERMES = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}You may call these functions:
<tools>
{% for t in tools %}{{ t | tojson }}
{% endfor %}</tools>
Call one as <tool_call>{"name": <name>, "arguments": <object>}</tool_call>.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}
<|im_start|>{{ 'user' if m.role == 'tool' else m.role }}
{% if m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>{% else %}{{ m.content }}{% endif %}
{% for c in m.tool_calls or [] %}<tool_call>{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>{% endfor %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Llama 3.x: a JSON object with "parameters" as the whole answer, results under the role ipython.
LLAMA3 = """\
{{ bos_token }}{% if tools %}<|start_header_id|>system<|end_header_id|>

To call a function, answer with only {"name": <name>, "parameters": <object>}. The functions:
{% for t in tools %}{{ t.function | tojson }}
{% endfor %}<|eot_id|>{% endif %}
{%- for m in messages %}<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>

{% if m.tool_calls %}{% for c in m.tool_calls %}{{ {"name": c.function.name, "parameters": c.function.arguments} | tojson }}{% endfor %}<|eom_id|>
{% else %}{{ m.content }}<|eot_id|>
{% endif %}{% endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

# Mistral: [AVAILABLE_TOOLS] first, calls as a [TOOL_CALLS] array, results in [TOOL_RESULTS]; ids of 9 characters.
MISTRAL = """\
{{ bos_token }}{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' or m.role == 'system' %}[INST]{{ m.content }}[/INST]
{%- elif m.role == 'tool' %}
{%- if m.tool_call_id | length != 9 %}{{ raise_exception('tool_call_id must be 9 characters') }}{% endif %}
[TOOL_RESULTS]{{ {"call_id": m.tool_call_id, "content": m.content} | tojson }}[/TOOL_RESULTS]
{%- elif m.tool_calls %}[TOOL_CALLS][
{%- for c in m.tool_calls %}
{%- if c.id | length != 9 %}{{ raise_exception('tool call ids must be 9 characters') }}{% endif %}
{{- {"name": c.function.name, "arguments": c.function.arguments, "id": c.id} | tojson }}{{ ', ' if not loop.last }}
{%- endfor %}]{{ eos_token }}
{%- else %}{{ m.content }}{{ eos_token }}{% endif %}
{%- endfor %}"""

# Phi-4-mini: tools as JSON text in the system message's own "tools" field; the template shows no calls.
PHI = """\
{% for message in messages %}
{%- if message.role == 'system' and message['tools'] %}<|system|>{{ message.content }}<|tool|>{{ message['tools'] }}<|/tool|><|end|>
{%- else %}<|{{ message.role }}|>{{ message.content }}<|end|>{% endif %}
{%- endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"""

# Gemma 3 and SmolLM2 render no tools.
NO_TOOLS = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# (template, tiny architecture, the format its calls come in)
FAMILIES = {
    "hermes": (HERMES, "qwen2"),
    "llama3": (LLAMA3, "llama"),
    "mistral": (MISTRAL, "mistral"),
    "phi": (PHI, "phi3"),
}
