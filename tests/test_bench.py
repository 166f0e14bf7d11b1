"""bench: the real SmolLM2 Q4_1 GGUF measured in its own process through edgepack's runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from test_eval import make_bundle

from edgepack.bench import BenchConfig, bench, summarise
from edgepack.bundle import Bundle, Variant
from edgepack.errors import BackendError, UsageError
from edgepack.report import render


def test_summarise_gives_median_and_range():
    raw = {"device": "cpu", "reps": [{"ttft_s": t, "prefill_tokens_per_s": 10 * t, "decode_tokens_per_s": t, "completion_tokens": 8} for t in (3, 1, 2)]}
    s = summarise(raw)
    assert s["ttft_s"] == {"median": 2, "min": 1, "max": 3, "values": [3, 1, 2]}
    assert s["device"] == "cpu" and "reps" not in s


def test_config_is_checked():
    for bad in (BenchConfig(repetitions=0), BenchConfig(decode_tokens=1), BenchConfig(threads=0)):
        with pytest.raises(UsageError):
            bad.check()


@pytest.mark.slow
def test_cli_benches_a_lone_gguf(tmp_path, smollm2_gguf):
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "edgepack", "bench", str(smollm2_gguf), "-o", str(out), "--threads", "1",
           "--prompt-tokens", "64", "--decode-tokens", "8", "-n", "2", "--warmup", "1", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    (key, run), = res["runs"].items()
    assert key == f"{run['variant']}@cpu" and run["threads"] == 1 and run["backend"] == "llama.cpp"
    assert 0 < run["load_s"] < 60
    for k in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert len(run[k]["values"]) == 2 and 0 < run[k]["min"] <= run[k]["median"] <= run[k]["max"]
    assert run["prefill_tokens_per_s"]["median"] == pytest.approx(64 / run["ttft_s"]["median"], rel=0.5)
    assert all(1 <= n <= 8 for n in run["completion_tokens"]["values"])
    # the weights are mmapped and every page is read during a forward pass
    assert run["rss_start_bytes"] < run["rss_loaded_bytes"] <= run["peak_rss_bytes"]
    assert run["peak_rss_bytes"] > 0.8 * run["bytes"]
    assert run["peak_device_bytes"] is None
    assert res["machine"]["cores_logical"] >= 1
    assert Bundle.open(out).data["bench"]["runs"][key]["load_s"] == run["load_s"]


@pytest.mark.slow
def test_bench_reports_a_variant_the_backend_refuses(tmp_path, smollm2, smollm2_gguf):
    b = make_bundle(tmp_path / "b", smollm2, smollm2_gguf)
    broken = tmp_path / "b" / "variants" / "broken" / "model.gguf"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"GGUF" + bytes(4096))
    b.add_variant(Variant("broken", "gguf", "llama.cpp", "variants/broken/model.gguf", [b.file_record(broken)]))
    b.save()
    with pytest.raises(BackendError, match="benchmarking broken failed: llama.cpp could not load"):
        bench(b, BenchConfig(prompt_tokens=16, decode_tokens=2, repetitions=1, warmup=0, threads=1), variants=["broken"])
    mlx = tmp_path / "b" / "variants" / "mlx"
    mlx.mkdir()
    (mlx / "config.json").write_text("{}")
    b.add_variant(Variant("mlx-4", "mlx", "mlx", "variants/mlx", [b.file_record(mlx / "config.json")]))  # no backend runs mlx
    with pytest.raises(UsageError, match="does not load"):
        bench(b, variants=["mlx-4"])


@pytest.mark.slow
def test_bench_batch_invariant_loads_so_and_says_so(tmp_path, smollm2, smollm2_gguf, smollm2_onnx):
    """--batch-invariant reaches the load (each variant's own process) and keys its run; ONNX variants have no such mode."""
    b = make_bundle(tmp_path / "b", smollm2, smollm2_gguf)
    onnx = tmp_path / "b" / "variants" / "onnx-int4"
    shutil.copytree(smollm2_onnx, onnx, copy_function=os.link)
    b.add_variant(Variant("onnx-int4", "onnx", "onnx", "variants/onnx-int4", [b.file_record(p) for p in sorted(onnx.iterdir())]))
    b.save()

    def cli(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "edgepack", "bench", str(b.root), "--threads", "1", "--prompt-tokens", "32", "--decode-tokens", "4",
               "-n", "1", "--warmup", "0", "--batch-invariant", *extra]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    proc = cli("--json")  # every variant the runtime loads batch-invariantly: the GGUF, not the ONNX folder
    assert proc.returncode == 0, proc.stderr
    (key, run), = json.loads(proc.stdout)["runs"].items()
    assert key == "gguf-q4_1@cpu+batch-invariant" and run["batch_invariant"] is True and run["settings"]["batch_invariant"] is True
    assert "onnx-int4 left out: onnx has no batch-invariant decoding" in proc.stderr
    assert "| cpu, batch-invariant |" in render(Bundle.open(b.root).data)["report.md"]  # the report's row says which mode it measured
    for extra, says in ((["--variant", "onnx-int4"], "error: variant onnx-int4 runs on onnx, which has no batch-invariant decoding: drop --batch-invariant"),
                        (["--kv-type", "q8_0"], "error: batch_invariant needs an f16 KV cache, not q8_0: drop kv_type (--kv-type) or batch_invariant")):  # fmt: skip
        r = cli(*extra)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(says), r.stderr
    assert list(Bundle.open(b.root).data["bench"]["runs"]) == [key]  # the refused ones measured nothing


@pytest.mark.gpu
@pytest.mark.slow
def test_bench_on_cuda_reports_peak_device_memory(tmp_path, smollm2, smollm2_gguf):
    from edgepack.runtime import llamacpp

    if "cuda" not in llamacpp.devices():
        pytest.skip("this llama-cpp-python build has no CUDA (or no GPU is visible): nothing to measure on cuda")
    b = make_bundle(tmp_path / "b", smollm2, smollm2_gguf)
    res = bench(b, BenchConfig(prompt_tokens=64, decode_tokens=8, repetitions=1, device="cuda"))
    run = res["runs"]["gguf-q4_1@cuda"]
    assert run["device"] == "cuda" and run["peak_device_bytes"] > 0.5 * run["bytes"]


def test_device_memory_is_unknown_without_nvidia_smi(monkeypatch, tmp_path):
    """No reading is not a reading of zero: the run says unknown (None), and recommend then falls back to its default."""
    from edgepack.bench import _DeviceMemory

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi here
    probe = _DeviceMemory()
    time.sleep(0.3)
    assert probe.stop() is None
