"""The stage cache: a rerun reuses finished output; an interrupted stage leaves nothing that looks finished."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from edgepack import constants
from edgepack.stages import Artifact, Kind, Planned, Stage, run_stage


class Upper(Stage):
    name = "upper"
    input_kinds = (Kind.FILE,)
    output_kind = Kind.FILE
    calls = 0

    @dataclass
    class Config:
        suffix: str = "!"
        fail: bool = False

    def plan(self, inp, config):
        return [Planned("out.txt")]

    def run(self, inp: Artifact, config: Config, out_dir: Path) -> Artifact:
        type(self).calls += 1
        out = out_dir / "out.txt"
        out.write_text(inp.path.read_text().upper() + config.suffix)
        if config.fail:
            raise KeyboardInterrupt  # an interruption after a partial write
        return Artifact(Kind.FILE, out)


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "in.txt"
    p.write_text("hello")
    return Artifact(Kind.FILE, p)


def test_rerun_is_cached(src):
    Upper.calls = 0
    a, step = run_stage(Upper(), src, Upper.Config())
    assert a.path.read_text() == "HELLO!" and not step.cached
    b, step2 = run_stage(Upper(), src, Upper.Config())
    assert b.path == a.path and step2.cached and Upper.calls == 1
    assert step2.output_sha256 == step.output_sha256 == Artifact(Kind.FILE, a.path).digest()


def test_key_changes_with_config_and_input(src, tmp_path):
    a, _ = run_stage(Upper(), src, Upper.Config())
    b, _ = run_stage(Upper(), src, Upper.Config(suffix="?"))
    src.path.write_text("other")
    c, _ = run_stage(Upper(), src, Upper.Config())
    assert len({a.path.parent, b.path.parent, c.path.parent}) == 3


def test_interrupted_stage_leaves_no_complete_output(src):
    with pytest.raises(KeyboardInterrupt):
        run_stage(Upper(), src, Upper.Config(fail=True))
    stages = constants.stages_dir()
    assert not any(stages.glob("*/.complete"))
    assert [p for p in stages.iterdir() if not p.name.startswith(".")] == []
    a, step = run_stage(Upper(), src, Upper.Config())  # the rerun starts clean
    assert not step.cached and a.path.read_text() == "HELLO!"


def test_a_stage_is_handed_only_the_kinds_it_declares(src, tmp_path):
    with pytest.raises(TypeError, match="takes file, not gguf"):
        run_stage(Upper(), Artifact(Kind.GGUF, src.path), Upper.Config())

    class Liar(Upper):
        name = "liar"
        output_kind = Kind.ONNX

    with pytest.raises(TypeError, match="declares onnx output but made file"):
        run_stage(Liar(), src, Upper.Config())
    assert not any(constants.stages_dir().glob("liar-*/.complete"))
