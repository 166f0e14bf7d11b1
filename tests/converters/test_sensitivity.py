"""Sensitivity and size-targeted mixes: Fisher-weighted predictions checked against measured KL, the planner, the target stage."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from edgepack.converters import sensitivity as sv
from edgepack.converters.ggml import ggml
from edgepack.converters.gguf import convert
from edgepack.converters.imatrix import Imatrix, ImatrixFile, calibration_windows, load_reference
from edgepack.converters.quantize import TENSOR_TYPES, Quantize
from edgepack.errors import CalibrationError, UsageError
from edgepack.stages import Artifact, Kind
from models import tiny_model

TYPES = ("Q2_K", "Q4_K", "Q6_K", "Q8_0")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(HF folder, f32 GGUF, imatrix) of a tiny llama whose rows take 256-wide blocks."""
    root = tmp_path_factory.mktemp("wide")
    hf = tiny_model("llama", root / "hf", hidden_size=256, intermediate_size=512, head_dim=64)
    src = convert(hf, root / "model-f32.gguf", "f32").path
    imat = Imatrix().run(Artifact(Kind.HF, hf), Imatrix.Config(tokens=512, window=128), root / "im").path
    return hf, src, imat


@pytest.fixture(scope="module")
def table(wide, tmp_path_factory):
    hf, _, imat = wide
    cfg = sv.Sensitivity.Config(tokens=1024, window=128, imatrix=str(imat), types=TYPES)
    return sv.Sensitivity().run(Artifact(Kind.HF, hf), cfg, tmp_path_factory.mktemp("sens")).path


def quantize(src, out, **cfg):
    return Quantize().run(Artifact(Kind.GGUF, src), Quantize.Config(**cfg), out)


def test_plan_mix_spends_bytes_where_they_save_most():
    options = {
        "a": [("Q4_0", 100, 1.0), ("Q5_0", 120, 0.5), ("Q8_0", 180, 0.1)],  # sensitive
        "b": [("Q4_0", 100, 0.02), ("Q5_0", 120, 0.01), ("Q8_0", 180, 0.001)],  # robust
        "c": [("Q4_0", 100, 0.3), ("Q4_1", 110, 0.4), ("Q5_0", 120, 0.2)],  # Q4_1 dominated: more bytes, more loss
    }
    assert sv.plan_mix(options, 300) == {"a": "Q4_0", "b": "Q4_0", "c": "Q4_0"}
    assert sv.plan_mix(options, 320) == {"a": "Q5_0", "b": "Q4_0", "c": "Q4_0"}
    assert sv.plan_mix(options, 400) == {"a": "Q8_0", "b": "Q4_0", "c": "Q5_0"}
    assert sv.plan_mix(options, 10_000) == {"a": "Q8_0", "b": "Q8_0", "c": "Q5_0"}
    with pytest.raises(UsageError, match="raise the target size"):
        sv.plan_mix(options, 299)


def test_table_ranks_types_and_predicts_measured_kl(wide, table):
    hf, _, imat = wide
    data = json.loads(table.read_text())
    assert data["imatrix_sha256"] and data["calibration"]["tokens"] == 1024
    tensors = data["tensors"]
    assert len(tensors) == 2 * 7 + 1  # every linear weight and the (tied) token embedding
    for name, entry in tensors.items():
        loss = entry["loss"]
        assert set(loss) == set(TYPES), name
        assert loss["Q2_K"] > loss["Q4_K"] > loss["Q6_K"] > loss["Q8_0"] > 0, name

    # measured: KL(reference || model with one tensor rounded to Q4_K), on the calibration windows
    model, tok, names = load_reference(hf)
    windows, _ = calibration_windows(tok, "builtin", 1024, 128, None)
    weights = {g: m.weight for n, m in model.named_modules() if (g := names.get(n))}
    imatrix = ImatrixFile.load(imat).entries
    with torch.no_grad():
        ref = [torch.log_softmax(model(torch.tensor([w])).logits[0].double(), -1) for w in windows]
        ratios = []
        for name in ("blk.0.attn_v.weight", "blk.1.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.ffn_up.weight"):
            w = weights[name]
            orig = w.detach().clone()
            w.copy_(torch.from_numpy(ggml().roundtrip(orig.numpy(), TENSOR_TYPES["Q4_K"], imatrix[name])))
            kl = np.mean([float((r.exp() * (r - torch.log_softmax(model(torch.tensor([x])).logits[0].double(), -1))).sum(-1).mean())
                          for r, x in zip(ref, windows)])  # fmt: skip
            w.copy_(orig)
            ratios.append(tensors[name]["loss"]["Q4_K"] / kl)
    assert all(0.5 < r < 2 for r in ratios), ratios  # measured 1.02-1.10 when written


def test_target_size_hits_the_size_with_a_measured_mix(wide, table, tmp_path):
    _, src, imat = wide
    q4 = quantize(src, tmp_path / "q4", type="Q4_K_M", imatrix=str(imat))
    target = q4.meta["bytes"]
    art = quantize(src, tmp_path / "t", type="Q4_K_M", imatrix=str(imat), target_size=target, sensitivity=str(table))
    assert target - 64_000 < art.meta["bytes"] <= target
    chosen = art.meta["target"]["types"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(art.path).tensors}
    assert all(types[name] == kind for name, kind in chosen.items())
    assert len(set(chosen.values())) > 1  # a mix, not one type
    assert art.meta["target"]["predicted_loss"] > 0
    assert art.path.name == f"model-Q4_K_M-{target / 1e6:.1f}MB.gguf"
    bpw = quantize(src, tmp_path / "b", type="Q4_K_M", imatrix=str(imat), target_bpw=4.0, sensitivity=str(table))
    assert bpw.meta["bits_per_weight"] <= 4.0
    only = quantize(src, tmp_path / "o", type="Q4_K_M", imatrix=str(imat), target_bpw=6.0, sensitivity=str(table), target_types=["q4_k", "q8_0"])
    assert set(only.meta["target"]["types"].values()) <= {"Q4_K", "Q8_0"}
    # user overrides are kept and counted
    fixed = quantize(src, tmp_path / "f", type="Q4_K_M", imatrix=str(imat), target_size=target, sensitivity=str(table), tensor_types=["ffn_down=q8_0"])
    assert "blk.0.ffn_down.weight" not in fixed.meta["target"]["types"]
    assert fixed.meta["bytes"] <= target


def test_target_refusals(wide, table, tmp_path):
    _, src, imat = wide
    with pytest.raises(UsageError, match="raise the target size"):
        quantize(src, tmp_path / "s", type="Q4_K_M", imatrix=str(imat), target_size=100_000, sensitivity=str(table))
    with pytest.raises(CalibrationError, match="with an importance matrix but this quantization has none"):
        quantize(src, tmp_path / "n", type="Q4_K_M", target_size=10**6, sensitivity=str(table))
    with pytest.raises(UsageError, match="needs measured sensitivity"):
        quantize(src, tmp_path / "m", type="Q4_K_M", target_size=10**6)
    with pytest.raises(UsageError, match="allow more `target_types`"):
        quantize(src, tmp_path / "t", type="Q4_K_M", imatrix=str(imat), target_size=10**6, sensitivity=str(table), target_types=["q4_0"])
    other = tiny_model("llama", tmp_path / "other")  # 64-wide: another model's tensors
    other_src = convert(other, tmp_path / "other.gguf", "f32").path
    plain = json.loads(table.read_text())
    plain["imatrix_sha256"] = None
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    with pytest.raises(CalibrationError, match="measured on another model"):
        quantize(other_src, tmp_path / "x", type="Q4_K_M", target_size=10**6, sensitivity=str(tmp_path / "plain.json"))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(CalibrationError, match="not a sensitivity table"):
        quantize(other_src, tmp_path / "y", type="Q4_K_M", target_size=10**6, sensitivity=str(tmp_path / "junk.json"))
