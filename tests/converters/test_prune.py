"""Prune stage on tiny models: what is cut is what matters least, and the output is a checkpoint everything loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from llama_logits import llama_logits
from models import tiny_model
from transformers import AutoModelForCausalLM

from edgepack import constants
from edgepack.bundle import Bundle
from edgepack.cli import main
from edgepack.converters import calibration
from edgepack.converters.prune import Config, Prune, rank_blocks, validate
from edgepack.converters.pull import from_folder
from edgepack.errors import CalibrationError, UsageError
from edgepack.stages import run_stage

FAST = dict(samples=4, seq_len=64, multiple_of=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("llama"), num_hidden_layers=6)


def _logits(path: Path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _copy_with(src: Path, dest: Path, edit) -> Path:
    """A copy of checkpoint ``src`` whose weights ``edit(model)`` changed in place."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(dest)
    for f in src.iterdir():
        if not (dest / f.name).exists():
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


IDS = [5, 17, 200, 33, 48, 901, 12, 7, 64, 300]


def _identity_blocks(*blocks):
    """An edit making each of ``blocks`` an identity (its attention and MLP add nothing to the residual stream)."""

    def edit(model):
        for i in blocks:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()

    return edit


def test_depth_drops_the_block_that_does_nothing(llama, tmp_path):
    # Zeroing block 3's output projections makes it an identity: influence 0, and dropping it changes nothing.
    src = _copy_with(llama, tmp_path / "src", _identity_blocks(3))
    art, step = run_stage(Prune(), from_folder(src), Config(layers=1, **FAST))
    assert art.meta["dropped_layers"] == [3]
    assert art.meta["block_influence"][3] < 1e-6 < min(v for i, v in enumerate(art.meta["block_influence"]) if i != 3)
    cfg = json.loads((art.path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    torch.testing.assert_close(_logits(art.path, IDS), _logits(src, IDS), atol=1e-4, rtol=1e-4)
    assert art.meta["params_after"] < art.meta["params_before"]
    assert step.params["layers"] == 1


def test_span_drops_the_consecutive_blocks_that_do_nothing(llama, tmp_path):
    src = _copy_with(llama, tmp_path / "src", _identity_blocks(2, 3))
    art, _ = run_stage(Prune(), from_folder(src), Config(layers=2, method="span", **FAST))
    assert art.meta["dropped_layers"] == [2, 3] and art.meta["method"] == "span"
    distance = art.meta["span_distance"]
    # arccos near 1 turns float32 rounding of the cosine (~1e-7) into ~1e-4: zero is "below 1e-3" here.
    assert len(distance) == 5 and distance[2] < 1e-3 and min(d for i, d in enumerate(distance) if i != 2) > 0.1
    torch.testing.assert_close(_logits(art.path, IDS), _logits(src, IDS), atol=1e-4, rtol=1e-4)


def test_span_and_influence_choose_differently_and_span_is_the_angle_between_hidden_states(llama, tmp_path):
    # Blocks 1 and 4 do nothing: influence drops both, a span of two must take one of them with a neighbour.
    src = _copy_with(llama, tmp_path / "src", _identity_blocks(1, 4))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    layers = model.model.layers
    batches = [IDS, IDS[::-1]]
    assert rank_blocks(model, layers, batches, 2, "influence")[0] == [1, 4]
    drop, distance = rank_blocks(model, layers, batches, 2, "span")
    assert drop[1] == drop[0] + 1 and distance[drop[0]] == min(distance) and {1, 4} & set(drop)
    # hidden_states[b] is the residual stream entering block b (the last entry is after the final norm, so unused).
    with torch.inference_mode():
        states = [model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[:-1] for ids in batches]
    for start in range(len(layers) - 2):
        cos = torch.cat([torch.nn.functional.cosine_similarity(h[start], h[start + 2], dim=-1).flatten() for h in states])
        assert distance[start] == pytest.approx(float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()), abs=1e-5)


@pytest.mark.slow
def test_smollm2_blocks_each_method_drops(smollm2):
    # The figures of benchmarks/prune_distill.py: influence scatters its 6 blocks, span takes one run from the middle.
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = calibration.token_stream(calibration.load("builtin"), tok, chat=True, max_tokens=16 * 256)
    batches = calibration.windows(ids, 16, 256)
    influence, scores = rank_blocks(model, model.model.layers, batches, 6, "influence")
    span, distance = rank_blocks(model, model.model.layers, batches, 6, "span")
    assert influence == [13, 14, 15, 17, 25, 26]
    assert span == [13, 14, 15, 16, 17, 18]
    # Both spare the first and last blocks, which do the most (Gromov et al. and ShortGPT find the same).
    assert scores[0] == max(scores) and scores[-1] > sorted(scores)[-4]
    assert distance[0] > 2 * min(distance) and distance[-1] > 2 * min(distance)


def test_explicit_drop_rewrites_per_layer_config(tmp_path):
    src = tiny_model(
        "qwen2",
        tmp_path / "qwen2",
        num_hidden_layers=4,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
        layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"],
    )
    art, _ = run_stage(Prune(), from_folder(src), Config(drop=(1, 2), **FAST))
    cfg = json.loads((art.path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    assert cfg["layer_types"] == ["full_attention", "sliding_attention"]
    assert cfg["max_window_layers"] == 1
    # The survivors are the old blocks 0 and 3, renumbered 0 and 1.
    old = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    new = AutoModelForCausalLM.from_pretrained(art.path, dtype=torch.float32)
    torch.testing.assert_close(new.model.layers[1].mlp.up_proj.weight, old.model.layers[3].mlp.up_proj.weight)
    torch.testing.assert_close(new.model.layers[1].self_attn.q_proj.bias, old.model.layers[3].self_attn.q_proj.bias)
    assert new(input_ids=torch.tensor([IDS])).logits.isfinite().all()


def test_width_removes_dead_channels_and_kv_group_first(llama, tmp_path):
    # MLP channels 0..31 and KV group 1 (query heads 2, 3) output zeros; width pruning must find exactly those.
    def dead_units(model):
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[:32] = 0
            layer.self_attn.v_proj.weight[16:32] = 0

    src = _copy_with(llama, tmp_path / "src", dead_units)
    art, _ = run_stage(Prune(), from_folder(src), Config(heads=2, intermediate_size=96, **FAST))
    cfg = json.loads((art.path / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]) == (2, 1, 16, 96)
    assert art.meta["width"] == {"kv_groups": [2, 1], "intermediate_size": [128, 96]}
    torch.testing.assert_close(_logits(art.path, IDS), _logits(src, IDS), atol=1e-4, rtol=1e-4)


def test_target_params_is_met_and_close(llama):
    src = from_folder(llama)
    before = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(llama).parameters())
    target = int(before * 0.8)
    art, _ = run_stage(Prune(), src, Config(layers=1, target_params=target, **FAST))
    model = AutoModelForCausalLM.from_pretrained(art.path)
    after = sum(p.numel() for p in model.parameters())
    assert after == art.meta["params_after"] <= target
    per_channel_step = 5 * 3 * 64 * 16  # layers x (gate + up + down) x hidden x multiple_of
    assert target - after < per_channel_step
    assert model.config.intermediate_size % 16 == 0


def test_pruned_model_converts_to_gguf_and_llama_cpp_loads_it(llama, tmp_path):
    import gguf

    from edgepack.converters.gguf import convert

    art, _ = run_stage(Prune(), from_folder(llama), Config(layers=2, heads=2, intermediate_size=64, **FAST))
    out = convert(art.path, tmp_path / "pruned.gguf", "f32")
    reader = gguf.GGUFReader(out.path)
    assert reader.get_field("llama.block_count").contents() == 4
    assert reader.get_field("llama.feed_forward_length").contents() == 64
    ours = _logits(art.path, IDS)[-1].numpy()
    theirs = llama_logits(out.path, IDS, f32_cache=False)[len(IDS) - 1]
    assert abs(ours - theirs).max() < 1e-2 * max(1.0, abs(ours).max())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (Config(layers=6), "cannot drop 6 of 6"),
        (Config(drop=(0, 1, 2, 3, 4, 5)), "all 6 decoder blocks"),
        (Config(drop=(2, 9)), "names block 9"),
        (Config(heads=3), "multiple of 2"),
        (Config(intermediate_size=100, multiple_of=16), "multiple of 16"),
        (Config(target_params=10**9), "not below"),
        (Config(target_params=10_000), "below what width pruning can reach"),
        (Config(layers=1, samples=100_000), "pruning calibration text has"),
    ],
)
def test_bad_requests_fail_clearly_and_write_nothing(llama, config, message):
    with pytest.raises((UsageError, CalibrationError), match=message):
        run_stage(Prune(), from_folder(llama), config)
    stages = constants.stages_dir()
    assert not stages.exists() or not any(stages.iterdir())


def test_config_checks_need_no_model():
    bad_configs = (
        Config(),
        Config(layers=2, drop=(1,)),
        Config(drop=(1, 1)),
        Config(layers=-1),
        Config(layers=2, method="angle"),
        Config(drop=(1, 2), method="span"),
    )
    for bad in bad_configs:
        with pytest.raises(UsageError):
            validate(bad)


def test_cli_rejects_dropping_every_block_and_writes_no_bundle(llama, tmp_path, capsys):
    out = tmp_path / "bundle"
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(llama), "--to", "gguf:f16", "--prune-layers", "6", "-o", str(out), "--no-report"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "cannot drop 6 of 6" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_width_flags_and_span_method_reach_the_student(llama, tmp_path):
    out = tmp_path / "bundle"
    main(["convert", str(llama), "--to", "gguf:f16", "--prune-layers", "2", "--prune-method", "span", "--heads", "2",
          "--intermediate-size", "64", "-o", str(out), "--no-report"])  # fmt: skip
    bundle = Bundle.open(out)
    step = next(s for s in bundle.data["steps"] if s["stage"] == "prune")
    assert (step["params"]["method"], step["params"]["heads"], step["params"]["intermediate_size"]) == ("span", 2, 64)
    cfg = json.loads((constants.stages_dir() / step["key"] / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"]) == (4, 2, 64)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--heads", "3"], "multiple of 2"),
        (["--intermediate-size", "100"], "multiple of 64"),
        (["--intermediate-size", "-64"], "must be positive"),
        (["--prune-layers", "2", "--prune-method", "angle"], "choose influence or span"),
        (["--prune-method", "span", "--drop", "1,2"], "add --prune-layers N"),
        (["--intermediate-size", "64", "--target-params", "1M"], "not both"),
    ],
)
def test_cli_rejects_bad_width_and_method_flags(llama, tmp_path, capsys, flags, message):
    out = tmp_path / "bundle"
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(llama), "--to", "gguf:f16", *flags, "-o", str(out), "--no-report"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    stages = constants.stages_dir()
    assert not out.exists() and (not stages.exists() or not any(stages.iterdir()))
