"""The ``draft:`` format: a pruned, distilled student placed in the bundle's drafts and linked to its gguf variants."""

from __future__ import annotations

import pytest

import edgepack
from edgepack.bundle import Bundle
from edgepack.convert import convert, dry_run, request
from edgepack.errors import UsageError

from models import tiny_model

OPTIONS = {"draft_layers": 1, "draft_prompts": 8, "draft_tokens": 16}


def test_convert_makes_a_draft_linked_to_the_gguf_variant(tmp_path):
    ckpt = tiny_model("llama", tmp_path / "ckpt", num_hidden_layers=3)
    plan = dry_run(str(ckpt), "gguf:f16,draft:f16", tmp_path / "b", options=OPTIONS)
    assert [s["stage"] for s in plan["stages"]] == ["gguf-write", "prune", "teacher-text", "distill", "gguf-write"]
    bundle = convert(str(ckpt), "gguf:f16,draft:f16", tmp_path / "b", options=OPTIONS, report=True)
    assert [v.id for v in bundle.variants] == ["gguf-f16"]  # the draft is no variant: nothing picks, scores or exports it
    (draft,) = bundle.data["drafts"]
    assert draft["id"] == "draft-f16" and draft["targets"] == ["gguf-f16"]
    assert draft["meta"]["layers"] == 1 and draft["meta"]["params"] < bundle.variants[0].meta["n_params"]
    assert draft["meta"]["distill_steps"] >= 1
    reopened = Bundle.open(bundle.root, verify=True)  # the draft's files are checked like a variant's
    assert reopened.draft_for("gguf-f16").path == "drafts/draft-f16/model-f16.gguf"
    # the report step benched the target with its draft against the same run without it
    runs = bundle.data["bench"]["runs"]
    assert runs["gguf-f16@cpu+draft-model"]["draft_speedup"] > 0 and "gguf-f16@cpu" in runs
    assert "model: " in (bundle.root / "report" / "report.md").read_text()
    with edgepack.load(bundle.root, draft=True, threads=1) as s, edgepack.load(bundle.root, threads=1) as plain:
        assert s.info.draft == "model"
        assert s.generate("Hello", max_tokens=20, temperature=0).text == plain.generate("Hello", max_tokens=20, temperature=0).text


def test_a_draft_needs_a_gguf_target_and_a_smaller_model(tmp_path):
    with pytest.raises(UsageError, match=r"drafts for the gguf: variants of the same convert: add one, e.g. --to gguf:Q4_K_M,draft:q8_0"):
        request("unused", "draft:q8_0")
    with pytest.raises(UsageError, match="draft_steps` N or a positive `draft_time"):
        request("unused", "gguf:f16,draft:q8_0", options={"draft_time": "0"})
    ckpt = tiny_model("llama", tmp_path / "ckpt", num_hidden_layers=2)
    with pytest.raises(UsageError, match=r"`draft_layers` 2: the model has 2 decoder blocks, and a draft keeps fewer"):
        convert(str(ckpt), "gguf:f16,draft:f16", tmp_path / "b", options={"draft_layers": 2})
    assert not (tmp_path / "b").exists()
