"""export --format hf and push: the hub folder is a bundle with a model card, a signature survives export, bad input
gets one line and leaves nothing, and push sends the export to a hub endpoint (a real HTTP server on loopback)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from models import gguf_bundle

from edgepack.bundle import MANIFEST, Bundle
from edgepack.fsutil import sha256_file
from edgepack.publish import export
from edgepack.report import report
from edgepack.trust import keygen, sign, verify

EVAL = {"kld": {"mean": 0.01234, "p99": 0.2, "sem": 0.001}, "ppl": 12.5, "top1_agreement": 0.9, "mean_abs_dp": 0.01,
        "generation": {"bleu": 50.0, "rouge_l": 0.7, "exact_match": 0.5}}  # fmt: skip
RUN = {"variant": "gguf-q4_1", "device": "cpu", "threads": 2, "load_s": 0.2, "peak_rss_bytes": 300 * 2**20,
       **{k: {"median": m, "min": m * 0.9, "max": m * 1.1} for k, m in (("ttft_s", 0.05), ("prefill_tokens_per_s", 800.0), ("decode_tokens_per_s", 60.0))}}  # fmt: skip


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgepack", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.fixture
def measured(smollm2_gguf, tmp_path):
    """A bundle of the real SmolLM2 Q4_1 GGUF (copied: tests here change bundles) with eval and bench results and a report."""
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(smollm2_gguf, gguf)
    root = gguf_bundle(tmp_path / "smollm2", gguf)
    b = Bundle.open(root)
    b.record_eval("gguf-q4_1", EVAL)
    b.record_bench(RUN, {"cpu": "test cpu", "cores_physical": 2, "ram_bytes": 8 * 2**30, "os": "Linux"})
    b.save()
    report(b)
    (root / "calibration").mkdir()
    (root / "calibration" / "imatrix.dat").write_bytes(b"imatrix")
    return root


def _front_matter(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def test_hub_folder_is_a_bundle_with_a_model_card(measured, tmp_path):
    out = export(measured, tmp_path / "hub", format="hf", repo_id="acme/smollm2-edgepack")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["README.md", "calibration/imatrix.dat", MANIFEST, "report/report.html", "report/report.md",
                     "report/size_vs_kld.svg", "report/speed.svg", "variants/gguf-q4_1/model.gguf"]  # fmt: skip
    assert (out / MANIFEST).read_bytes() == (measured / MANIFEST).read_bytes()
    Bundle.open(out, verify=True)
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta == {"license": "apache-2.0", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_model_relation": "quantized",
                    "library_name": "gguf", "pipeline_tag": "text-generation", "tags": ["edgepack", "gguf", "quantized"]}  # fmt: skip
    row = next(line for line in card.splitlines() if line.startswith("| gguf-q4_1 |"))
    assert [c.strip() for c in row.strip("|").split("|")][:9] == [
        "gguf-q4_1", "[model.gguf](variants/gguf-q4_1/model.gguf)", "gguf", "98.4", "5.00", "0.01234", "0.2000", "12.500", "90.0%"]  # fmt: skip
    assert "| 800 | 60.0 | 0.050 | 300 |" in row
    assert "![size against mean KLD](report/size_vs_kld.svg)" in card and "![prefill and decode speed](report/speed.svg)" in card
    assert "hf download acme/smollm2-edgepack --local-dir smollm2-135m" in card
    assert "**signature**: not signed" in card and "**bench machine**: test cpu, 2 cores, 8 GiB RAM, Linux" in card


def test_a_signed_bundle_exports_with_its_signature_valid(measured, tmp_path):
    key = tmp_path / "keys" / "acme.key"
    keygen(key, "Acme models")
    sign(measured, key)
    out = export(measured, tmp_path / "hub", format="hf")
    assert verify(out, key.with_name("acme.key.pub")).signer.name == "Acme models"
    card = (out / "README.md").read_text()
    assert "**signature**: signed by Acme models (key " in card and "verified: the manifest and every file are what was signed" in card
    assert "edgepack verify smollm2-135m" in card


def test_a_signature_that_no_longer_verifies_is_not_exported(measured, tmp_path):
    key = tmp_path / "keys" / "acme.key"
    keygen(key, "Acme models")
    sign(measured, key)
    b = Bundle.open(measured)
    b.record_eval("gguf-q4_1", {**EVAL, "ppl": 13.0})  # eval after signing changes the signed manifest
    b.save()
    r = _run("export", measured, "--format", "hf", "-o", tmp_path / "hub")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "is signed but does not verify" in r.stderr and "sign it again with `edgepack sign" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct.Q4_1.gguf", "keys", "smollm2"]


def test_a_file_that_no_longer_matches_its_hash_is_not_exported(measured, tmp_path):
    gguf = measured / "variants" / "gguf-q4_1" / "model.gguf"
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 1  # same size: only the hash can tell
    gguf.unlink()
    gguf.write_bytes(bytes(data))
    r = _run("export", measured, "--format", "hf", "-o", tmp_path / "hub")
    assert r.returncode == 1 and r.stderr.strip() == "error: variant gguf-q4_1: variants/gguf-q4_1/model.gguf does not match its sha256: re-run the conversion"
    assert not (tmp_path / "hub").exists() and not list(tmp_path.glob(".hub.partial-*"))


@pytest.mark.parametrize("case", ["not a bundle", "unknown format", "output not empty", "output inside the bundle"])
def test_bad_input_gets_one_line_and_writes_nothing(measured, tmp_path, case):
    out, fmt, bundle = tmp_path / "out", "hf", measured
    if case == "not a bundle":
        bundle = tmp_path / "plain"
        bundle.mkdir()
    elif case == "unknown format":
        fmt = "zip"
    elif case == "output not empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out = measured / "hub"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = _run("export", bundle, "--format", fmt, "-o", out)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    expected = {"not a bundle": "is not a bundle (no edgepack.json)", "unknown format": "unknown export format 'zip': choose hf or ollama",
                "output not empty": "exists and is not empty: choose a new or empty folder", "output inside the bundle": "is inside the bundle"}  # fmt: skip
    assert expected[case] in r.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# -- push ------------------------------------------------------------------------------------


class _Hub(BaseHTTPRequestHandler):
    """The hub's upload API as huggingface_hub calls it: create, branch, validate-yaml, preupload, LFS batch and PUT, commit.
    Every request is recorded in ``server.requests`` as (method, path, headers, body)."""

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while size := int(self.rfile.readline().strip(), 16):
                out += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return out
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, payload: dict, status: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        body = self._body()
        self.server.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        base, path = self.server.base, self.path.split("?")[0]
        if path == "/api/repos/create":
            req = json.loads(body)
            return self._reply({"url": f"{base}/{req['organization']}/{req['name']}"})
        if path == "/api/validate-yaml":
            return self._reply({"errors": [], "warnings": []})
        if "/branch/" in path:
            return self._reply({})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "lfs" if f["path"].startswith("variants/") else "regular",
                                           "shouldIgnore": False} for f in files]})  # fmt: skip
        if path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            return self._reply({"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{base}/lfs/{o['oid']}"}}} for o in objects]})  # fmt: skip
        if path.startswith("/lfs/") and self.command == "PUT":
            self.server.uploads[path.removeprefix("/lfs/")] = body
            return self._reply({})
        if "/commit/" in path:
            return self._reply({"commitUrl": f"{base}/acme/smollm2-edgepack/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._reply({"error": f"no route {self.command} {path}"}, 404)

    do_POST = do_PUT = do_GET = do_HEAD = _handle

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub():
    """A hub endpoint on a free loopback port, stopped after the test."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    server.requests, server.uploads = [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _push_env(hub, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))}
    return {**env, "HF_ENDPOINT": hub.base, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1", **extra}


def test_push_uploads_the_export(measured, hub):
    r = _run("push", measured, "acme/smollm2-edgepack", "--private", "--revision", "v1", env=_push_env(hub, HF_TOKEN="hf_test_token"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{hub.base}/acme/smollm2-edgepack/commit/{'a' * 40}"
    hub.requests[:] = [r for r in hub.requests if r[1] != "/api/agent-harnesses"]  # huggingface_hub's user-agent lookup, not the upload
    routes = [(m, p.split("?")[0]) for m, p, _, _ in hub.requests]
    assert routes[:2] == [("POST", "/api/repos/create"), ("POST", "/api/models/acme/smollm2-edgepack/branch/v1")]
    assert routes[-1] == ("POST", "/api/models/acme/smollm2-edgepack/commit/v1")
    unsigned = [(m, p) for m, p, h, _ in hub.requests if h.get("authorization") != "Bearer hf_test_token" and not p.startswith("/lfs/")]
    assert unsigned == []
    assert json.loads(hub.requests[0][3]) == {"name": "smollm2-edgepack", "organization": "acme", "visibility": "private", "type": "model"}
    # every file of the export is in the commit: small ones inline, the GGUF through LFS with its bytes intact
    lines = [json.loads(line) for line in hub.requests[-1][3].splitlines()]
    inline = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
    lfs = {x["value"]["path"]: x["value"]["oid"] for x in lines if x["key"] == "lfsFile"}
    assert sorted([*inline, *lfs]) == ["README.md", "calibration/imatrix.dat", MANIFEST, "report/report.html", "report/report.md",
                                       "report/size_vs_kld.svg", "report/speed.svg", "variants/gguf-q4_1/model.gguf"]  # fmt: skip
    assert inline[MANIFEST] == (measured / MANIFEST).read_bytes()
    assert _front_matter(inline["README.md"].decode())["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    gguf = measured / "variants" / "gguf-q4_1" / "model.gguf"
    assert lfs["variants/gguf-q4_1/model.gguf"] == sha256_file(gguf)
    assert hashlib.sha256(hub.uploads[sha256_file(gguf)]).hexdigest() == sha256_file(gguf)
    assert not list(Path(os.environ["EDGEPACK_HOME"]).glob("push-*"))  # the export it uploaded is gone


@pytest.mark.parametrize(
    "env, says",
    [
        ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test_token"}, "error: HF_HUB_OFFLINE is set and push uploads to the hub: unset it"),
        ({}, "error: no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write access"),
    ],
    ids=["offline", "no token"],
)
def test_push_refuses_offline_and_without_a_token_before_any_request(measured, hub, env, says):
    r = _run("push", measured, "acme/smollm2-edgepack", env=_push_env(hub, **env))
    assert r.returncode == 1 and r.stderr.startswith(says) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert hub.requests == []


def test_a_hub_that_refuses_the_token_gets_one_line(measured, hub):
    class Refusing(_Hub):
        def _handle(self):
            self._body()
            self.server.requests.append((self.command, self.path, dict(self.headers), b""))
            self._reply({"error": "Invalid credentials in Authorization header"}, 401)

        do_POST = do_PUT = do_GET = do_HEAD = _handle

    hub.RequestHandlerClass = Refusing
    r = _run("push", measured, "acme/smollm2-edgepack", env=_push_env(hub, HF_TOKEN="hf_bad"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: the hub refused the token for acme/smollm2-edgepack (401") and "write access to acme" in r.stderr
