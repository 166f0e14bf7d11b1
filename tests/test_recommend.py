"""recommend: sizes, the KV cache read from the variant itself, and the pick that edgepack.load(ram=...) uses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_eval import make_bundle

import edgepack
from edgepack.bundle import Bundle, Variant
from edgepack.errors import UsageError
from edgepack.recommend import DEFAULT_OVERHEAD, MIN_CTX, architecture, kv_cache_bytes, pick, recommend

MiB = 2**20


def test_architecture_of_an_onnx_variant(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path / "b" / "variants" / "onnx-int4"
    folder.mkdir(parents=True)
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16, [1, 2, "past", 16])
    out = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT16, [1, 2, "past", 16])
    graph = helper.make_graph([helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])], "g", [past], [out])
    onnx.save(helper.make_model(graph), folder / "model.onnx")
    genai = {"model": {"context_length": 2048, "decoder": {"num_hidden_layers": 3, "num_key_value_heads": 2, "head_size": 16, "filename": "model.onnx"}}}
    (folder / "genai_config.json").write_text(json.dumps(genai))
    b = Bundle.create(tmp_path / "b", "t", {"files": []})
    b.add_variant(Variant("onnx-int4", "onnx", "onnx", "variants/onnx-int4", [b.file_record(folder / "model.onnx")]))
    arch = architecture(b, b.variant("onnx-int4"))
    assert arch == {"layers": 3, "kv_heads": 2, "head_dim": 16, "kv_bytes": 2, "context": 2048}
    assert kv_cache_bytes(arch, 100) == 2 * 3 * 2 * 16 * 2 * 100
    weights = b.variant("onnx-int4").bytes  # a busy CPU makes the session load a one-thread copy of them
    cpu, gpu = (recommend(b, "1GB", device=d)["options"][0] for d in ("cpu", "cuda"))
    assert cpu["overhead_bytes"] == gpu["overhead_bytes"] + weights and "one-thread copy" in cpu["overhead_source"]


@pytest.fixture
def two_variants(tmp_path, smollm2, smollm2_gguf):
    """The Q4_1 GGUF under two ids; eval says 'good' diverges less, bench measured 'bad' only."""
    b = make_bundle(tmp_path / "b", smollm2, smollm2_gguf, ids=("bad", "good"))
    b.data["eval"] = {"variants": {"bad": {"kld": {"mean": 0.05}}, "good": {"kld": {"mean": 0.01}}}}
    weights = b.variant("bad").bytes
    arch = architecture(b, b.variant("bad"))
    b.data["bench"] = {"runs": {"bad@cpu": {"variant": "bad", "device": "cpu", "n_ctx": 256,
                                            "peak_rss_bytes": weights + kv_cache_bytes(arch, 256) + 50 * MiB}}}
    b.save()
    return b


@pytest.mark.slow
def test_kv_cache_comes_from_the_gguf_metadata(two_variants, smollm2):
    arch = architecture(two_variants, two_variants.variant("good"))
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert arch == {"layers": cfg["num_hidden_layers"], "kv_heads": cfg["num_key_value_heads"], "head_dim": cfg["head_dim"],
                    "kv_bytes": 2, "context": cfg["max_position_embeddings"]}
    assert kv_cache_bytes(arch, 1) == 2 * 30 * 3 * 64 * 2  # 23,040 bytes per token of SmolLM2 in float16


@pytest.mark.slow
def test_recommend_picks_the_lowest_kld_with_the_longest_context_that_fits(two_variants):
    b = two_variants
    weights = b.variant("good").bytes
    per_token = kv_cache_bytes(architecture(b, b.variant("good")), 1)
    budget = weights + 50 * MiB + per_token * 3000  # room for 2048 tokens, not 4096
    rec = recommend(b, budget)
    assert rec["choice"]["variant"] == "good" and rec["choice"]["n_ctx"] == 2048
    good = rec["choice"]
    # 'good' has no bench run of its own: it borrows the measured overhead of the other llama.cpp variant
    assert good["overhead_bytes"] == 50 * MiB and good["overhead_source"].startswith("measured on another")
    assert good["total_bytes"] == weights + 50 * MiB + per_token * 2048 <= budget
    assert [o["variant"] for o in rec["options"]] == ["good", "bad"]
    assert pick(b, budget) == ("good", 2048)
    assert recommend(b, "100GB")["choice"]["n_ctx"] == 8192  # capped at the trained context
    with pytest.raises(UsageError, match="no variant fits"):
        pick(b, weights + 50 * MiB + per_token * (MIN_CTX - 1))
    del b.data["bench"]
    assert recommend(b, "1GB")["choice"]["overhead_bytes"] == DEFAULT_OVERHEAD


@pytest.mark.slow
def test_a_quantized_kv_cache_is_counted_at_its_size(two_variants):
    b = two_variants
    weights = b.variant("good").bytes
    per_token = kv_cache_bytes(architecture(b, b.variant("good")), 1)  # f16
    budget = weights + 50 * MiB + per_token * 3000  # f16: room for 2048 tokens; q8_0 (34/64 of it): 4096
    assert pick(b, budget) == ("good", 2048)
    rec = recommend(b, budget, kv_type="q8_0")
    assert rec["choice"]["n_ctx"] == 4096 and rec["choice"]["kv_type"] == "q8_0"
    assert rec["choice"]["kv_cache_bytes"] == round(per_token * 4096 * 34 / 64)
    assert pick(b, budget, kv_type="q4_0") == ("good", 8192)  # 18/64 x 8192 = 2304 tokens of f16: the trained context
    with edgepack.load(b.root, ram=budget, kv_type="q8_0", threads=1) as s:
        assert (s.info.n_ctx, s.info.kv_type) == (4096, "q8_0")
    with pytest.raises(UsageError, match="unknown KV cache type"):
        recommend(b, budget, kv_type="q5")


@pytest.mark.slow
def test_load_with_a_ram_budget_uses_the_same_rule(two_variants):
    b = two_variants
    budget = b.variant("good").bytes + 50 * MiB + kv_cache_bytes(architecture(b, b.variant("good")), 1) * 1500
    with edgepack.load(b.root, ram=budget, threads=1) as s:
        assert (s.info.variant, s.info.n_ctx) == ("good", 1024)
    with pytest.raises(UsageError, match="no variant fits"):
        edgepack.load(b.root, ram="10MB")
    with pytest.raises(UsageError, match="not a bundle"):
        edgepack.load(b.resolve(b.variant("good").path), ram="4GB")


@pytest.mark.slow
def test_cli_recommend(two_variants):
    ok = subprocess.run([sys.executable, "-m", "edgepack", "recommend", str(two_variants.root), "--ram", "1GB"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == "good n_ctx=8192"
    no = subprocess.run([sys.executable, "-m", "edgepack", "recommend", str(two_variants.root), "--ram", "50MB"], capture_output=True, text=True)
    assert no.returncode == 2 and "no variant fits" in no.stderr and "Traceback" not in no.stderr
