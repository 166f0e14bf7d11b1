"""Plans: one parser of variant specs, one place deciding the stages, a dry run that lists what a real run does,
and a format added from inside a test with one registration."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from models import tiny_model
from typer.testing import CliRunner

from edgepack import plan as planning
from edgepack.bundle import Bundle
from edgepack.convert import convert, dry_run, request
from edgepack.errors import UsageError
from edgepack.options import option
from edgepack.stages import Artifact, Kind, Planned, Stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _edgepack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, timeout=900)


def readme_converts() -> list[list[str]]:
    """Every ``edgepack convert`` command in the README, as arguments after ``convert``."""
    found = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if m := re.search(r"edgepack convert (.+?)\s*(?:#.*)?$", line.strip().strip("`")):
            found.append(shlex.split(m.group(1)))
    return found


def _on_tiny(args: list[str], tiny: Path, out: Path) -> list[str]:
    """A README command on the tiny model: its flags as written, the recipe's variants spelled out, a fresh folder."""
    from edgepack import recipes

    model, *flags = args
    flags = [f for f in flags if f != "--chat"]
    if "-o" in flags:
        i = flags.index("-o")
        del flags[i : i + 2]
    if "--to" not in flags:
        flags += ["--to", ",".join(recipes.find(model).variants)]
    return [str(tiny), *flags, "--calibration-tokens", "512", "--no-report", "-o", str(out)]


def test_the_readme_has_convert_examples():
    assert len(readme_converts()) >= 3  # the main command and the tour's


@pytest.mark.parametrize("args", readme_converts(), ids=lambda a: " ".join(a))
def test_dry_run_lists_the_stages_a_real_run_executes(args, tiny, tmp_path):
    cmd = _on_tiny(args, tiny, tmp_path / "b")
    planned = _edgepack("convert", *cmd, "--dry-run", "--json")
    assert planned.returncode == 0, planned.stderr
    listed = json.loads(planned.stdout)
    assert not (tmp_path / "b").exists() and all(s["state"] != "cached" for s in listed["stages"])  # wrote nothing, found nothing
    real = _edgepack("convert", *cmd)
    assert real.returncode == 0, real.stderr
    steps = Bundle.open(tmp_path / "b").data["steps"]
    assert [s["stage"] for s in listed["stages"]] == [s["stage"] for s in steps]
    for shown, ran in zip(listed["stages"], steps):
        for key, value in shown["params"].items():  # files made by an earlier stage are named by it until they exist
            if not (isinstance(value, str) and value.startswith("<stage ")):
                assert ran["params"][key] == value, (shown["stage"], key)
    assert {v["id"] for v in listed["variants"]} == {v.id for v in Bundle.open(tmp_path / "b").variants}
    again = json.loads(_edgepack("convert", *cmd, "--dry-run", "--json").stdout)
    assert [s["state"] for s in again["stages"]] == ["cached"] * len(steps)  # and now the cache holds every stage


@pytest.mark.parametrize("args", readme_converts(), ids=lambda a: " ".join(a))
def test_the_cli_and_the_python_api_build_equal_plans(args, tiny, tmp_path):
    cmd = _on_tiny(args, tiny, tmp_path / "b")
    cli = json.loads(_edgepack("convert", *cmd, "--dry-run", "--json").stdout)
    to = cmd[cmd.index("--to") + 1]
    options = {"calibration_tokens": "512"}
    if "--target-size" in cmd:
        options["target_size"] = cmd[cmd.index("--target-size") + 1]
    assert dry_run(str(tiny), to, tmp_path / "b", options=options) == cli


def test_variants_are_parsed_once_into_typed_options():
    specs, used = planning.parse_variants("gguf:q4_k_m,gptq:4g32,onnx:int4", {"target_size": "100MB", "samples": "64"})
    gguf, gptq, onnx = (s.options for s in specs)
    assert (gguf.type, gguf.target_size) == ("Q4_K_M", 100_000_000)
    assert (gptq.bits, gptq.group, gptq.samples) == (4, 32, 64)
    assert (onnx.precision, onnx.gptq.samples, onnx.gptq.mixed, onnx.gptq.desc_act) == ("int4", 64, True, False)
    assert used == {"target_size", "samples"}


def test_equal_stages_become_one_job():
    same = {"mixed": False, "desc_act": False, "calibration": "mix", "mixed_outer": 32}  # gptq:4g32 as onnx:int4's GPTQ by default
    specs, transforms = request("any-model", "gguf:Q4_K_M,gguf:Q2_K,gguf:q8_0,gptq:4g32,onnx:int4", options=same)
    p = planning.plan(specs, transforms=transforms)
    names = [j.stage.name for j in p.jobs]
    assert names.count("gguf-write") == 2 and names.count("imatrix") == 1 and names.count("gptq") == 1  # f16 and one imatrix shared
    gptq_job = next(j for j in p.jobs if j.stage.name == "gptq")
    assert next(v for v in p.variants if v.id == "onnx-int4").job.input is gptq_job


def test_bad_requests_fail_before_anything_is_read(tmp_path):
    with pytest.raises(UsageError, match="`mixed`: none of gguf:Q4_K_M uses it"):
        request("any-model", "gguf:Q4_K_M", options={"mixed": True})
    with pytest.raises(UsageError, match="unknown variant format 'zip'"):
        request("any-model", "zip:9")
    with pytest.raises(UsageError, match="both be gguf-q4_k_m"):
        request("any-model", "gguf:Q4_K_M,gguf:q4_k_m")


# -- a format from inside a test ---------------------------------------------------------------------


class Shout(Stage):
    """Writes the model's config in capitals: enough of a stage to make a variant."""

    name = "shout"
    input_kinds = (Kind.HF,)
    output_kind = Kind.FILE

    @dataclass(frozen=True)
    class Config:
        times: int = 1

    def plan(self, inp, config):
        return [Planned("LOUD.TXT")]

    def run(self, inp, config, out_dir):
        out = out_dir / "LOUD.TXT"
        out.write_text((inp.path / "config.json").read_text().upper() * config.times)
        return Artifact(Kind.FILE, out)


@dataclass(frozen=True)
class ShoutOptions:
    level: str
    times: int = option(1, metavar="N", help="How many times to shout.")


def _parse(arg, options):
    if arg not in ("loud", "louder"):
        raise UsageError(f"shout:{arg}: choose loud or louder", option="to")
    return ShoutOptions(arg, int(options.get("times") or 1)), {"times"} if options.get("times") else set()


def _plan(opts, p):
    job = p.stage(Shout(), Shout.Config(opts.times))
    return p.variant(f"shout-{opts.level}", job, format="shout", backend="nobody", spec=f"shout:{opts.level}", describe=lambda a, m: ({}, None))


@pytest.fixture
def shout_format():
    planning.register(planning.Format("shout", _parse, _plan, options=(ShoutOptions,)))
    yield
    planning.unregister("shout")


def test_a_format_is_one_registration(shout_format, tiny, tmp_path):
    bundle = convert(str(tiny), "shout:loud,gguf:f16", tmp_path / "b", options={"times": "2"})
    v = bundle.variant("shout-loud")
    assert v.format == "shout" and (bundle.root / v.path).read_text().count('"MODEL_TYPE"') == 2
    assert [s["stage"] for s in bundle.data["steps"]] == ["shout", "gguf-write"]
    # its option is a flag of `edgepack convert` as soon as the command is built
    from edgepack.cli import convert as cli_convert

    app = typer.Typer()
    cli_convert.register(app)
    app.command("noop")(lambda: None)
    r = CliRunner().invoke(app, ["convert", str(tiny), "--to", "shout:louder", "--times", "3", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    (stage,) = json.loads(r.output)["stages"]
    assert stage["stage"] == "shout" and stage["params"] == {"times": 3}
