"""``edgepack run``: the real command in a subprocess on the real SmolLM2 GGUF."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import edgepack

FAST = ["--threads", "1", "--n-ctx", "512", "--temp", "0"]
QUESTION = "What is 2+2?"


def _run(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "edgepack", "run", *map(str, args)], capture_output=True, text=True, input=stdin)


@pytest.fixture(scope="module")
def expected(smollm2_gguf):
    """What the Python API answers, greedy: the command must print the same."""
    with edgepack.load(smollm2_gguf, threads=1, n_ctx=512) as s:
        return {
            "chat": s.chat([{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0).text,
            "system": s.chat(
                [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
            ).text,
            "raw": s.generate("The capital of France is", max_tokens=6, temperature=0).text,
        }


@pytest.mark.slow
def test_streams_the_answer_from_an_argument_or_stdin(smollm2_gguf, expected):
    r = _run(smollm2_gguf, QUESTION, "-n", 12, *FAST)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected["chat"] + ("" if expected["chat"].endswith("\n") else "\n")
    r = _run(smollm2_gguf, "-n", 12, *FAST, stdin=QUESTION)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected["chat"].rstrip("\n")
    r = _run(smollm2_gguf, QUESTION, "-n", 12, "--system", "Answer in French.", *FAST)
    assert r.stdout.rstrip("\n") == expected["system"].rstrip("\n")
    r = _run(smollm2_gguf, "The capital of France is", "--raw", "-n", 6, *FAST)
    assert r.stdout.rstrip("\n") == expected["raw"].rstrip("\n")


@pytest.mark.slow
def test_json_reports_counts_and_timings(smollm2_gguf, expected):
    r = _run(smollm2_gguf, QUESTION, "-n", 12, "--json", *FAST)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == expected["chat"]
    assert out["completion_tokens"] <= 12 and out["prompt_tokens"] > 10
    assert out["finish_reason"] in ("stop", "length")
    assert out["ttft_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert out["model"]["backend"] == "llama.cpp" and out["model"]["n_ctx"] == 512
    stop = expected["chat"][3:6]
    out = json.loads(_run(smollm2_gguf, QUESTION, "-n", 12, "--json", "--stop", stop, *FAST).stdout)
    assert (out["finish_reason"], out["text"]) == ("stop", expected["chat"][: expected["chat"].index(stop)])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "stdin", "code", "message"),
    [
        (["{gguf}", QUESTION, "--temp", "-1"], None, 2, "temperature must be >= 0"),
        (["{gguf}"], "", 2, "the prompt is empty"),
        (["{gguf}", "hi", "--raw", "--system", "x"], None, 2, "--system needs the chat template"),
        (["{gguf}", "hi", "--truncate", "left"], None, 2, "--truncate left needs --raw"),
        (["{gguf}", "hi", "--backend", "onnx"], None, 2, "cannot be loaded with backend='onnx'"),
        (["{gguf}", "word " * 600, "--n-ctx", "256"], None, 1, "raise n_ctx"),
        (["/no/such/model.gguf", "hi"], None, 1, "no model at"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(smollm2_gguf, args, stdin, code, message):
    r = _run(*[a.format(gguf=smollm2_gguf) for a in args], "--threads", "1", stdin=stdin)
    assert r.returncode == code, r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.slow
def test_truncate_left_lets_a_long_raw_prompt_through(smollm2_gguf):
    r = _run(smollm2_gguf, "word " * 600, "--raw", "--truncate", "left", "-n", 4, "--json", *FAST)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["truncated_tokens"] > 0 and out["prompt_tokens"] + 4 == out["model"]["n_ctx"] == 512


def test_a_model_without_chat_template_says_how_to_prompt_it(tmp_path):
    """A base model (the offline Gemma 3 is one) cannot chat: one line pointing at --raw, and --raw works."""
    from models import tiny_model

    from edgepack.converters.gguf import convert

    hf_dir = tiny_model("llama", tmp_path / "hf")
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (hf_dir / "chat_template.jinja").unlink(missing_ok=True)
    gguf = convert(hf_dir, tmp_path / "base.gguf", "f16").path
    r = _run(gguf, QUESTION, "-n", 2, *FAST)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "has no chat template" in r.stderr and "--raw" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert _run(gguf, QUESTION, "--raw", "-n", 2, *FAST).returncode == 0
