"""The command line: help on every command, doctor, one-line errors, and a backend-free import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgepack.cli import app


def _run(*args):
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True)


def _commands():
    import typer.main

    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help_with_an_example(command):
    r = _run(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout
    assert "xample" in r.stdout, f"`edgepack {command} --help` shows no example"


def test_doctor_json():
    r = _run("doctor", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["libraries"]["llama-cpp-python"]["version"]
    assert report["backends"]["llama.cpp"]["cpu"] is True
    assert report["backends"]["onnx"]["cpu"] is True
    assert report["ram_free_gb"] > 0 and report["disk_free_gb"] > 0


def test_doctor_probes_each_backend_and_says_why_one_fails():
    """The llama.cpp figures come from loading a model, not from a literal: a broken probe or library shows, with its error."""
    code = (
        "import json, sys, edgepack.doctor as d, edgepack.runtime.llamacpp as llamacpp\n"
        "if sys.argv[1] == 'bad-model':\n"
        "    llamacpp.write_probe_gguf = lambda path: path.write_bytes(b'GGUF' + bytes(64))\n"
        "else:\n"
        "    sys.modules['llama_cpp'] = sys.modules['onnxruntime_genai'] = None  # import fails\n"
        "print(json.dumps(d.diagnose()['backends']))\n"
    )
    bad_model = json.loads(subprocess.run([sys.executable, "-c", code, "bad-model"], capture_output=True, text=True, check=True).stdout)
    assert bad_model["llama.cpp"]["cpu"] is False and "cpu" in bad_model["llama.cpp"]["errors"]
    assert bad_model["onnx"]["cpu"] is True
    missing = json.loads(subprocess.run([sys.executable, "-c", code, "missing"], capture_output=True, text=True, check=True).stdout)
    assert missing["llama.cpp"] == {"cpu": False, "cuda": False, "metal": False, "error": missing["llama.cpp"]["error"]}
    assert "llama-cpp-python is needed" in missing["llama.cpp"]["error"]
    assert missing["onnx"]["cpu"] is False and "onnxruntime_genai" in missing["onnx"]["error"]
    r = _run("doctor")
    assert r.returncode == 0 and "llama.cpp" in r.stdout


def test_import_is_backend_free():
    code = "import sys, edgepack, edgepack.bundle, edgepack.convert; print(sorted(m for m in ('llama_cpp','onnxruntime','onnxruntime_genai','torch','textual') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_unknown_variant_format_is_one_line(tmp_path):
    r = _run("convert", "smollm2-135m", "--to", "zip:9", "-o", str(tmp_path / "b"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown variant format 'zip'")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_debug_shows_traceback():
    r = _run("--debug", "inspect", "/nonexistent/model")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["inspect"], "Missing argument 'path'"),
        (["convert", "smollm2-135m", "--bogus"], "No such option: --bogus"),
        (["run", "model.gguf", "hi", "--temp", "warm"], "Invalid value for '--temp'"),
        (["pull"], "give the model to pull"),
    ],
)
def test_usage_errors_name_the_problem_and_exit_2(args, says):
    r = _run(*args)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr
    assert "unexpected" not in r.stderr and "Traceback" not in r.stderr


def test_pull_lists_the_recipes_without_a_model():
    r = _run("pull", "--list")
    assert r.returncode == 0, r.stderr
    assert sorted(line.split("\t")[0] for line in r.stdout.splitlines()) == ["gemma3-270m", "smollm2-135m"]
