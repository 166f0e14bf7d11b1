"""GPTQ stage: argument and group-size rules, calibration rows, and a real GPTQModel run (from the CLI) on a tiny llama that transformers loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from models import tiny_model

from edgepack import constants
from edgepack.bundle import Bundle
from edgepack.convert import convert
from edgepack.plan import parse_variants
from edgepack.converters import calibration, gptq
from edgepack.errors import CalibrationError, InvalidModelError, MissingDependencyError, UsageError
from edgepack.runtime.transformers import gptq_kernel

# Widths 96 and 192: neither 128 nor 64 divides both, as 128 does not divide SmolLM2's 576.
NARROW = dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32, intermediate_size=192)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("narrow") / "llama", **NARROW)


def test_arguments():
    for ok in ("2", "3", "4", "8", "4g32", "4G128"):
        gptq.parse_arg(ok)
    assert gptq.parse_arg("4g64") == (4, 64)
    for bad in ("5", "16", "4g48", "4g8", "int4", ""):
        with pytest.raises(UsageError, match="gptq:"):
            gptq.parse_arg(bad)
    specs, _ = parse_variants("gptq:4,gptq:8g64")
    assert [str(s) for s in specs] == ["gptq:4", "gptq:8g64"]


def _config(tmp_path, **fields):
    (tmp_path / "config.json").write_text(json.dumps(fields))
    return tmp_path


def test_group_size_divides_every_width(tmp_path):
    smollm2 = _config(tmp_path, hidden_size=576, num_attention_heads=9, head_dim=64, intermediate_size=1536)
    assert gptq.choose_group_size(smollm2, None) == 16
    assert gptq.choose_group_size(smollm2, 64) == 64
    with pytest.raises(UsageError, match=r"group size 128 does not divide .*\[576, 1536\].*g16 or g32 or g64"):
        gptq.choose_group_size(smollm2, 128)
    odd = _config(tmp_path, hidden_size=100, num_attention_heads=4, intermediate_size=300)
    with pytest.raises(InvalidModelError, match="GGUF"):
        gptq.choose_group_size(odd, None)


def test_calibration_rows_drop_short_ones_and_count_them(narrow, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(narrow)
    long = [f"Paragraph {i} explains how a stage caches its output under a key of input, config and version." for i in range(5)]
    text_file = tmp_path / "calib.txt"
    text_file.write_text("\n\n".join(long + ["Hi.", "Ok.", "No."]))
    text = calibration.load(str(text_file))
    rows = gptq.calibration_rows(text, tok, gptq.GPTQConfig(samples=5, chat=False))
    assert len(rows.ids) == 5 and rows.dropped_short == 3
    assert all(len(r) >= gptq.MIN_ROW_TOKENS for r in rows.ids)
    with pytest.raises(CalibrationError, match="5 usable samples .3 under 16 tokens dropped. but 6 were requested"):
        gptq.calibration_rows(text, tok, gptq.GPTQConfig(samples=6, chat=False))


def test_missing_gptqmodel_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # what `import gptqmodel` meets when it is not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgepack\[gptq\]'"):
        gptq.import_gptqmodel()


def test_mixed_precision_rules_match_module_and_tensor_names(tmp_path):
    import re

    rules = gptq.mixed_overrides(_config(tmp_path, num_hidden_layers=30))
    hits = [n for n in (f"model.layers.{i}.mlp.down_proj" for i in range(30)) if any(re.match(p[2:], n) for p in rules)]
    assert hits == [f"model.layers.{i}.mlp.down_proj" for i in (26, 27, 28, 29)]
    assert all(any(re.match(p[2:], f"model.layers.12.self_attn.{m}.qweight") for p in rules) for m in ("k_proj", "v_proj"))
    assert not any(re.match(p[2:], f"model.layers.12.{m}") for p in rules for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"))
    narrower = gptq.mixed_overrides(_config(tmp_path, num_hidden_layers=30), outer=32)  # onnx:int4's
    hits = [i for i in range(30) if any(re.match(p[2:], f"model.layers.{i}.mlp.down_proj") for p in narrower)]
    assert hits == [29]


def test_cpu_workers_raised_to_two(monkeypatch):
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "1")
    gptq.import_gptqmodel()
    assert os.environ["GPTQMODEL_CPU_WORKERS"] == "2"


def round_to_nearest(w, group: int):
    """Asymmetric 4-bit min/max rounding per group of inputs, with an integer zero point as GPTQ stores it."""
    rows, cols = w.shape
    x = w.reshape(rows, cols // group, group)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    zero = (-lo / scale).round()
    return (((x / scale + zero).round().clamp(0, 15) - zero) * scale).reshape(rows, cols)


@pytest.mark.slow
def test_gptq_checkpoint_loads_in_transformers(narrow, tmp_path, logged):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Through the command line, from a folder of the user's that must stay empty (GPTQModel writes logs/ into the cwd).
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    flags = ["--gptq-samples", "32", "--uniform-bits", "--no-report"]  # uniform 4 bits, to compare with round-to-nearest below
    r = subprocess.run(
        [sys.executable, "-m", "edgepack", "convert", str(narrow), "--to", "gptq:4", "-o", str(tmp_path / "b"), *flags],
        cwd=cwd, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert not any(cwd.iterdir()) and not list(constants.stages_dir().rglob("*logs*"))
    assert "32 calibration rows" in r.stderr and "rows under 16 tokens dropped" in r.stderr
    bundle = Bundle.open(tmp_path / "b")
    v = bundle.variant("gptq-4")
    assert (v.format, v.backend) == ("gptq", "transformers")
    assert v.meta["group_size"] == 16 and v.meta["rows"] == 32 and v.meta["sym"] is False and v.meta["mixed"] is False
    folder = bundle.resolve(v.path)
    qcfg = json.loads((folder / "quantize_config.json").read_text())
    assert (qcfg["bits"], qcfg["group_size"], qcfg["quant_method"]) == (4, 16, "gptq")
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for part in ("qweight", "qzeros", "scales"):
        assert f"model.layers.0.self_attn.q_proj.{part}" in names
    assert bundle.data["calibration"][0]["name"] == "builtin:calibration"
    assert Bundle.open(tmp_path / "b", verify=True).variant("gptq-4").bits_per_weight > 0

    # Held-out text: the calibrated checkpoint, run by transformers, beats round-to-nearest at the same bits and groups.
    tok = AutoTokenizer.from_pretrained(narrow)
    ids = torch.tensor([calibration.token_stream(calibration.load("builtin", "eval"), tok, chat=True, max_tokens=256)])
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(narrow, dtype=torch.float32)
        ref = torch.log_softmax(model(ids).logits[0], -1)
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "layers" in name:
                mod.weight.copy_(round_to_nearest(mod.weight, 16))
        rtn = torch.log_softmax(model(ids).logits[0], -1)
        loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **gptq_kernel(folder, "cpu"))
        calibrated = torch.log_softmax(loaded(ids).logits[0].float(), -1)
    kld = lambda q: (ref.exp() * (ref - q)).sum(-1).mean().item()  # noqa: E731
    assert kld(calibrated) < 0.9 * kld(rtn), (kld(calibrated), kld(rtn))

    logged.clear()  # the same options through the API: the same stage
    convert(str(narrow), "gptq:4", tmp_path / "b", options={"samples": 32, "mixed": False})
    assert "gptq: cached" in logged.messages
