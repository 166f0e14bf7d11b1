"""Ollama Modelfiles: the Go template subset against Go's own text/template, each shape against the jinja templates it
stands for, and the Modelfiles of real GGUFs against the prompt text edgepack's own session renders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from models import CHAT_TEMPLATE, tiny_model

import edgepack
from edgepack.bundle import Bundle, Variant
from edgepack.fsutil import sha256_file
from edgepack.gotemplate import GoTemplateError, render
from edgepack.ollama import PROBES, SHAPES, match, ollama_prompt, ollama_values
from edgepack.runtime.chat_template import render as jinja_render

# Our own jinja templates written to the published prompt formats of Llama 3 Instruct and Gemma 2/3 (whose templates
# trim each message and put a BOS first), and one of a shape edgepack does not write for Ollama ([INST], Mistral's).
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}{% for m in turns %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + (first if loop.first else '')"
    " + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
INST_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Conversations beyond the probes a shape is chosen on: longer, multi-line, non-ASCII.
MORE = (
    (
        {"role": "system", "content": "Du bist kurz angebunden."},
        {"role": "user", "content": "Wie spät ist es?"},
        {"role": "assistant", "content": "Spät."},
        {"role": "user", "content": "Und morgen?"},
        {"role": "assistant", "content": "Früh.\n\nSehr früh."},
        {"role": "user", "content": "你好 🙂"},
    ),
    ({"role": "user", "content": "line one\nline two\n\n  indented"},),
)


# -- the Go template subset ------------------------------------------------------------------

GO_PROGRAM = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

// Executes {"template", "data"} from stdin with Ollama's options (missingkey=zero), writing the text to stdout.
func main() {
	var in struct {
		Template string         `json:"template"`
		Data     map[string]any `json:"data"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("").Option("missingkey=zero").Parse(in.Template))
	if err := t.Execute(os.Stdout, in.Data); err != nil {
		os.Stderr.WriteString(err.Error())
		os.Exit(3)
	}
}
"""

FEATURES = [  # (template, data, what Go's text/template writes)
    ("a  {{- .X -}}  \n b", {"X": "x"}, "axb"),
    ("a {{ .X }} b\n", {"X": "x"}, "a x b\n"),
    ("{{ if .A }}A{{ else if .B }}B{{ else }}C{{ end }}", {"A": "", "B": "b"}, "B"),
    ("{{ if .A }}A{{ else if .B }}B{{ else }}C{{ end }}", {"A": "", "B": ""}, "C"),
    ("{{ range $i, $m := .L }}{{ $i }}={{ .N }}{{ $m.N }}{{ $.T }};{{ end }}", {"L": [{"N": "p"}, {"N": "q"}], "T": "t"}, "0=ppt;1=qqt;"),
    ("{{ range .L }}[{{ . }}]{{ end }}", {"L": ["x", "y"]}, "[x][y]"),
    ("{{ range $m := .L }}{{ $m }}{{ end }}|{{ range .E }}never{{ end }}", {"L": ["a"], "E": []}, "a|"),
    ('{{ and .A .B }}|{{ or .A .B }}|{{ not .A }}|{{ eq .B "b" }}|{{ ne .B "b" }}', {"A": "", "B": "b"}, "|b|true|true|false"),
    ("{{ if and (eq (len .L) 2) (not .E) }}two{{ end }}", {"L": ["a", "b"], "E": []}, "two"),
    ('{{ if eq .R "user" }}u\n{{- else if eq .R "assistant" }}a{{ end }}', {"R": "assistant"}, "a"),
    ('{{ "tab\\there" }}', {}, "tab\there"),
]


@pytest.fixture(scope="session")
def go_template(tmp_path_factory):
    """Go's own text/template as a function (template, data) -> text; skipped where no Go toolchain is installed."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("needs the Go toolchain (apt-get install golang-go) to run text/template itself")
    folder = tmp_path_factory.mktemp("go")
    (folder / "main.go").write_text(GO_PROGRAM)
    env = {**os.environ, "GOCACHE": str(folder / "cache"), "GO111MODULE": "off", "GOFLAGS": ""}
    subprocess.run([go, "build", "-o", str(folder / "render"), "main.go"], cwd=folder, env=env, check=True, timeout=300)

    def run(template: str, data: dict) -> str:
        r = subprocess.run([str(folder / "render")], input=json.dumps({"template": template, "data": data}), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    return run


@pytest.mark.parametrize("template, data, expected", FEATURES)
def test_the_subset_renders_as_go_documents(template, data, expected):
    assert render(template, data) == expected


@pytest.mark.parametrize("template, data, expected", FEATURES)
def test_the_subset_renders_as_go_itself(go_template, template, data, expected):
    assert go_template(template, data) == expected


def test_go_itself_renders_every_shape_as_the_subset_does(go_template):
    for shape in SHAPES:
        for conversation in (*PROBES, *MORE):
            for system in (None, "A default system message."):
                values = ollama_values(conversation, system)
                assert go_template(shape.template, values) == render(shape.template, values), (shape.name, conversation)


@pytest.mark.parametrize(
    "template",
    ["{{ with .X }}x{{ end }}", "{{ .X | printf }}", "{{ $x := 1 }}", "{{ if .X }}open", "{{ index .L 0 }}", "{{ range .L }}{{ else }}{{ end }}", "{{ .Missing }}"],
)
def test_anything_outside_the_subset_is_refused_not_guessed(template):
    with pytest.raises(GoTemplateError):
        render(template, {"X": "x", "L": ["a"]})


# -- shapes against jinja templates ----------------------------------------------------------

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's: ChatML that adds a default system message (read from its GGUF in the slow test below)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI "
    "assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BOS = {"bos_token": "<bos>", "eos_token": "<eos>"}


@pytest.mark.parametrize(
    "jinja, add_bos, shape, system",
    [
        (CHAT_TEMPLATE, False, "ChatML", None),
        (SMOLLM2_TEMPLATE, False, "ChatML", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
        (LLAMA3_STYLE, True, "Llama 3", None),
        (GEMMA_STYLE, True, "Gemma", None),
    ],
)
def test_each_shape_renders_what_the_template_it_stands_for_renders(jinja, add_bos, shape, system):
    found = match(jinja, BOS, add_bos)
    assert found is not None and found.shape.name == shape and found.system == system
    bos = BOS["bos_token"] if add_bos else ""
    for conversation in (*PROBES, *MORE):
        want = jinja_render(jinja, conversation, BOS, add_generation_prompt=True)
        assert bos + ollama_prompt(found.shape.template, conversation, found.system) == want


def test_a_template_no_shape_renders_gets_none():
    assert match(INST_STYLE, BOS, True) is None
    assert match(LLAMA3_STYLE, BOS, False) is None  # the BOS the template writes would be missing from Ollama's prompt
    shouting = CHAT_TEMPLATE.replace("m['role']", "m['role'] | upper")
    assert match(shouting, BOS, False) is None


# -- Modelfiles of real GGUFs ----------------------------------------------------------------


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama's parser reads them: comments skipped, values to the end of the line,
    or across lines between triple quotes, verbatim; one pair of quotes stripped."""
    out, pos = [], 0
    for m in re.finditer(r'^(?:#[^\n]*|(\w+)[ \t]+(?:(\w+)[ \t]+)?("""(.*?)"""|"([^"\n]*)"|([^\n]*)))$', text, re.M | re.S):
        assert text[pos : m.start()].strip() == "", f"unparsed text: {text[pos:m.start()]!r}"
        pos = m.end()
        if m.group(1):
            name = m.group(1).upper()
            value = next(g for g in (m.group(4), m.group(5), m.group(6)) if g is not None)
            out.append((f"PARAMETER {m.group(2)}" if name == "PARAMETER" else name, value))
    assert text[pos:].strip() == ""
    return out


def _bundle(root: Path, gguf: Path, vid: str) -> Path:
    b = Bundle.create(root, root.name, {"ref": root.name})
    target = root / "variants" / vid / "model.gguf"
    target.parent.mkdir(parents=True)
    shutil.copyfile(gguf, target)
    b.add_variant(Variant(vid, "gguf", "llama.cpp", target.relative_to(root).as_posix(), [b.file_record(target)], None))
    b.save()
    return root


def _export(bundle: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack", "export", str(bundle), "--format", "ollama", "-o", str(out)],
                          capture_output=True, text=True)


CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And times three?"},
]


@pytest.mark.slow
def test_smollm2_modelfile_renders_what_edgepack_feeds_the_model(smollm2_gguf, tmp_path):
    bundle = _bundle(tmp_path / "smollm2", smollm2_gguf, "gguf-q4_1")
    r = _export(bundle, tmp_path / "ollama")
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "ollama" / "gguf-q4_1"
    commands = parse_modelfile((folder / "Modelfile").read_text())
    get = dict(commands)
    assert commands[0] == ("FROM", "./model.gguf")
    assert sha256_file(folder / "model.gguf") == sha256_file(smollm2_gguf)
    assert get["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert get["PARAMETER stop"] == "<|im_end|>"
    assert {k: float(v) for k, v in commands if k.startswith("PARAMETER ") and k != "PARAMETER stop"} == {
        "PARAMETER temperature": 0.7, "PARAMETER top_p": 0.95, "PARAMETER top_k": 40, "PARAMETER min_p": 0.0,
        "PARAMETER repeat_penalty": 1.0, "PARAMETER num_ctx": 4096}  # fmt: skip
    with edgepack.load(folder / "model.gguf", n_ctx=512, threads=1) as session:
        for conversation in (CONVERSATION, [{"role": "system", "content": "Be terse."}, *CONVERSATION]):
            assert ollama_prompt(get["TEMPLATE"], conversation, get["SYSTEM"]) == session.format_chat(conversation)


def test_gemma_modelfile_leaves_the_bos_to_the_vocabulary(tmp_path):
    """A tiny Gemma 3 whose vocabulary adds a BOS: the TEMPLATE has none, and BOS + Ollama's text is edgepack's."""
    from edgepack.converters.gguf import convert

    hf = tiny_model("gemma3", tmp_path / "m")
    (hf / "chat_template.jinja").write_text(GEMMA_STYLE)
    convert(hf, tmp_path / "m.gguf", "f16")
    bundle = _bundle(tmp_path / "tiny", tmp_path / "m.gguf", "gguf-f16")
    r = _export(bundle, tmp_path / "ollama")
    assert r.returncode == 0, r.stderr
    get = dict(parse_modelfile((tmp_path / "ollama" / "gguf-f16" / "Modelfile").read_text()))
    assert "SYSTEM" not in get and get["PARAMETER stop"] == "<end_of_turn>"
    with edgepack.load(tmp_path / "ollama" / "gguf-f16" / "model.gguf", n_ctx=256, threads=1) as session:
        for conversation in (CONVERSATION, [{"role": "system", "content": "Be terse."}, *CONVERSATION]):
            ollama = ollama_prompt(get["TEMPLATE"], conversation, None)
            assert "<bos>" + ollama == session.format_chat(conversation)
            # Ollama tokenizes its prompt with the vocabulary's specials: the same ids edgepack feeds the model
            assert session.tokenize(ollama, add_special=True) == session.chat_tokens(conversation)


def test_a_template_of_another_shape_is_left_out_in_one_line(tmp_path):
    from edgepack.converters.gguf import convert

    hf = tiny_model("llama", tmp_path / "m")
    (hf / "chat_template.jinja").write_text(INST_STYLE)
    convert(hf, tmp_path / "m.gguf", "f16")
    bundle = _bundle(tmp_path / "tiny", tmp_path / "m.gguf", "gguf-f16")
    r = _export(bundle, tmp_path / "ollama")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        "gguf-f16: no TEMPLATE: the model's chat template is none of the shapes edgepack writes for Ollama "
        "(ChatML, Llama 3, Gemma); Ollama picks one from the GGUF, or write one by hand"
    ]
    commands = parse_modelfile((tmp_path / "ollama" / "gguf-f16" / "Modelfile").read_text())
    assert [k for k, _ in commands if k in ("TEMPLATE", "SYSTEM", "PARAMETER stop")] == []
    assert commands[0] == ("FROM", "./model.gguf")


def test_a_bundle_without_gguf_variants_is_refused_in_one_line(tmp_path):
    b = Bundle.create(tmp_path / "b", "b", {"ref": "b"})
    onnx = tmp_path / "b" / "variants" / "onnx-int4" / "model.onnx"
    onnx.parent.mkdir(parents=True)
    onnx.write_bytes(b"onnx")
    b.add_variant(Variant("onnx-int4", "onnx", "onnx", "variants/onnx-int4", [b.file_record(onnx)], 4.0))
    b.save()
    r = _export(tmp_path / "b", tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "has no GGUF variant (it has: onnx-int4)" in r.stderr and "--to gguf:Q4_K_M" in r.stderr
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["b"]
