"""Prune stage: a smaller HF checkpoint, by depth (whole decoder blocks) and by width (MLP channels, KV groups).

Depth follows ShortGPT (Men et al., 2024): a block whose output points the
same way as its input does little, so its *block influence* is
``BI = 1 - cos(input, output)`` averaged over calibration tokens, and the
``layers`` blocks with the lowest BI are dropped (or the ones named in
``drop``). With ``method="span"`` the blocks go as one contiguous span
instead, after Gromov et al. (2024, "The Unreasonable Ineffectiveness of
the Deeper Layers"): the span of ``layers`` consecutive blocks whose input
and output are closest, by angular distance ``arccos(cos) / pi``. Ranking
blocks one by one misses that neighbours can undo each other; the span
distance measures what removing them together changes. (Gromov et al.
score the final token of each sequence; here it is the mean over every
calibration token, like BI, because a few windows then give thousands of
samples instead of a few.) The survivors are renumbered and every
per-layer setting in the config (``num_hidden_layers``, ``layer_types``,
``no_rope_layers``, ``max_window_layers``, ...) is rewritten to match.

Width follows Minitron (Muralidharan et al., 2024; see prune_width.py) and
runs after depth, on the blocks that are left.

Calibration text is ``calibration.load(preset)``, chat-formatted when the
tokenizer has a chat template (instruct models see text shaped like their
use). The output is a plain checkpoint: transformers loads it and every
converter takes it like any other.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidModelError, UnsupportedArchitectureError, UsageError
from ..options import given as is_given
from ..options import listed, number, option
from ..stages import Artifact, Kind, Planned, Stage, side_input
from . import calibration
from .prune_width import apply_width, check_width, count_params, forward_all, plan_width

# Config lists holding one entry per decoder layer (transformers 5 names).
_PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers")
# Config lists holding indices of decoder layers.
_LAYER_INDEX_LISTS = ("mlp_only_layers",)
# Ways of choosing the blocks --prune-layers drops (see the module docstring).
METHODS = ("influence", "span")
# Files a checkpoint-to-checkpoint stage writes.
CHECKPOINT_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@dataclass(frozen=True)
class Config:
    """What to cut: set ``layers`` or ``drop`` (depth), and/or ``target_params``, ``heads`` or ``intermediate_size`` (width)."""

    layers: int = 0  # drop this many decoder blocks, the least important on calibration text
    method: str = "influence"  # how ``layers`` are chosen: influence (each block alone, ShortGPT) or span (consecutive, Gromov et al.)
    drop: tuple[int, ...] = ()  # or drop exactly these block indices (0-based); excludes ``layers``
    target_params: int = 0  # then narrow MLPs and attention until the model has at most this many parameters
    heads: int = 0  # attention heads to keep per layer, a multiple of the query heads per KV group (0: all, or solved for target_params)
    intermediate_size: int = 0  # MLP channels to keep per layer (0: all, or solved for target_params)
    multiple_of: int = 64  # keep intermediate_size a multiple of this (quant blocks are 32 or 256 wide)
    calibration: str = side_input("builtin")  # calibration preset or text file (see converters/calibration.py)
    samples: int = 16  # calibration windows
    seq_len: int = 256  # tokens per calibration window


def validate(config: Config) -> None:
    """Check a config on its own, before any model is read; raises UsageError."""
    if config.layers < 0 or config.target_params < 0:
        raise UsageError("`prune_layers` and `target_params` must be positive numbers", option="prune_layers")
    if config.layers and config.drop:
        raise UsageError("give either `prune_layers` N (the N least important blocks) or `drop` i,j,k, not both", option="drop")
    if config.method not in METHODS:
        raise UsageError(f"`prune_method` {config.method!r}: choose {' or '.join(METHODS)}", option="prune_method")
    if config.method != "influence" and not config.layers:
        raise UsageError(f"`prune_method` {config.method} ranks the blocks that `prune_layers` N drops: add `prune_layers` N", option="prune_method")
    if not (config.layers or config.drop or config.target_params or config.heads or config.intermediate_size):
        raise UsageError("pruning needs `prune_layers` N, `drop` i,j,k, `heads` N, `intermediate_size` N or `target_params` N", option="prune_layers")
    if config.target_params and config.intermediate_size:
        raise UsageError("give either `target_params` or an explicit `intermediate_size`, not both", option="target_params")
    if config.heads < 0 or config.intermediate_size < 0:
        raise UsageError("`heads` and `intermediate_size` must be positive numbers", option="heads")
    if len(set(config.drop)) != len(config.drop) or any(i < 0 for i in config.drop):
        raise UsageError(f"`drop` {','.join(map(str, config.drop))}: give distinct block indices counted from 0", option="drop")
    if config.multiple_of < 1 or config.samples < 1 or config.seq_len < 2:
        raise UsageError("multiple_of, samples and seq_len must be positive (seq_len at least 2)")


_PANEL = "Prune and distill"


@dataclass(frozen=True)
class Options:
    """What ``convert`` takes from the user for pruning; ``parse`` makes the stage's ``Config`` of them."""

    prune_layers: int = option(0, metavar="N", panel=_PANEL, help="Drop the N least important decoder blocks first.")
    drop: tuple[int, ...] = option((), metavar="I,J", panel=_PANEL, help="Drop exactly these blocks, e.g. 12,13,14.")
    prune_method: str = option(
        "influence", metavar="METHOD", panel=_PANEL,
        help="How --prune-layers picks blocks: influence (each block alone) or span (the most redundant run of consecutive blocks).",
    )  # fmt: skip
    heads: int = option(0, metavar="N", panel=_PANEL, help="Attention heads to keep per layer, in whole KV groups (e.g. 6 of SmolLM2's 9).")
    intermediate_size: int = option(0, metavar="N", panel=_PANEL, help="MLP channels to keep per layer, a multiple of 64.")
    target_params: int = option(0, metavar="N", panel=_PANEL, help="Narrow MLPs and attention down to N parameters, e.g. 90M.")
    calibration: str = calibration.option_field()


OPTIONS = ("prune_layers", "drop", "prune_method", "heads", "intermediate_size", "target_params")


def parse(options: Mapping[str, Any]) -> tuple[Config | None, set[str]]:
    """The pruning ``options`` ask for as a stage config (None: no pruning), checked without a model; raises UsageError."""
    given = {k: options[k] for k in OPTIONS if is_given(options.get(k)) and options[k] != 0}
    if not given:
        return None, set()
    try:
        drop = tuple(int(i) for i in listed(given.get("drop", ())))
    except ValueError as e:
        raise UsageError(f"`drop` {given['drop']!r}: give block indices separated by commas, e.g. 12,13,14", option="drop") from e
    config = Config(
        layers=number(given, "prune_layers", 0),
        drop=drop,
        method=str(given.get("prune_method", "influence")),
        target_params=count(given.get("target_params", 0), option="target_params"),
        heads=number(given, "heads", 0),
        intermediate_size=number(given, "intermediate_size", 0),
        calibration=calibration.check_preset(str(options.get("calibration") or "builtin")),
    )
    validate(config)
    return config, set(given) | ({"calibration"} if options.get("calibration") else set())


def count(text: Any, *, option: str) -> int:
    """``90M`` -> 90_000_000, ``1.5B`` -> 1_500_000_000; plain digits pass through. Raises UsageError."""
    if isinstance(text, int):
        return text
    text = str(text).strip()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(text[-1:].upper(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError as e:
        raise UsageError(f"`{option}` {text!r}: give a parameter count such as 90000000 or 90M", option=option) from e


class CheckpointStage(Stage):
    """A stage from one HF checkpoint to a changed one (prune, distill): same files, same storage dtype."""

    input_kinds = (Kind.HF,)
    output_kind = Kind.HF

    def plan(self, inp: Artifact | None, config: Any) -> list[Planned]:
        return [Planned(n) for n in CHECKPOINT_FILES]


def load_model(path: Path, dtype=None):
    """The causal LM at ``path`` (float32 unless ``dtype``); raises InvalidModelError."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise InvalidModelError(f"transformers cannot load {path} ({e}): check the checkpoint") from e


def save_checkpoint(model, tokenizer, out_dir: Path, *, like: Path) -> None:
    """Write ``model`` in the dtype checkpoint ``like`` is stored in (a float32 working copy must not double a bf16 model)."""
    model.to(saved_dtype(like))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


class Prune(CheckpointStage):
    name = "prune"
    version = 1
    Config = Config

    def run(self, inp: Artifact, config: Config, out_dir: Path) -> Artifact:
        """Prune ``inp`` into ``out_dir``. Raises UsageError, CalibrationError, UnsupportedArchitectureError."""
        from transformers import AutoTokenizer

        n_layers, drop = check(config, inp.path)
        tokenizer = AutoTokenizer.from_pretrained(inp.path)
        model = load_model(inp.path).eval()
        layers = _decoder_layers(model)
        params_before = count_params(model)
        width = None
        if config.target_params or config.heads or config.intermediate_size:
            width = plan_width(model, layers, n_layers - (config.layers or len(drop)), config)

        chat = bool(getattr(tokenizer, "chat_template", None))
        text = calibration.load(config.calibration)
        ids = calibration.token_stream(text, tokenizer, chat=chat, max_tokens=config.samples * config.seq_len)
        batches = calibration.windows(ids, config.samples, config.seq_len, what="pruning calibration")
        meta: dict[str, Any] = {"calibration": text.provenance(len(ids)), "params_before": params_before}

        if config.layers:
            drop, scores = rank_blocks(model, layers, batches, config.layers, config.method)
            meta["method"] = config.method
            meta["block_influence" if config.method == "influence" else "span_distance"] = [round(v, 6) for v in scores]
        if drop:
            _drop_layers(model, drop)
            meta["dropped_layers"] = drop
        if width is not None:
            groups, inter = width
            meta["width"] = apply_width(model, _decoder_layers(model), batches, groups, inter)

        meta["params_after"] = count_params(model)
        meta["num_hidden_layers"] = model.config.num_hidden_layers
        save_checkpoint(model, tokenizer, out_dir, like=inp.path)
        return Artifact(Kind.HF, out_dir, meta)


def check(config: Config, path: Path) -> tuple[int, list[int]]:
    """Check ``config`` against the model's config.json, before its weights are read: (blocks, sorted ``drop``).

    Raises UsageError.
    """
    from transformers import AutoConfig

    validate(config)
    hf_config = AutoConfig.from_pretrained(path)
    drop = _check_depth(config, hf_config.num_hidden_layers)
    heads, kv = hf_config.num_attention_heads, getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    check_width(config, heads, kv, getattr(hf_config, "intermediate_size", None))
    return hf_config.num_hidden_layers, drop


def saved_dtype(path: Path):
    """The torch dtype a checkpoint's config says its weights are stored in (float32 when it does not say)."""
    import torch
    from transformers import AutoConfig

    value = getattr(AutoConfig.from_pretrained(path), "dtype", None) or torch.float32
    return value if isinstance(value, torch.dtype) else getattr(torch, str(value).removeprefix("torch."))


def _check_depth(config: Config, n_layers: int) -> list[int]:
    if config.layers >= n_layers:
        raise UsageError(f"cannot drop {config.layers} of {n_layers} decoder blocks: drop at most {n_layers - 1}")
    bad = [i for i in config.drop if i >= n_layers]
    if bad:
        raise UsageError(f"`drop` names block {bad[0]} but the model has blocks 0..{n_layers - 1}", option="drop")
    if len(config.drop) >= n_layers:
        raise UsageError(f"`drop` names all {n_layers} decoder blocks: keep at least one", option="drop")
    return sorted(config.drop)


def _decoder_layers(model):
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise UnsupportedArchitectureError(
            type(model).__name__, ["llama-style decoders (model.layers)"], "Pruning needs a list of decoder blocks."
        )
    return layers


def rank_blocks(model, layers, batches: list[list[int]], n: int, method: str) -> tuple[list[int], list[float]]:
    """The ``n`` blocks ``method`` would drop, sorted, and the scores it chose them by.

    influence: one score per block, the ``n`` lowest go. span: one score per
    start ``l`` of a run of ``n`` blocks; the run with the lowest goes.
    """
    if method == "span":
        distance = span_distance(model, layers, batches, n)
        start = min(range(len(distance)), key=distance.__getitem__)
        return list(range(start, start + n)), distance
    influence = block_influence(model, layers, batches)
    return sorted(sorted(range(len(layers)), key=influence.__getitem__)[:n]), influence


def block_influence(model, layers, batches: list[list[int]]) -> list[float]:
    """ShortGPT block influence of each decoder block: mean over tokens of 1 - cos(input, output)."""
    return _boundary_distances(model, layers, batches, 1, lambda cos: 1 - cos)


def span_distance(model, layers, batches: list[list[int]], n: int) -> list[float]:
    """Gromov et al.'s angular distance arccos(cos) / pi between the input of block ``l`` and the output of
    block ``l + n - 1``, for every ``l``, as a mean over tokens."""
    import torch

    return _boundary_distances(model, layers, batches, n, lambda cos: torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi)


def _boundary_distances(model, layers, batches: list[list[int]], n: int, distance) -> list[float]:
    """Mean over tokens of ``distance(cos(h_l, h_l+n))`` for l = 0..L-n, where ``h_b`` is the residual stream
    entering block ``b`` (``h_L`` leaves the last block; a block's output is the next one's input).

    Only the last ``n + 1`` boundaries are kept, so memory does not grow with depth.
    """
    import torch

    recent: deque = deque(maxlen=n + 1)
    totals = [0.0] * (len(layers) - n + 1)
    tokens = [0]

    def seen(b: int, h) -> None:
        if b == 0:
            recent.clear()
        recent.append(h)
        if b >= n:
            cos = torch.nn.functional.cosine_similarity(recent[0].float(), h.float(), dim=-1)
            totals[b - n] += float(distance(cos).sum())
            if b == n:
                tokens[0] += cos.numel()

    def pre(i):
        def hook(_mod, args, kwargs):
            seen(i, args[0] if args else kwargs["hidden_states"])

        return hook

    def post(_mod, _args, _kwargs, output):
        seen(len(layers), output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(post, with_kwargs=True))
    try:
        forward_all(model, batches)
    finally:
        for h in handles:
            h.remove()
    return [t / max(tokens[0], 1) for t in totals]


def _drop_layers(model, drop: list[int]) -> None:
    """Remove blocks in place, renumber the survivors and rewrite every per-layer config entry."""
    layers = _decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    cfg = model.config
    for new, old in enumerate(keep):
        for mod in layers[old].modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new  # the KV cache is indexed by it
    kept = [layers[i] for i in keep]
    del layers[:]
    layers.extend(kept)
    for key in _PER_LAYER_LISTS:
        value = getattr(cfg, key, None)
        if isinstance(value, list | tuple) and len(value) == len(keep) + len(drop):
            setattr(cfg, key, [value[i] for i in keep])
    for key in _LAYER_INDEX_LISTS:
        value = getattr(cfg, key, None)
        if isinstance(value, list | tuple):
            setattr(cfg, key, [keep.index(i) for i in value if i in keep])
    if isinstance(getattr(cfg, "max_window_layers", None), int):
        cfg.max_window_layers = sum(1 for i in keep if i < cfg.max_window_layers)
    cfg.num_hidden_layers = len(keep)
