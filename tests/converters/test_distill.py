"""Distill stage on tiny models: healing lowers the divergence to the teacher, resumes exactly, refuses bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from models import tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgepack import constants
from edgepack.bundle import Bundle
from edgepack.cli import main
from edgepack.convert import request
from edgepack.converters import calibration, prune
from edgepack.converters.distill import (
    Config,
    Distill,
    distillation_loss,
    evaluate,
    validate,
)
from edgepack.converters.lora import merge_lora, trainable_parameters
from edgepack.converters.pull import from_folder
from edgepack.errors import CalibrationError, UsageError
from edgepack.plan import Runner, plan
from edgepack.fsutil import sha256_file
from edgepack.stages import run_stage

# A random teacher knows nothing about the text, so the tests distill from its logits alone (alpha 0);
# its blocks are far from the small residual updates of a trained model, so healing is slower than on a real one.
TINY = dict(batch=2, seq_len=64, lr=3e-3, alpha=0.0, temperature=1.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("teacher"), num_hidden_layers=4)


@pytest.fixture
def student(teacher) -> Path:
    art, _ = run_stage(prune.Prune(), from_folder(teacher), prune.Config(drop=(1,), samples=2, seq_len=32))
    return art.path


def _kld(student: Path, teacher: Path) -> float:
    tok = AutoTokenizer.from_pretrained(teacher)
    ids = calibration.token_stream(calibration.load("builtin", "eval"), tok, chat=True, max_tokens=4 * 64)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    return evaluate(load(student), load(teacher), calibration.windows(ids, 4, 64))["kld"]


def test_full_fine_tuning_heals_on_held_out_text(student, teacher):
    before = _kld(student, teacher)
    art, step = run_stage(Distill(), from_folder(student), Config(teacher=str(teacher), steps=40, **TINY))
    after = _kld(art.path, teacher)
    assert after < 0.85 * before, (before, after)
    assert art.meta["steps"] == 40 and art.meta["stopped_by"] == "steps"
    assert art.meta["text"]["name"] == "builtin:calibration"  # the eval split is never trained on
    assert step.params["alpha"] == 0.0 and step.params["temperature"] == 1.0
    assert not list(constants.stages_dir().glob("*.resume"))
    # Block 0 is untouched by pruning, so it stays frozen; the blocks above the cut and the final norm train.
    assert art.meta["frozen_blocks"] == 1
    healed, original = load_file(art.path / "model.safetensors"), load_file(student / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(healed[name], original[name]), name
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight", "model.norm.weight"):
        assert not torch.equal(healed[name], original[name]), name


def test_lora_adapters_merge_exactly(student):
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    params = trainable_parameters(model, 0, 4)
    assert all(p.requires_grad for p in params) and sum(p.requires_grad for p in model.parameters()) == len(params)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # B starts at zero; give it something to merge
        ids = torch.tensor([[5, 17, 200, 33, 48, 901]])
        adapted = model(input_ids=ids).logits
        merge_lora(model)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-4, rtol=1e-4)
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())


def test_lora_distillation_writes_a_plain_checkpoint(student, teacher):
    before = _kld(student, teacher)
    art, _ = run_stage(Distill(), from_folder(student), Config(teacher=str(teacher), steps=30, lora=4, **TINY))
    healed, original = load_file(art.path / "model.safetensors"), load_file(student / "model.safetensors")
    assert healed.keys() == original.keys()
    assert not torch.equal(healed["model.layers.2.mlp.down_proj.weight"], original["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(healed["model.layers.0.mlp.down_proj.weight"], original["model.layers.0.mlp.down_proj.weight"])
    assert _kld(art.path, teacher) < before


def test_time_budget_bounds_the_run(student, teacher):
    art, _ = run_stage(Distill(), from_folder(student), Config(teacher=str(teacher), time_s=3, **TINY))
    assert art.meta["stopped_by"] == "time" and art.meta["steps"] >= 1
    assert art.meta["train_s"] < 3 + 5  # stops at the first step boundary past the budget


def test_top_k_teacher_cache_is_filled_once_and_reused(student, teacher):
    cfg = Config(teacher=str(teacher), steps=4, topk=16, **TINY)
    run_stage(Distill(), from_folder(student), cfg)
    files = sorted((constants.stages_dir() / "teacher-topk").rglob("*.pt"))
    assert len(files) == 4 * 2
    stamps = [f.stat().st_mtime_ns for f in files]
    art, _ = run_stage(Distill(), from_folder(student), Config(**{**cfg.__dict__, "lr": 1e-3}))
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert art.meta["steps"] == 4


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(student, teacher, tmp_path, monkeypatch):
    cfg = Config(teacher=str(teacher), steps=20, checkpoint_s=0, **TINY)
    whole, _ = run_stage(Distill(), from_folder(student), cfg)

    home = tmp_path / "home2"
    script = (
        "import torch, sys, time; torch.set_num_threads(1)\n"
        # Tiny steps take milliseconds: pace them so the signal lands mid-run, not after the last step.
        "step = torch.optim.AdamW.step\n"
        "torch.optim.AdamW.step = lambda self, *a, **k: (time.sleep(0.25), step(self, *a, **k))[1]\n"
        "from edgepack.stages import run_stage\nfrom edgepack.converters.pull import from_folder\n"
        "from edgepack.converters.distill import Config, Distill\nfrom pathlib import Path\n"
        f"run_stage(Distill(), from_folder(Path(sys.argv[1])), Config(**{cfg.__dict__!r}))\n"
    )
    # A shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-c", script, str(student)], env={**os.environ, "EDGEPACK_HOME": str(home)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(home.glob("stages/*.resume/state.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) != 0, "the run finished before it could be interrupted"
    assert list(home.glob("stages/*.resume/state.pt"))
    assert not list(home.glob("stages/distill-*/.complete")), "an interrupted run must not look finished"

    monkeypatch.setenv("EDGEPACK_HOME", str(home))
    resumed, _ = run_stage(Distill(), from_folder(student), cfg)
    assert 1 <= resumed.meta["resumed_from"] < 20 and resumed.meta["steps"] == 20
    a, b = load_file(whole.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_kl_term_keeps_its_gradient_scale_across_temperatures():
    # Hinton et al.: the T^2 factor makes the soft-target gradient roughly independent of T.
    torch.manual_seed(0)
    teacher_logits, ids = torch.randn(1, 9, 50), torch.randint(0, 50, (1, 9))
    grads = []
    for temperature in (4.0, 8.0):
        z = (teacher_logits + 0.5 * torch.randn(1, 9, 50, generator=torch.Generator().manual_seed(1))).requires_grad_()
        loss, parts = distillation_loss(z, teacher_logits, ids, alpha=0.0, temperature=temperature)
        loss.backward()
        grads.append(z.grad.norm().item())
    assert 0.8 < grads[0] / grads[1] < 1.25
    same, parts = distillation_loss(teacher_logits, teacher_logits, ids, alpha=0.0, temperature=4.0)
    assert abs(parts["kl"]) < 1e-6


def test_teacher_with_another_tokenizer_is_refused(student, tmp_path):
    other = tiny_model("llama", tmp_path / "other", tokenizer="bpe-qwen2")
    with pytest.raises(UsageError, match="different tokenizers"):
        run_stage(Distill(), from_folder(student), Config(teacher=str(other), steps=2, **TINY))
    assert not list(constants.stages_dir().glob("distill-*"))


def test_text_too_short_for_the_steps_is_refused(student, teacher):
    with pytest.raises(CalibrationError, match="never repeated"):
        run_stage(Distill(), from_folder(student), Config(teacher=str(teacher), steps=10**6, **TINY))
    assert not list(constants.stages_dir().glob("distill-*"))


@pytest.mark.parametrize(
    "config",
    [Config(teacher="t"), Config(teacher="t", steps=2, alpha=1.5), Config(teacher="t", steps=2, temperature=0), Config(steps=-1)],
)
def test_config_checks_need_no_model(config):
    with pytest.raises(UsageError):
        validate(config)


def test_prune_then_distill_run_in_order_through_the_cache(teacher):
    src = from_folder(teacher)
    pcfg, dcfg = prune.Config(layers=1, samples=2, seq_len=32), Config(steps=3, **TINY)
    specs, transforms = request(str(teacher), "gguf:f16", prune=pcfg, distill=dcfg)
    planned = plan(specs, transforms=transforms)
    runner = Runner(src)
    arts = [runner.run(job) for job in planned.transforms]
    steps = [runner.steps[job].to_json() for job in planned.transforms]
    assert [s["stage"] for s in steps] == ["prune", "distill"]
    assert arts[0].meta["calibration"]["name"] == arts[1].meta["text"]["name"] == "builtin:calibration"
    # the manifest names the teacher by content (the source the student was pruned from), not by a path on this machine
    assert steps[1]["params"]["teacher"] == {"name": teacher.name, "sha256": steps[0]["input_sha256"]}
    assert AutoModelForCausalLM.from_pretrained(arts[1].path).config.num_hidden_layers == 3
    again = Runner(src)
    assert [again.run(job).path for job in planned.transforms] == [a.path for a in arts]
    assert all(again.steps[job].cached for job in planned.transforms)
    with pytest.raises(UsageError, match="heals a pruned student"):
        request(str(teacher), "gguf:f16", distill=dcfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_run_saves_a_cpu_float32_checkpoint(student, teacher):
    art, _ = run_stage(Distill(), from_folder(student), Config(teacher=str(teacher), steps=3, device="cuda", **TINY))
    assert art.meta["device"].startswith("cuda")
    weights = load_file(art.path / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_cli_prunes_heals_and_converts_into_one_bundle(teacher, tmp_path):
    out = tmp_path / "bundle"
    main(["convert", str(teacher), "--to", "gguf:f16", "--prune-layers", "1", "--distill", "--steps", "2",
          "--temperature", "3", "-o", str(out), "--no-report"])  # fmt: skip
    bundle = Bundle.open(out)
    steps = {s["stage"]: s for s in bundle.data["steps"]}
    assert steps["prune"]["params"]["layers"] == 1
    assert steps["distill"]["params"]["steps"] == 2 and steps["distill"]["params"]["temperature"] == 3.0
    assert bundle.data["source"]["origin"] == f"local:{teacher.name}" and (out / "reference" / "config.json").is_file()
    student = constants.stages_dir() / steps["distill"]["key"]
    assert AutoModelForCausalLM.from_pretrained(student).config.num_hidden_layers == 3
    assert [v.id for v in bundle.variants] == ["gguf-f16"]


@pytest.mark.parametrize("flags", [["--steps", "5"], ["--prune-layers", "1", "--distill-text", "builtin"]])
def test_cli_wants_distill_before_its_knobs(teacher, capsys, flags):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(teacher), "--to", "gguf:f16", *flags, "--no-report"])
    assert exit_.value.code == 2
    assert "add --distill" in capsys.readouterr().err


def _paragraphs(path: Path, n: int) -> Path:
    """A user text file of ``n`` distinct paragraphs."""
    words = "model layer token weight student teacher window block".split()
    path.write_text("\n\n".join(" ".join(words[(i * 7 + j) % 8] + str(i) for j in range(40)) for i in range(n)))
    return path


def test_cli_trains_on_a_user_file_and_eval_refuses_it_as_held_out_text(teacher, tmp_path):
    from edgepack.eval import EvalConfig, evaluate

    text, out = _paragraphs(tmp_path / "train.txt", 60), tmp_path / "bundle"
    main(["convert", str(teacher), "--to", "gguf:f16", "--drop", "1", "--distill", "--steps", "2",
          "--distill-text", str(text), "-o", str(out), "--no-report"])  # fmt: skip
    bundle = Bundle.open(out)
    assert {s["stage"]: s for s in bundle.data["steps"]}["distill"]["params"]["text"] == {"name": "train.txt", "sha256": sha256_file(text)}
    names = [c["name"] for c in bundle.data["calibration"]]
    assert names == ["builtin:calibration", "file:train.txt"]  # pruning calibration, then the training text
    # Evaluating on the very text the student was trained on must not pass as held-out.
    with pytest.raises(CalibrationError, match="free of calibration text"):
        evaluate(bundle, EvalConfig(text=str(text), windows=1, window_len=96, prompts=0, calibration_files=(str(text),)))


def test_cli_refuses_a_training_text_too_short_before_pruning(teacher, tmp_path, capsys):
    text, out = _paragraphs(tmp_path / "short.txt", 3), tmp_path / "bundle"
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(teacher), "--to", "gguf:f16", "--prune-layers", "1", "--distill", "--steps", "50",
              "--distill-text", str(text), "-o", str(out), "--no-report"])  # fmt: skip
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert "never repeated" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(constants.stages_dir().glob("prune-*"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--distill-text", "no-such-file.txt"], "--distill-text 'no-such-file.txt': no such file"),
        (["--distill-text", "hf:only-a-name"], "write hf:DATASET"),
    ],
)
def test_cli_checks_the_training_text_before_any_work(teacher, tmp_path, capsys, flags, message):
    out = tmp_path / "bundle"
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(teacher), "--to", "gguf:f16", "--prune-layers", "1", "--distill", "--steps", "2", *flags, "-o", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not constants.stages_dir().exists()
