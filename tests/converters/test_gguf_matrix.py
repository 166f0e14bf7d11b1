"""``gguf:*``: the types a pattern names, narrowed to those whose blocks divide every weight's rows once the model is
at hand; the dry run lists what a run makes; a small real matrix ends in a report with its Pareto table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from models import tiny_model

from edgepack.convert import dry_run, request
from edgepack.errors import UsageError

# Every weight's rows divide into 32-wide blocks but not 128 or 256 (hidden 64, intermediate 128): llama.cpp's
# K-, IQ- (but IQ4_NL), TQ- and Q1_0 types would fall back on them.
NARROW = {"f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"}


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("narrow") / "hf")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("wide") / "hf", hidden_size=256, intermediate_size=512, head_dim=64)


def ids(planned: dict) -> set[str]:
    return {v["id"].removeprefix("gguf-") for v in planned["variants"]}


def test_a_narrow_model_takes_only_the_types_whose_blocks_divide_its_rows(narrow, tmp_path, logged):
    assert ids(dry_run(str(narrow), "gguf:*", tmp_path / "b")) == NARROW
    left = "\n".join(logged.messages)
    assert "gguf:* leaves out Q2_K, Q3_K_S" in left and "of 64, 128 columns, which their 256-wide blocks do not divide" in left
    assert "leaves out Q1_0: 13 of 15 weights have rows of 64 columns, which their 128-wide blocks" in left
    assert "leaves out MXFP4_MOE: it quantizes mixture-of-experts tensors" in left
    assert not (tmp_path / "b").exists()


def test_one_odd_width_rules_out_only_the_wider_blocks(tmp_path):
    """Rows of 256 and 384: 128-wide Q1_0 blocks divide both, 256-wide K-quant blocks not the down projection's 384."""
    model = tiny_model("llama", tmp_path / "hf", hidden_size=256, intermediate_size=384, head_dim=64)
    assert ids(dry_run(str(model), "gguf:*", tmp_path / "b")) == NARROW | {"q1_0"}


def test_a_wide_model_takes_every_type_and_each_iq_type_gets_the_importance_matrix(wide, tmp_path, logged):
    planned = dry_run(str(wide), "gguf:*", tmp_path / "b")
    got = ids(planned)
    assert len(got) == 32 and {"q4_k_m", "q6_k", "iq1_s", "iq2_xxs", "tq1_0", "q1_0"} <= got and not {"f32", "mxfp4_moe"} & got
    imatrix = [s["n"] for s in planned["stages"] if s["stage"] == "imatrix"]
    assert len(imatrix) == 1  # one importance matrix, shared by every quantized type
    quantized = [s for s in planned["stages"] if s["stage"] == "quantize"]
    assert len(quantized) == 29 and all(s["params"]["imatrix"] == f"<stage {imatrix[0]}>" for s in quantized)
    # without an importance matrix the types llama.cpp refuses are left out, with the reason, instead of failing
    logged.clear()
    bare = ids(dry_run(str(wide), "gguf:*", tmp_path / "b", options={"no_imatrix": True}))
    assert got - bare == {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s"}
    assert "llama.cpp makes them only with an importance matrix (drop `no_imatrix`)" in "\n".join(logged.messages)


def test_patterns_and_exclusions(wide, tmp_path):
    assert ids(dry_run(str(wide), "gguf:Q4_*", tmp_path / "b")) == {"q4_0", "q4_1", "q4_k_s", "q4_k_m"}
    assert ids(dry_run(str(wide), "gguf:*-IQ*-TQ*-Q1_0-*F16", tmp_path / "b")) == {
        "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"
    }  # fmt: skip


def test_a_list_names_its_format_once():
    specs, _ = request("any-model", "gguf:Q4_K_M,Q5_K_M,q8_0,onnx:int4,int8")
    assert [str(s) for s in specs] == ["gguf:Q4_K_M", "gguf:Q5_K_M", "gguf:q8_0", "onnx:int4", "onnx:int8"]
    with pytest.raises(UsageError, match="unknown variant format 'q4_k_m'"):
        request("any-model", "Q4_K_M,gguf:Q8_0")  # the first names its format


def test_bad_patterns_fail_with_one_line(narrow, tmp_path):
    with pytest.raises(UsageError, match=r"gguf:Z\* names no llama.cpp type: patterns match F16, Q4_0"):
        request("any-model", "gguf:Z*")
    with pytest.raises(UsageError, match=r"a size target makes one mix: give it with one type \(gguf:Q4_K_M\), not gguf:\*"):
        request("any-model", "gguf:*", options={"target_size": "1MB"})
    with pytest.raises(UsageError, match=r"two requested variants would both be gguf-q4_0"):
        request("any-model", "gguf:*,gguf:Q4_0")
    with pytest.raises(UsageError, match=r"this model takes none of gguf:IQ2\*'s types whole"):
        dry_run(str(narrow), "gguf:IQ2*", tmp_path / "b")


def test_the_dry_run_prints_the_expanded_variants_and_what_it_left_out(narrow, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgepack", "convert", str(narrow), "--to", "gguf:*", "--dry-run", "-o", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[1].removeprefix("gguf-") for line in proc.stdout.splitlines() if line.startswith("variant ")}
    assert listed == NARROW and "then: eval, bench, report" in proc.stdout
    assert "gguf:* leaves out Q2_K" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_small_matrix_is_converted_measured_and_reported_with_its_pareto_table(narrow, tmp_path):
    out = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "edgepack", "convert", str(narrow), "--to", "gguf:Q4_*,gguf:q8_0", "--calibration-tokens", "512",
                           "-o", str(out)], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "gguf:Q4_* leaves out Q4_K_S, Q4_K_M" in proc.stderr
    md = (out / "report" / "report.md").read_text()
    table = md.split("| Pareto (size, KLD, speed) |")[1].split("\n\n")[0].strip().splitlines()[1:]
    rows = {cells[0]: cells for line in table if (cells := [c.strip() for c in line.strip("|").split("|")])}
    assert set(rows) == {"gguf-q4_0", "gguf-q4_1", "gguf-q8_0"}
    assert all(r[-2] == "front" or r[-2].startswith("beaten by gguf-") for r in rows.values())
    assert rows[min(rows, key=lambda k: float(rows[k][1]))][-2] == "front"  # the smallest is always on the front
    html = (out / "report" / "report.html").read_text()
    assert "<th>Pareto (size, KLD, speed)</th>" in html and all(f"<td>{v}</td>" in html for v in rows)
