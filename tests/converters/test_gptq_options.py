"""GPTQ and ONNX options: parsed from text, bad values and unused flags refused before any work (no quantization here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgepack import constants
from edgepack.convert import convert
from edgepack.converters import gptq
from edgepack.converters import onnx as onnx_conv
from edgepack.errors import CalibrationError, UsageError


def test_options_from_a_command_line_are_parsed():
    got, used = gptq.parse("4", {"samples": "64", "sym": "true", "desc_act": "no", "damp_percent": "0.05", "mixed": "off"})
    assert got == gptq.Options(4, None, samples=64, sym=True, desc_act=False, damp_percent=0.05, mixed=False, device="cpu", arg="4")
    assert used == {"samples", "sym", "desc_act", "damp_percent", "mixed"}
    assert gptq.parse("4g32", {})[0].mixed is False and onnx_conv.parse("int4", {})[0].gptq.mixed is True
    calibrated = onnx_conv.parse("int4", {})[0].gptq  # measured in converters/onnx.py: mix and the last 1/32's down_proj
    assert (calibrated.calibration, calibrated.mixed_outer) == ("mix", 32) and gptq.parse("4", {})[0].calibration == "builtin"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"samples": "many"}, "`samples` 'many': give a whole number"),
        ({"samples": 0}, "`samples` 0"),
        ({"damp_percent": 1.5}, "`damp_percent` 1.5"),
        ({"mixed_outer": 0}, "`mixed_outer` 0: give N >= 1"),
        ({"sym": "maybe"}, "`sym` 'maybe': give true or false"),
        ({"device": "tpu"}, "`device` 'tpu'"),
    ],
)
def test_bad_option_values(options, message):
    with pytest.raises(UsageError, match=message):
        gptq.parse("4", options)


def test_onnx_checks_the_gptq_options_only_when_int4_is_calibrated():
    with pytest.raises(UsageError, match="whole number"):
        onnx_conv.parse("int8", {"block_size": "big"})
    with pytest.raises(UsageError, match="samples` 0"):
        onnx_conv.parse("int4", {"samples": 0})
    assert onnx_conv.parse("int8", {"samples": 0})[1] == onnx_conv.parse("fp32", {"samples": 0})[1] == set()
    assert "samples" not in onnx_conv.parse("int4", {"samples": 0, "int4_method": "rtn"})[1]


@pytest.mark.parametrize("variant", ["gptq:4", "onnx:int4"])
def test_too_few_calibration_samples_fail_before_the_model_is_pulled(variant, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("One paragraph about caching.\n\nAnother one about bundles.")
    with pytest.raises(CalibrationError, match="has 2 samples but 256 were requested"):
        convert(str(tmp_path / "no-such-model"), variant, tmp_path / "b", options={"calibration": str(short)})
    assert not constants.stages_dir().exists() and not (tmp_path / "b").exists()


def edgepack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--to", "gguf:Q4_K_M", "--sym"], "--sym: none of gguf:Q4_K_M uses it (options of gptq: and onnx: variants)"),
        (["--to", "onnx:int8", "--gptq-samples", "64"], "--gptq-samples: none of onnx:int8 uses it"),
        (["--asym"], "--sym: none of gguf:Q4_K_M, gguf:Q8_0 uses it"),  # the recipe's variants
        (["--to", "gptq:4", "--gptq-samples", "5000"], "but 5000 were requested"),
        (["--to", "gptq:4", "--damp-percent", "2"], "--damp-percent 2.0"),
        (["--to", "gptq:4", "--gptq-device", "tpu"], "--gptq-device 'tpu'"),
        (["--to", "onnx:int4", "--int4-method", "awq"], "--int4-method 'awq'"),
    ],
)
def test_cli_flags_are_checked_before_any_work(args, message, tmp_path):
    r = edgepack("convert", "smollm2-135m", "-o", str(tmp_path / "b"), *args)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not constants.stages_dir().exists() and not (constants.home() / "sources").exists()


def test_gptq_on_cuda_without_a_gpu_is_refused_before_any_stage(tmp_path):
    """Refused once the plan is known, not at option time: on a Ray cluster the GPU may be on another node."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    from models import tiny_model

    model = tiny_model("llama", tmp_path / "tiny")
    assert gptq.parse("4", {"device": "cuda"})[0].device == "cuda"
    r = edgepack("convert", str(model), "-o", str(tmp_path / "b"), "--to", "gptq:4", "--gptq-device", "cuda", "--gptq-samples", "8")
    assert r.returncode == 2 and "stage gptq needs a CUDA device and torch sees none on this machine" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    stages = constants.stages_dir()
    assert not (tmp_path / "b").exists() and not (stages.exists() and any(stages.iterdir()))
