"""Prune stage: a smaller HF checkpoint, by depth (whole decoder blocks) and by width (MLP channels, KV groups).

Depth follows ShortGPT (Men et al., 2024): a block whose output points the
same way as its input does little, so its *block influence* is
``BI = 1 - cos(input, output)`` averaged over calibration tokens, and the
``layers`` blocks with the lowest BI are dropped (or the ones named in
``drop``). The survivors are renumbered and every per-layer setting in the
config (``num_hidden_layers``, ``layer_types``, ``no_rope_layers``,
``max_window_layers``, ...) is rewritten to match.

Width follows Minitron (Muralidharan et al., 2024): each MLP channel is
scored by its activation (the input of ``down_proj``) and each attention
head by the norm of its output (the input of ``o_proj``), as a mean over
tokens and an L2 norm over samples. Heads go in whole KV groups so grouped
query attention stays intact, and every layer keeps the same count because
the config holds one ``intermediate_size`` and one head count.

Calibration text is ``calibration.load(preset)``, chat-formatted when the
tokenizer has a chat template (instruct models see text shaped like their
use). The output is a plain checkpoint: transformers loads it and every
converter takes it like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidModelError, UnsupportedArchitectureError, UsageError
from ..stages import Artifact, Kind, Stage
from . import calibration

# Config lists holding one entry per decoder layer (transformers 5 names).
_PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers")
# Config lists holding indices of decoder layers.
_LAYER_INDEX_LISTS = ("mlp_only_layers",)


@dataclass
class Config:
    """What to cut: set ``layers`` or ``drop`` (depth), and/or ``target_params``, ``heads`` or ``intermediate_size`` (width)."""

    layers: int = 0  # drop this many decoder blocks, the least influential on calibration text
    drop: tuple[int, ...] = ()  # or drop exactly these block indices (0-based); excludes ``layers``
    target_params: int = 0  # then narrow MLPs and attention until the model has at most this many parameters
    heads: int = 0  # attention heads to keep per layer, a multiple of the query heads per KV group (0: all, or solved for target_params)
    intermediate_size: int = 0  # MLP channels to keep per layer (0: all, or solved for target_params)
    multiple_of: int = 64  # keep intermediate_size a multiple of this (quant blocks are 32 or 256 wide)
    calibration: str = "builtin"  # calibration preset or text file (see converters/calibration.py)
    samples: int = 16  # calibration windows
    seq_len: int = 256  # tokens per calibration window


def validate(config: Config) -> None:
    """Check a config on its own, before any model is read; raises UsageError."""
    if config.layers < 0 or config.target_params < 0:
        raise UsageError("--prune-layers and --target-params must be positive numbers")
    if config.layers and config.drop:
        raise UsageError("give either --prune-layers N (the N least important blocks) or --drop i,j,k, not both")
    if not (config.layers or config.drop or config.target_params or config.heads or config.intermediate_size):
        raise UsageError("pruning needs --prune-layers N, --drop i,j,k or --target-params N")
    if config.target_params and config.intermediate_size:
        raise UsageError("give either --target-params or an explicit intermediate_size, not both")
    if config.heads < 0 or config.intermediate_size < 0:
        raise UsageError("heads and intermediate_size must be positive")
    if len(set(config.drop)) != len(config.drop) or any(i < 0 for i in config.drop):
        raise UsageError(f"--drop {','.join(map(str, config.drop))}: give distinct block indices counted from 0")
    if config.multiple_of < 1 or config.samples < 1 or config.seq_len < 2:
        raise UsageError("multiple_of, samples and seq_len must be positive (seq_len at least 2)")


class Prune(Stage):
    name = "prune"
    version = 1
    input_kind = Kind.HF
    output_kind = Kind.HF
    Config = Config

    def plan(self, inp: Artifact, config: Config) -> list[str]:
        return ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]

    def run(self, inp: Artifact, config: Config, out_dir: Path) -> Artifact:
        """Prune ``inp`` into ``out_dir``. Raises UsageError, CalibrationError, UnsupportedArchitectureError."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        validate(config)
        hf_config = AutoConfig.from_pretrained(inp.path)
        n_layers = hf_config.num_hidden_layers
        drop = _check_depth(config, n_layers)
        tokenizer = AutoTokenizer.from_pretrained(inp.path)
        try:
            model = AutoModelForCausalLM.from_pretrained(inp.path, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as e:
            raise InvalidModelError(f"transformers cannot load {inp.path} ({e}): check the checkpoint") from e
        model.eval()
        layers = _decoder_layers(model)
        params_before = _count(model)
        width = None
        if config.target_params or config.heads or config.intermediate_size:
            width = _plan_width(model, layers, n_layers - (config.layers or len(drop)), config)

        chat = bool(getattr(tokenizer, "chat_template", None))
        text = calibration.load(config.calibration)
        ids = calibration.token_stream(text, tokenizer, chat=chat, max_tokens=config.samples * config.seq_len)
        batches = calibration.windows(ids, config.samples, config.seq_len, what="pruning calibration")
        meta: dict[str, Any] = {"calibration": text.provenance(len(ids)), "params_before": params_before}

        if config.layers:
            influence = block_influence(model, layers, batches)
            drop = sorted(sorted(range(n_layers), key=lambda i: influence[i])[: config.layers])
            meta["block_influence"] = [round(v, 6) for v in influence]
        if drop:
            _drop_layers(model, drop)
            meta["dropped_layers"] = drop
        if width is not None:
            groups, inter = width
            meta["width"] = _apply_width(model, _decoder_layers(model), batches, groups, inter)

        meta["params_after"] = _count(model)
        meta["num_hidden_layers"] = model.config.num_hidden_layers
        model.to(saved_dtype(inp.path))
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        return Artifact(Kind.HF, out_dir, meta)


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
        raise UsageError(f"--drop names block {bad[0]} but the model has blocks 0..{n_layers - 1}")
    if len(config.drop) >= n_layers:
        raise UsageError(f"--drop names all {n_layers} decoder blocks: keep at least one")
    return sorted(config.drop)


def _decoder_layers(model):
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise UnsupportedArchitectureError(
            type(model).__name__, ["llama-style decoders (model.layers)"], "Pruning needs a list of decoder blocks."
        )
    return layers


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward_all(model, batches: list[list[int]]) -> None:
    import torch

    with torch.inference_mode():
        for ids in batches:
            model(input_ids=torch.tensor([ids]), use_cache=False)


def block_influence(model, layers, batches: list[list[int]]) -> list[float]:
    """ShortGPT block influence of each decoder block: mean over tokens of 1 - cos(input, output)."""
    import torch

    totals = [0.0] * len(layers)
    counts = [0] * len(layers)
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_mod, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post(i):
        def hook(_mod, _args, _kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).float(), out.float(), dim=-1)
            totals[i] += float((1 - cos).sum())
            counts[i] += cos.numel()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    try:
        _forward_all(model, batches)
    finally:
        for h in handles:
            h.remove()
    return [t / max(c, 1) for t, c in zip(totals, counts)]


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


# -- width -------------------------------------------------------------------------------------


def _attn_mlp(layer):
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in names) or not all(
        hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")
    ):
        raise UnsupportedArchitectureError(
            type(layer).__name__,
            ["llama-style blocks (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj)"],
            "Use depth pruning (--prune-layers) for this model.",
        )
    return attn, mlp


def _plan_width(model, layers, n_after: int, config: Config) -> tuple[int, int]:
    """KV groups and intermediate size per layer: as given, or solved for ``target_params``.

    Raises UsageError when a width is not one the architecture allows or the target is out of reach.
    """
    cfg = model.config
    attn, mlp = _attn_mlp(layers[0])
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    q_per_kv = heads // kv
    inter = mlp.gate_proj.out_features
    if config.heads and (config.heads % q_per_kv or not q_per_kv <= config.heads <= heads):
        raise UsageError(
            f"cannot keep {config.heads} attention heads: this model groups {q_per_kv} query heads per KV head, "
            f"so keep a multiple of {q_per_kv} between {q_per_kv} and {heads}"
        )
    if config.intermediate_size and (config.intermediate_size % config.multiple_of or config.intermediate_size > inter):
        raise UsageError(
            f"intermediate_size {config.intermediate_size} must be a multiple of {config.multiple_of} "
            f"and at most the current {inter}"
        )
    groups = config.heads // q_per_kv if config.heads else kv
    if not config.target_params:
        return groups, config.intermediate_size or inter

    hidden, head_dim = attn.q_proj.in_features, attn.q_proj.out_features // heads
    # Parameters one MLP channel / one KV group costs in each layer.
    per_channel = 3 * hidden + _has_bias(mlp.gate_proj) + _has_bias(mlp.up_proj)
    per_group = q_per_kv * head_dim * (2 * hidden + _has_bias(attn.q_proj)) + 2 * head_dim * (hidden + _has_bias(attn.k_proj))
    per_layer_rest = _count(layers[0]) - inter * per_channel - kv * per_group
    fixed = _count(model) - sum(_count(layer) for layer in layers) + n_after * per_layer_rest
    prunable = n_after * (inter * per_channel + kv * per_group)
    target = config.target_params
    if target >= fixed + prunable:
        raise UsageError(
            f"--target-params {target:,} is not below the model's {fixed + prunable:,} parameters"
            f"{' after depth pruning' if n_after < len(layers) else ''}: choose a smaller target"
        )
    if not config.heads:
        # Cut attention in proportion to the MLP, rounded up to whole KV groups (Minitron prunes both).
        groups = min(kv, max(1, math.ceil((target - fixed) / prunable * kv)))
    new_inter = (target - fixed - n_after * groups * per_group) // (n_after * per_channel)
    new_inter = min(inter, new_inter // config.multiple_of * config.multiple_of)
    if new_inter < config.multiple_of:
        least = fixed + n_after * ((config.heads // q_per_kv or 1) * per_group + config.multiple_of * per_channel)
        raise UsageError(
            f"--target-params {target:,} is below what width pruning can reach ({least:,}): "
            "drop more layers or choose a larger target"
        )
    return groups, new_inter


def _has_bias(linear) -> int:
    return 1 if linear.bias is not None else 0


def _importance(model, layers, batches: list[list[int]]):
    """Minitron activation importance per layer: (MLP channel scores, attention head scores)."""
    import torch

    heads = model.config.num_attention_heads
    mlp_sq = [None] * len(layers)
    head_sq = [None] * len(layers)

    def mlp_hook(i):
        def hook(_mod, args):
            score = args[0].float().abs().mean(dim=(0, 1))  # mean over tokens
            mlp_sq[i] = score**2 if mlp_sq[i] is None else mlp_sq[i] + score**2  # L2 over samples

        return hook

    def head_hook(i):
        def hook(_mod, args):
            x = args[0].float()
            per_head = x.reshape(*x.shape[:-1], heads, -1).norm(dim=-1).mean(dim=(0, 1))
            head_sq[i] = per_head**2 if head_sq[i] is None else head_sq[i] + per_head**2

        return hook

    handles = []
    for i, layer in enumerate(layers):
        attn, mlp = _attn_mlp(layer)
        handles.append(mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
        handles.append(attn.o_proj.register_forward_pre_hook(head_hook(i)))
    try:
        _forward_all(model, batches)
    finally:
        for h in handles:
            h.remove()
    return [m.sqrt() for m in mlp_sq], [h.sqrt() for h in head_sq]


def _apply_width(model, layers, batches: list[list[int]], groups: int, inter: int) -> dict[str, Any]:
    """Keep the ``groups`` most important KV groups and ``inter`` MLP channels in every layer."""
    import torch

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    q_per_kv = heads // kv
    attn0, _ = _attn_mlp(layers[0])
    head_dim = attn0.q_proj.out_features // heads
    mlp_scores, head_scores = _importance(model, layers, batches)
    for layer, m_score, h_score in zip(layers, mlp_scores, head_scores):
        attn, mlp = _attn_mlp(layer)
        channels = torch.sort(torch.topk(m_score, inter).indices).values
        mlp.gate_proj = _slice(mlp.gate_proj, rows=channels)
        mlp.up_proj = _slice(mlp.up_proj, rows=channels)
        mlp.down_proj = _slice(mlp.down_proj, cols=channels)
        if groups < kv:
            group_score = h_score.reshape(kv, q_per_kv).sum(dim=1)
            kept = torch.sort(torch.topk(group_score, groups).indices).values
            q_heads = (kept[:, None] * q_per_kv + torch.arange(q_per_kv)).flatten()
            q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
            kv_rows = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()
            attn.q_proj = _slice(attn.q_proj, rows=q_rows)
            attn.k_proj = _slice(attn.k_proj, rows=kv_rows)
            attn.v_proj = _slice(attn.v_proj, rows=kv_rows)
            attn.o_proj = _slice(attn.o_proj, cols=q_rows)
    cfg.head_dim = head_dim  # no longer hidden_size // num_attention_heads
    cfg.num_attention_heads = groups * q_per_kv
    cfg.num_key_value_heads = groups
    cfg.intermediate_size = inter
    return {"kv_groups": [kv, groups], "intermediate_size": [mlp_scores[0].numel(), inter]}


def _slice(linear, *, rows=None, cols=None):
    import torch

    w = linear.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype)
    out.weight.data = w.clone()
    if linear.bias is not None:
        out.bias.data = (linear.bias.data[rows] if rows is not None else linear.bias.data).clone()
    return out
