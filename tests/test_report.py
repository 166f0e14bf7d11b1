"""report: rendering a manifest's data, and `convert` ending with eval, bench and a report checked in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from edgepack.report import REPORT_DIR, beaten_by, pareto, render, report, rows

BLUE, GREEN = (0x4C, 0x72, 0xB0), (0x55, 0xA8, 0x68)  # scatter/prefill bars, decode bars


def _manifest(**extra):
    data = {
        "schema": 1, "name": "m<1>", "created": "2026-01-01T00:00:00Z", "edgepack_version": "0.1.0",
        "source": {"ref": "smollm2-135m", "origin": "hub:x/y", "revision": "abc", "architecture": "llama"},
        "steps": [{"stage": "gguf-write", "version": 1, "params": {"outtype": "q8_0"}, "wall_s": 1.5, "cached": False}],
        "calibration": [{"name": "builtin:calibration", "sha256": "f" * 64, "tokens": 4096}],
        "variants": [
            {"id": "gguf-q8_0", "format": "gguf", "backend": "llama.cpp", "bytes": 145_000_000, "bits_per_weight": 8.5},
            {"id": "gguf-q4_k_m", "format": "gguf", "backend": "llama.cpp", "bytes": 105_000_000, "bits_per_weight": 4.9},
        ],
        "eval": {}, "bench": {},
    }
    data.update(extra)
    return data


def test_pareto_front_keeps_points_nothing_beats_on_both_axes():
    pts = [(100, 0.05, "a"), (150, 0.01, "b"), (160, 0.02, "c"), (90, 0.4, "d"), (300, 0.001, "e")]
    assert [p[2] for p in pareto(pts)] == ["d", "a", "b", "e"]


def test_equal_points_share_the_front_and_a_point_beaten_on_one_axis_only_by_an_equal_other_is_off_it():
    pts = {"f16": (270, 0.0), "bf16": (270, 0.0), "f32": (540, 0.0), "q8": (145, 0.001), "q8b": (145, 0.002), "q4": (80, 0.05)}
    assert beaten_by(pts) == {"f16": None, "bf16": None, "f32": "bf16", "q8": None, "q8b": "q8", "q4": None}
    # three axes (size, KLD, -decode): a bigger, closer variant stays on the front only while nothing is also faster
    three = {"a": (100, 0.01, -50), "b": (120, 0.005, -40), "c": (120, 0.005, -60), "d": (130, 0.02, -70), "e": (100, 0.01, -50)}
    assert beaten_by(three) == {"a": None, "b": "c", "c": None, "d": None, "e": None}
    assert beaten_by({}) == {}


def test_render_without_eval_or_bench_says_what_to_run():
    files = render(_manifest())
    assert set(files) == {"report.md", "report.html"}
    assert "run `edgepack eval`" in files["report.md"] and "run `edgepack bench`" in files["report.md"]
    assert "m&lt;1&gt;" in files["report.html"] and "<1>" not in files["report.html"]
    assert "| gguf-q4_k_m | gguf | 105.0 | 4.90 | — |" in files["report.md"]
    assert "gguf-write v1" in files["report.md"] and "reused" not in files["report.md"]
    reused = [{"stage": "gguf-write", "version": 1, "params": {}, "wall_s": 1.5, "cached": True, "key": "gguf-write-0123"}]
    assert "gguf-write v1 {} in 1.5 s (reused from the stage cache, entry gguf-write-0123)" in render(_manifest(steps=reused))["report.md"]


def test_a_bundle_bench_cannot_run_says_why_instead_of_sending_the_user_to_bench():
    mlx = [{"id": "mlx-4", "format": "mlx", "backend": "mlx", "bytes": 127_000_000, "bits_per_weight": 4.6}]  # no backend runs mlx
    files = render(_manifest(variants=mlx))
    assert "run `edgepack bench`" not in files["report.md"] and "run <code>edgepack bench</code>" not in files["report.html"]
    assert "only mlx-4 (mlx)" in files["report.md"] and "(gguf, onnx, gptq)" in files["report.md"] and "--to gguf:Q4_K_M" in files["report.md"]


def test_a_gptq_only_bundle_is_sent_to_bench():
    """The transformers backend runs GPTQ checkpoints, so bench measures them: no excuse in the report."""
    gptq = [{"id": "gptq-4", "format": "gptq", "backend": "transformers", "bytes": 127_000_000, "bits_per_weight": 4.6}]
    assert "run `edgepack bench`" in render(_manifest(variants=gptq))["report.md"]


def test_rows_join_eval_and_the_cpu_bench_run():
    run = {"median": 10.0, "min": 9.0, "max": 11.0, "values": [9.0, 10.0, 11.0]}
    bench = {"runs": {
        "gguf-q8_0@cuda": {"variant": "gguf-q8_0", "device": "cuda", "load_s": 1.0, "ttft_s": run, "prefill_tokens_per_s": run,
                           "decode_tokens_per_s": run, "peak_rss_bytes": 300 * 2**20, "peak_device_bytes": 200 * 2**20},
        "gguf-q8_0@cpu": {"variant": "gguf-q8_0", "device": "cpu", "load_s": 1.0, "ttft_s": run, "prefill_tokens_per_s": run,
                          "decode_tokens_per_s": run, "peak_rss_bytes": 400 * 2**20, "peak_device_bytes": None},
    }}
    ev = {"variants": {"gguf-q8_0": {"kld": {"mean": 0.004, "p99": 0.03}, "ppl": 20.1, "top1_agreement": 0.97,
                                     "generation": {"bleu": 80.0, "rouge_l": 0.9}}}}
    r = {x["variant"]: x for x in rows(_manifest(eval=ev, bench=bench))}
    assert r["gguf-q8_0"]["device"] == "cpu" and r["gguf-q8_0"]["peak_mib"] == 400
    assert r["gguf-q8_0"]["kld"] == 0.004 and r["gguf-q4_k_m"]["kld"] is None
    files = render(_manifest(eval=ev, bench=bench))
    assert set(files) == {"report.md", "report.html", "size_vs_kld.svg", "speed.svg"}
    assert files["report.html"].count("<svg") == 2


def test_the_pareto_table_names_what_beats_each_variant_off_the_front():
    variants = [{"id": i, "format": "gguf", "backend": "llama.cpp", "bytes": mb * 1_000_000, "bits_per_weight": None}
                for i, mb in (("q8_0", 145), ("q6_k", 140), ("q4_k_m", 105), ("q4_0", 110), ("q2_k", 70), ("f16", 270))]
    kld = {"q8_0": 0.002, "q6_k": 0.001, "q4_k_m": 0.02, "q4_0": 0.05, "q2_k": 0.4}  # f16 not scored: not in the table
    ev = {"variants": {k: {"kld": {"mean": v, "p99": v * 10}} for k, v in kld.items()}}
    decode = {"q8_0": 90.0, "q6_k": 60.0, "q4_k_m": 80.0, "q4_0": 120.0}  # q2_k not benched; q4_0 is slower to beat on speed
    run = {"median": 1.0, "min": 1.0, "max": 1.0}
    bench = {"runs": {f"{k}@cpu": {"variant": k, "device": "cpu", "load_s": 1.0, "ttft_s": run, "prefill_tokens_per_s": run,
                                   "decode_tokens_per_s": {"median": v, "min": v, "max": v}, "peak_rss_bytes": 2**20}
                      for k, v in decode.items()}}
    files = render(_manifest(variants=variants, eval=ev, bench=bench))
    table = files["report.md"].split("| Pareto (size, KLD, speed) |")[1].split("\n\n")[0]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()[1:]]
    assert {c[0]: c[-2] for c in cells} == {"q2_k": "front", "q4_k_m": "front", "q4_0": "beaten by q4_k_m", "q6_k": "front", "q8_0": "beaten by q6_k"}
    assert {c[0]: c[-1] for c in cells} == {"q2_k": "—", "q4_k_m": "front", "q4_0": "front", "q6_k": "front", "q8_0": "front"}
    assert [c[0] for c in cells] == ["q2_k", "q4_k_m", "q4_0", "q6_k", "q8_0"]  # by size
    assert "<th>Pareto (size, KLD)</th>" in files["report.html"] and "beaten by q6_k" in files["report.html"]
    assert "Pareto" not in render(_manifest())["report.md"]  # nothing scored: no table


def _chromium() -> str | None:
    return next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)


@pytest.mark.slow
def test_convert_ends_with_eval_bench_and_report(tmp_path):
    """`edgepack convert` reports by default; the tiny model's 256-token context shortens eval windows and bench prompts."""
    from models import tiny_model

    src = tiny_model("llama", tmp_path / "tiny")
    ep = [sys.executable, "-m", "edgepack", "convert", str(src), "--to", "gguf:f16"]
    proc = subprocess.run(ep + ["-o", str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "eval windows shortened from 512 to the model's 256-token context" in proc.stderr
    manifest = json.loads((tmp_path / "b" / "edgepack.json").read_text())
    assert manifest["eval"]["variants"]["gguf-f16"]["tokens"] == 8 * 255
    assert manifest["eval"]["variants"]["gguf-f16"]["kld"]["mean"] < 0.01  # f16 of a float32 model
    run = manifest["bench"]["runs"]["gguf-f16@cpu"]
    assert run["prompt_tokens"] == 256 - 128 - 1 and run["decode_tokens_per_s"]["median"] > 0
    assert run["peak_rss_bytes"] < 400 * 2**20  # the worker's own peak, not the converting parent's (torch is loaded there)
    page = tmp_path / "b" / REPORT_DIR / "report.html"
    text = page.read_text()
    assert f"{manifest['eval']['variants']['gguf-f16']['kld']['mean']:.5f}" in text and text.count("<svg") == 2
    HTMLParser().feed(text)
    md = (tmp_path / "b" / REPORT_DIR / "report.md").read_text()
    assert "![size vs KLD](size_vs_kld.svg)" in md and (tmp_path / "b" / REPORT_DIR / "size_vs_kld.svg").is_file()
    assert report(tmp_path / "b") == page  # re-rendering replaces the folder in place
    again = subprocess.run([sys.executable, "-m", "edgepack", "report", str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == str(page) and page.read_text() == text
    bad = subprocess.run([sys.executable, "-m", "edgepack", "report", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "not a bundle" in bad.stderr and "Traceback" not in bad.stderr
    _screenshot_shows_plots(page, tmp_path)

    quiet = subprocess.run(ep + ["-o", str(tmp_path / "c"), "--no-report"], capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    assert not (tmp_path / "c" / REPORT_DIR).exists() and json.loads((tmp_path / "c" / "edgepack.json").read_text())["eval"] == {}


def _screenshot_shows_plots(page, tmp_path):
    """Render the page in headless Chromium and look for the plots' colours and the text in the screenshot."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium): cannot screenshot the report")
    shot = tmp_path / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,2400",
           f"--screenshot={shot}", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.is_file(), "Chromium wrote no screenshot"
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (2400, 1200)

    def pixels(rgb):
        return int((np.abs(img - np.array(rgb)).sum(axis=2) < 12).sum())

    # the plots were drawn: the scatter point and prefill bar in blue, the decode bar in green
    assert pixels(BLUE) > 200 and pixels(GREEN) > 200, (pixels(BLUE), pixels(GREEN))
    assert (img.sum(axis=2) < 200).sum() > 5000  # and text
