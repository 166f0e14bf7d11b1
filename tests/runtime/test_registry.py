"""The backend registry: adding a backend is one module and one registration, and every consumer then sees it.

``EchoBackend`` is a throwaway backend, registered from inside the test: its "model" is a
``.echo`` text file, its tokens are the words of the text, and it answers by repeating the
prompt word by word. ``edgepack.load``, ``edgepack run``, bench's selection and its worker,
doctor, inspect and the report all find it through the registry, and forget it once it is
unregistered.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import edgepack
from edgepack.bundle import Bundle, Variant
from edgepack.errors import UsageError
from edgepack.runtime import Backend, registry
from edgepack.runtime.base import ModelInfo, SamplingParams, Scores, Session

WORDS = re.compile(r"\s*\S+|\s+")


class EchoSession(Session):
    def __init__(self, path: Path, *, device: str, n_ctx: int | None, threads: int | None) -> None:
        self.vocab = {"</s>": 0}
        for word in WORDS.findall(path.read_text()):
            self.vocab.setdefault(word, len(self.vocab))
        super().__init__(ModelInfo(path, "echo", device, n_ctx or 4096, threads))

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in WORDS.findall(text)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return "".join(words[t] for t in tokens)

    def _generate(self, tokens: list[int], params: SamplingParams, cancelled: threading.Event) -> Iterator[str]:
        for t in tokens:  # the prompt back, then end of text
            yield self.detokenize([t])

    def _score(self, tokens: list[int], top_k: int) -> Scores:
        return Scores(np.full(len(tokens) - 1, -math.log(len(self.vocab))))

    def _chat_template(self) -> tuple[str, dict[str, str]]:
        return "{% for m in messages %}{{ m.content }}{% endfor %}", {}

    def _close(self) -> None:
        pass


class EchoBackend(Backend):
    name = "echo"
    formats = ("echo",)
    what = "an .echo file"
    install = "there is no GPU echo"
    can_score = False

    def claims(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".echo"

    def devices(self) -> list[str]:
        return ["cpu"]

    def open(
        self, path: Path, *, device: str, n_ctx: int | None, threads: int | None, kv_type: str = "f16", draft: str | None = None
    ) -> EchoSession:
        return EchoSession(path, device=device, n_ctx=n_ctx, threads=threads)

    def probe(self, device: str, folder: Path) -> bool:
        (folder / "probe.echo").write_text("ping")
        with self.open(folder / "probe.echo", device=device, n_ctx=16, threads=1) as s:
            return s.generate("ping", max_tokens=1).text == "ping"


@pytest.fixture
def echo():
    backend = registry.register(EchoBackend())
    yield backend
    registry.unregister("echo")


def _bundle(root: Path) -> Bundle:
    model = root / "variants" / "echo-1" / "model.echo"
    model.parent.mkdir(parents=True)
    model.write_text("hello world")
    b = Bundle.create(root, "echo", {"ref": "echo", "origin": "test", "files": []})
    b.add_variant(Variant("echo-1", "echo", "echo", "variants/echo-1/model.echo", [b.file_record(model)]))
    b.save()
    return b


def test_a_backend_registered_in_a_test_is_seen_everywhere(echo, tmp_path, monkeypatch):
    from edgepack import bench as bench_mod
    from edgepack.cli import app
    from edgepack.doctor import diagnose
    from edgepack.inspect import inspect_path
    from edgepack.report import render

    model = tmp_path / "m.echo"
    model.write_text("the quick brown fox")
    # load: detection by claims, device by devices(), the session by open()
    with edgepack.load(model) as s:
        assert (s.info.backend, s.info.device, s.info.name) == ("echo", "cpu", "m")
        assert s.generate("one two three", temperature=0).text == "one two three"
    with pytest.raises(UsageError, match="there is no GPU echo"):
        edgepack.load(model, device="cuda")
    b = _bundle(tmp_path / "b")
    with edgepack.load(b.root) as s:
        assert s.info.variant == "echo-1"

    # run, through the CLI in this process
    r = CliRunner().invoke(app, ["run", str(model), "red green blue", "--raw", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text"] == "red green blue" and json.loads(r.stdout)["model"]["backend"] == "echo"

    # bench picks the variant; its worker (here in this process, where the registration lives) runs it
    monkeypatch.setattr(bench_mod, "_run_worker", bench_mod._worker)
    cfg = bench_mod.BenchConfig(prompt_tokens=8, decode_tokens=4, repetitions=1, warmup=0)
    runs = bench_mod.bench(b, cfg)["runs"]
    assert runs["echo-1@cpu"]["backend"] == "echo" and runs["echo-1@cpu"]["completion_tokens"]["median"] == 4
    assert "echo" in registry.names()

    # eval asks for its capabilities: it cannot score
    from edgepack.eval import evaluate

    with pytest.raises(UsageError, match="cannot score"):
        evaluate(b)

    # doctor probes it, inspect and the report name it
    report = diagnose()
    assert report["backends"]["echo"] == {"cpu": True, "cuda": False, "metal": False}
    assert report["gpu_install"]["echo"] == "there is no GPU echo"
    assert inspect_path(model) == {"kind": "echo", "path": str(model), "bytes": model.stat().st_size, "backend": "echo"}
    assert inspect_path(b.root)["variants"][0]["runs_on"] == "echo"
    assert "run `edgepack bench`" in render({**Bundle.open(b.root).data, "bench": {}})["report.md"]

    # the server says what the backend can do
    from edgepack.runtime.server import create_app
    from starlette.testclient import TestClient

    with edgepack.load(model) as s:
        app = create_app(s)
        try:
            with TestClient(app) as client:
                assert client.get("/health").json()["capabilities"] == {"stream": True, "score": False, "chat": True, "cancel": True, "parallel": False, "embed": False}
                answer = client.post("/v1/completions", json={"prompt": "to be or not", "max_tokens": 8}).json()
                assert answer["choices"][0]["text"] == "to be or not"
                refused = client.post("/v1/embeddings", json={"input": "to be"})
                assert refused.status_code == 400 and refused.json()["error"]["message"] == (
                    "the echo backend cannot embed text: serve a GGUF variant for embeddings")
        finally:
            app.state.gate.close()

    # gone once unregistered
    registry.unregister("echo")
    with pytest.raises(UsageError, match="is not a bundle folder, a .gguf file"):
        edgepack.load(model)
    assert "No speed figures" in render({**Bundle.open(b.root).data, "bench": {}})["report.md"]
    with pytest.raises(UsageError, match="does not load"):
        bench_mod.bench(b, variants=["echo-1"])
    registry.register(echo)  # for the fixture's unregister


def test_names_are_unique_and_unknown_ones_listed(echo):
    with pytest.raises(UsageError, match="registered already"):
        registry.register(EchoBackend())
    with pytest.raises(UsageError, match="unknown backend 'vllm': choose auto, llama.cpp, onnx, transformers, echo"):
        edgepack.load("model.gguf", backend="vllm")
    assert [b.name for b in registry.backends()] == ["llama.cpp", "onnx", "transformers", "echo"]
    assert registry.capabilities("echo") == {"stream": True, "score": False, "chat": True, "cancel": True, "parallel": False, "embed": False}


def test_the_built_in_backends_claim_their_formats(tmp_path):
    gguf, onnx, gptq, ckpt = tmp_path / "m.gguf", tmp_path / "onnx", tmp_path / "gptq", tmp_path / "ckpt"
    gguf.write_bytes(b"GGUF")
    for folder in (onnx, gptq, ckpt):
        folder.mkdir()
    (onnx / "genai_config.json").write_text("{}")
    (gptq / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')
    (ckpt / "config.json").write_text("{}")
    assert [getattr(registry.claiming(p), "name", None) for p in (gguf, onnx, gptq, ckpt)] == ["llama.cpp", "onnx", "transformers", None]
    assert registry.get("transformers").accepts(ckpt)  # a float checkpoint runs when transformers is asked for by name
    assert [registry.for_format(f).name for f in ("gguf", "onnx", "gptq")] == ["llama.cpp", "onnx", "transformers"]
