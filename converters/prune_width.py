"""Width pruning for the prune stage: fewer MLP channels and attention heads in every decoder block.

Width follows Minitron (Muralidharan et al., 2024): each MLP channel is
scored by its activation (the input of ``down_proj``) and each attention
head by the norm of its output (the input of ``o_proj``), as a mean over
tokens and an L2 norm over samples. Heads go in whole KV groups so grouped
query attention stays intact, and every layer keeps the same count because
the config holds one ``intermediate_size`` and one head count. The kept
channels and heads are sliced out of the projections' weights in their
original order, and the config is rewritten to the new widths.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedArchitectureError, UsageError

if TYPE_CHECKING:
    from .prune import Config


def check_width(config: Config, heads: int, kv: int, inter: int | None) -> None:
    """Explicit widths must keep whole KV groups, and a multiple of ``multiple_of`` channels up to ``inter`` (None: unknown)."""
    q_per_kv = heads // kv
    if config.heads and (config.heads % q_per_kv or not q_per_kv <= config.heads <= heads):
        raise UsageError(
            f"cannot keep {config.heads} attention heads: this model groups {q_per_kv} query heads per KV head, "
            f"so keep a multiple of {q_per_kv} between {q_per_kv} and {heads}", option="heads",
        )
    if config.intermediate_size and (config.intermediate_size % config.multiple_of or config.intermediate_size > (inter or math.inf)):
        raise UsageError(
            f"`intermediate_size` {config.intermediate_size}: keep a multiple of {config.multiple_of}"
            + (f" no larger than the current {inter}" if inter else ""), option="intermediate_size",
        )


def _attn_mlp(layer):
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in names) or not all(
        hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")
    ):
        raise UnsupportedArchitectureError(
            type(layer).__name__,
            ["llama-style blocks (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj)"],
            "Use depth pruning (`prune_layers`) for this model.",
        )
    return attn, mlp


def plan_width(model, layers, n_after: int, config: Config) -> tuple[int, int]:
    """KV groups and intermediate size per layer: as given, or solved for ``target_params``.

    Raises UsageError when a width is not one the architecture allows or the target is out of reach.
    """
    cfg = model.config
    attn, mlp = _attn_mlp(layers[0])
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    q_per_kv = heads // kv
    inter = mlp.gate_proj.out_features
    check_width(config, heads, kv, inter)
    groups = config.heads // q_per_kv if config.heads else kv
    if not config.target_params:
        return groups, config.intermediate_size or inter

    hidden, head_dim = attn.q_proj.in_features, attn.q_proj.out_features // heads
    # Parameters one MLP channel / one KV group costs in each layer.
    per_channel = 3 * hidden + _has_bias(mlp.gate_proj) + _has_bias(mlp.up_proj)
    per_group = q_per_kv * head_dim * (2 * hidden + _has_bias(attn.q_proj)) + 2 * head_dim * (hidden + _has_bias(attn.k_proj))
    per_layer_rest = count_params(layers[0]) - inter * per_channel - kv * per_group
    fixed = count_params(model) - sum(count_params(layer) for layer in layers) + n_after * per_layer_rest
    prunable = n_after * (inter * per_channel + kv * per_group)
    target = config.target_params
    if target >= fixed + prunable:
        raise UsageError(
            f"`target_params` {target:,} is not below the model's {fixed + prunable:,} parameters"
            f"{' after depth pruning' if n_after < len(layers) else ''}: choose a smaller target", option="target_params",
        )
    if not config.heads:
        # Cut attention in proportion to the MLP, rounded up to whole KV groups (Minitron prunes both).
        groups = min(kv, max(1, math.ceil((target - fixed) / prunable * kv)))
    new_inter = (target - fixed - n_after * groups * per_group) // (n_after * per_channel)
    new_inter = min(inter, new_inter // config.multiple_of * config.multiple_of)
    if new_inter < config.multiple_of:
        least = fixed + n_after * ((config.heads // q_per_kv or 1) * per_group + config.multiple_of * per_channel)
        raise UsageError(
            f"`target_params` {target:,} is below what width pruning can reach ({least:,}): "
            "drop more layers or choose a larger target", option="target_params",
        )
    return groups, new_inter


def _has_bias(linear) -> int:
    return 1 if linear.bias is not None else 0


def _importance(model, layers, batches: list[list[int]]):
    """Minitron activation importance per layer: (MLP channel scores, attention head scores)."""
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
        forward_all(model, batches)
    finally:
        for h in handles:
            h.remove()
    return [m.sqrt() for m in mlp_sq], [h.sqrt() for h in head_sq]


def apply_width(model, layers, batches: list[list[int]], groups: int, inter: int) -> dict[str, Any]:
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


# -- shared with prune.py (parameter counts, depth ranking) ------------------------------------


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_all(model, batches: list[list[int]]) -> None:
    import torch

    with torch.inference_mode():
        for ids in batches:
            model(input_ids=torch.tensor([ids]), use_cache=False)
