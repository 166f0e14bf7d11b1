"""The runtime-only install, for real: ``pip install <checkout>`` without extras into a fresh venv, then the runtime in it.

The CI bar of issue 14: no torch, transformers, tokenizers or huggingface_hub in that venv, and an app's three lines (import,
load, chat) work there on the real SmolLM2 GGUF with transformers' chat ids. A bundle whose
first variant needs the gptq extra still loads its GGUF variant, and asking for the GPTQ one
(or for ``convert``) fails in one line naming the extra. Needs PyPI; pip's wheel cache holds
the compiled llama-cpp-python, so the install takes a minute, not a build. The size bar
(venv vs llama-cpp-python + onnxruntime-genai) is measured by ``benchmarks/startup.py --venv-sizes``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.bundle import Bundle, Variant

from chat_cases import CHATS

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "runtime" / "data" / "smollm2_chat_ids.json"

pytestmark = [pytest.mark.slim, pytest.mark.slow]

IN_VENV = """
import importlib.util, json, sys
from pathlib import Path
present = [m for m in ("torch", "transformers", "safetensors", "gptqmodel", "tokenizers", "huggingface_hub")
           if importlib.util.find_spec(m) is not None]
assert not present, f"the runtime-only install has {present}"
import edgepack
from edgepack.errors import MissingDependencyError
gguf, bundle, cases, onnx = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()), Path(sys.argv[4])
with edgepack.load(gguf, threads=1, n_ctx=512) as s:
    ids = [s.chat_tokens(c) for c in cases["chats"]]
    answer = s.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12, temperature=0).text
with edgepack.load(onnx, threads=1, n_ctx=512) as s:
    onnx_ids = [s.chat_tokens(c) for c in cases["chats"]]
    onnx_answer = s.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12, temperature=0).text
with edgepack.load(bundle, threads=1, n_ctx=256) as s:  # the first variant needs the gptq extra: the GGUF one loads
    picked = s.info.variant
try:
    edgepack.load(bundle, variant="gptq-4")
    gptq = "loaded"
except MissingDependencyError as e:
    gptq = str(e)
print(json.dumps({"ids_equal": ids == cases["ids"], "answer": answer, "picked": picked, "gptq": gptq,
                  "onnx_ids_equal": onnx_ids == cases["ids"], "onnx_answer": onnx_answer,
                  "modules": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "tokenizers"})}))
"""


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("slim") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    src = tmp_path_factory.mktemp("src") / "edgepack"  # a clean copy: no build artefacts or caches of the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", ".pytest_cache", "build", "*.egg-info", "__pycache__"))
    proc = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(src)],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def _mixed_bundle(root: Path, gguf: Path) -> Path:
    """A bundle listing a GPTQ variant first (needs the gptq extra), then SmolLM2's GGUF."""
    b = Bundle.create(root, "smollm2-135m", {"files": []})
    gptq = root / "variants" / "gptq-4"
    gptq.mkdir(parents=True)
    (gptq / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    model = root / "variants" / "gguf-q4_1" / gguf.name
    model.parent.mkdir(parents=True)
    shutil.copyfile(gguf, model)
    b.add_variant(Variant("gptq-4", "gptq", "transformers", "variants/gptq-4", [b.file_record(gptq / "config.json")]))
    b.add_variant(Variant("gguf-q4_1", "gguf", "llama.cpp", f"variants/gguf-q4_1/{gguf.name}", [b.file_record(model)]))
    b.save()
    return root


def test_the_runtime_runs_without_torch_or_transformers(slim_venv, smollm2_gguf, smollm2_onnx, tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"chats": CHATS, "ids": json.loads(GOLDEN.read_text())["ids"]}))
    bundle = _mixed_bundle(tmp_path / "bundle", smollm2_gguf)
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([str(slim_venv / "bin" / "python"), "-c", IN_VENV, str(smollm2_gguf), str(bundle), str(cases), str(smollm2_onnx)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["modules"] == []
    assert out["ids_equal"]  # transformers' chat ids, without transformers
    assert out["answer"].strip()  # a chat turn (this 135M Q4_1 is no geographer: its answer is not checked)
    assert out["onnx_ids_equal"] and out["onnx_answer"].strip()  # the same ids on ONNX, without the tokenizers package
    assert out["picked"] == "gguf-q4_1"
    assert "pip install 'edgepack[gptq]'" in out["gptq"]

    convert = subprocess.run([str(slim_venv / "bin" / "edgepack"), "convert", "smollm2-135m"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert convert.returncode == 1
    assert convert.stderr.strip().splitlines() == [convert.stderr.strip()] and "pip install 'edgepack[convert]'" in convert.stderr
