"""What each architecture needs in a GGUF file: hyperparameters, tensor layout fixes, computed tensors.

The *format* (key names, tensor names, HF -> GGUF name table) is gguf-py's;
this module holds the *model* knowledge, read against llama.cpp's graphs
(``src/models/<arch>.cpp``):

* llama, mistral -> llama.cpp ``llama``, which rotates interleaved pairs
  (GPT-J style) while HF checkpoints store Q/K rows in rotate-half order, so
  the rows of each head are permuted back.
* qwen2 (q/k/v biases), qwen3 (q/k norms, wide heads), phi3 (fused qkv and
  gate_up, LongRoPE factors): NeoX-style rope, weights as stored.
* gemma2, gemma3 (text): HF's RMSNorm scales by ``1 + w`` where llama.cpp
  scales by ``w``, so every norm weight gets +1; llama.cpp multiplies the
  embeddings by sqrt(hidden) itself, as HF does; sliding-window layers are
  written as a per-layer pattern.

``config.json`` is read directly, in both the transformers 4 layout
(``rope_theta``/``rope_scaling``) and the transformers 5 one (``rope_parameters``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, RopeScalingType

from ..errors import InvalidModelError, UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    arch: MODEL_ARCH
    permute_qk: bool = False  # llama.cpp rotates interleaved pairs; HF stores rotate-half rows
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w)
    tied_default: bool = False  # what transformers assumes when config.json omits tie_word_embeddings
    swa_graph: bool = False  # llama.cpp's graph honours sliding-window layers

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


SUPPORTED: dict[str, ArchSpec] = {
    "llama": ArchSpec(MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": ArchSpec(MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": ArchSpec(MODEL_ARCH.QWEN2),
    "qwen3": ArchSpec(MODEL_ARCH.QWEN3),
    "gemma2": ArchSpec(MODEL_ARCH.GEMMA2, norm_plus_one=True, tied_default=True, swa_graph=True),
    "gemma3_text": ArchSpec(MODEL_ARCH.GEMMA3, norm_plus_one=True, tied_default=True, swa_graph=True),
    "phi3": ArchSpec(MODEL_ARCH.PHI3),
}
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; recomputed by llama.cpp
# llama.cpp keeps these in float32 whatever the file type.
F32_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# llama.cpp derives Gemma's attention scale from the layer count: hidden/heads for the 27B shapes, else head_dim.
_GEMMA_27B_LAYERS = {MODEL_ARCH.GEMMA2: 46, MODEL_ARCH.GEMMA3: 62}


@dataclass
class Model:
    """A checkpoint's architecture and hyperparameters, normalised from config.json."""

    spec: ArchSpec
    config: dict[str, Any]
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_ctx: int
    rms_eps: float
    tied: bool
    rope: dict[str, Any]
    rope_swa: dict[str, Any] | None = None
    swa_layers: list[bool] = field(default_factory=list)
    sliding_window: int | None = None
    warnings: list[str] = field(default_factory=list)

    def write_metadata(self, w: GGUFWriter) -> None:
        """Add the architecture's hyperparameter keys; raises UnsupportedArchitectureError for unsupported rope types."""
        w.add_context_length(self.n_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(self.n_ff)
        w.add_block_count(self.n_layer)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        w.add_layer_norm_rms_eps(self.rms_eps)
        w.add_rope_dimension_count(self.n_rot)
        w.add_rope_freq_base(float(self.rope["rope_theta"]))
        self._write_rope_scaling(w)
        if self.sliding_window:
            w.add_sliding_window(self.sliding_window)
            if self.spec.swa_graph:
                w.add_sliding_window_pattern(self.swa_layers)
        if self.rope_swa is not None:
            w.add_rope_freq_base_swa(float(self.rope_swa["rope_theta"]))
        cfg = self.config
        if self.spec.arch == MODEL_ARCH.GEMMA2:
            w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        elif self.spec.arch == MODEL_ARCH.GEMMA3 and cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])

    def _write_rope_scaling(self, w: GGUFWriter) -> None:
        kind = self.rope.get("rope_type", "default")
        if kind == "linear":
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(self.rope["factor"]))
        elif kind == "yarn":
            w.add_rope_scaling_type(RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(self.rope["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(self.rope.get("original_max_position_embeddings") or self.n_ctx / self.rope["factor"]))
            if "beta_fast" in self.rope:
                w.add_rope_scaling_yarn_beta_fast(float(self.rope["beta_fast"]))
            if "beta_slow" in self.rope:
                w.add_rope_scaling_yarn_beta_slow(float(self.rope["beta_slow"]))
        elif kind == "longrope":
            w.add_rope_scaling_type(RopeScalingType.LONGROPE)
            w.add_rope_scaling_attn_factors(self._longrope_attention_factor())
            w.add_rope_scaling_orig_ctx_len(self._longrope_original())

    def _longrope_original(self) -> int:
        return int(self.rope.get("original_max_position_embeddings") or self.config["original_max_position_embeddings"])

    def _longrope_attention_factor(self) -> float:
        # transformers' LongRoPE: cos/sin scaled by sqrt(1 + ln(s) / ln(original context)), s = context / original.
        if self.rope.get("attention_factor") is not None:
            return float(self.rope["attention_factor"])
        scale = self.n_ctx / self._longrope_original()
        return 1.0 if scale <= 1.0 else math.sqrt(1.0 + math.log(scale) / math.log(self._longrope_original()))

    def computed_tensors(self) -> dict[str, np.ndarray]:
        """Tensors llama.cpp needs that the checkpoint does not hold (rope frequency factors)."""
        kind = self.rope.get("rope_type", "default")
        if kind == "llama3":
            return {"rope_freqs.weight": _llama3_factors(self.rope, self.n_rot)}
        if kind == "longrope":
            long, short = (np.asarray(self.rope[k], dtype=np.float32) for k in ("long_factor", "short_factor"))
            for name, arr in (("long_factor", long), ("short_factor", short)):
                if arr.shape != (self.n_rot // 2,):
                    raise InvalidModelError(f"rope {name} has {arr.size} entries; rotary dimension {self.n_rot} needs {self.n_rot // 2}")
            return {"rope_factors_long.weight": long, "rope_factors_short.weight": short}
        return {}

    def row_align(self, gguf_name: str) -> int:
        """Rows that must stay together when a tensor is streamed in blocks (one head for permuted Q/K)."""
        if self.spec.permute_qk and _is_qk(gguf_name):
            return self.head_dim
        return 1

    def transform(self, gguf_name: str, block: np.ndarray) -> np.ndarray:
        """Fix a block of rows of one tensor to llama.cpp's conventions."""
        if self.spec.permute_qk and _is_qk(gguf_name):
            # rotate-half rows [x0..x(d/2-1), y0..] of each head back to interleaved pairs [x0, y0, x1, y1, ...]
            rest = block.shape[1:]
            block = block.reshape(-1, 2, self.head_dim // 2, *rest).swapaxes(1, 2).reshape(-1, *rest)
        if self.spec.norm_plus_one and gguf_name.endswith("norm.weight"):
            block = block.astype(np.float32) + 1.0
        return block


def _is_qk(gguf_name: str) -> bool:
    return gguf_name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias"))


def read_model(path: Path) -> Model:
    """Read ``path/config.json``; raises InvalidModelError or UnsupportedArchitectureError."""
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidModelError(f"cannot read {cfg_path} ({e}): point at a transformers checkpoint folder") from e
    model_type = cfg.get("model_type", "?")
    spec = SUPPORTED.get(model_type)
    if spec is None:
        hint = "For gemma3 use the text-only checkpoint (Gemma3ForCausalLM, model_type gemma3_text)." if model_type == "gemma3" else ""
        raise UnsupportedArchitectureError(model_type, sorted(SUPPORTED), hint)
    try:
        return _normalise(spec, cfg)
    except KeyError as e:
        raise InvalidModelError(f"{cfg_path} lacks {e.args[0]!r}, which a {model_type} config must have") from e


def _normalise(spec: ArchSpec, cfg: dict[str, Any]) -> Model:
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope, rope_swa = _rope(cfg)
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    n_layer = cfg["num_hidden_layers"]
    model = Model(
        spec=spec,
        config=cfg,
        n_layer=n_layer,
        n_embd=cfg["hidden_size"],
        n_ff=cfg["intermediate_size"],
        n_head=n_head,
        n_head_kv=cfg.get("num_key_value_heads") or n_head,
        head_dim=head_dim,
        n_rot=int(head_dim * partial),
        n_ctx=cfg.get("max_position_embeddings", 4096),
        rms_eps=cfg.get("rms_norm_eps", 1e-6),
        tied=cfg.get("tie_word_embeddings", spec.tied_default),
        rope=rope,
        rope_swa=rope_swa,
    )
    kind = rope.get("rope_type", "default")
    allowed = {"default", "linear", "yarn", "llama3", "longrope"}
    if kind not in allowed:
        raise UnsupportedArchitectureError(f"{cfg['model_type']} with rope scaling {kind!r}", sorted(allowed))
    _sliding(model)
    if spec.arch in _GEMMA_27B_LAYERS:
        _check_gemma(model)
    return model


def _rope(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(main rope parameters, sliding-layer rope parameters or None), in transformers 5's vocabulary."""
    params = cfg.get("rope_parameters")
    if params:
        if "full_attention" in params:  # one set per layer type (Gemma 3)
            return dict(params["full_attention"]), dict(params.get("sliding_attention") or params["full_attention"])
        return dict(params), None
    main = dict(cfg.get("rope_scaling") or {})
    main["rope_type"] = main.pop("type", None) or main.get("rope_type") or "default"
    main["rope_theta"] = cfg.get("rope_theta", 10000.0)
    if cfg.get("model_type") == "gemma3_text":
        return main, {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    return main, None


def _sliding(model: Model) -> None:
    cfg = model.config
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:  # Qwen2/3 carry a window they do not use
        window = None
    if not window or window >= model.n_ctx:
        return
    types = cfg.get("layer_types")
    if not types:  # transformers 4 configs: Gemma 2 alternates, Gemma 3 has one global layer every N
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
        if model.spec.arch == MODEL_ARCH.GEMMA2:
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(model.n_layer)]
        elif pattern:
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(model.n_layer)]
        else:
            types = ["sliding_attention"] * model.n_layer
    model.sliding_window = int(window)
    model.swa_layers = [t == "sliding_attention" for t in types]
    if not model.spec.swa_graph and any(model.swa_layers):
        model.warnings.append(
            f"{cfg['model_type']} uses a {window}-token sliding window that llama.cpp's {model.spec.name} graph does not apply: "
            f"outputs match transformers only up to {window} tokens of context"
        )
    if model.rope_swa is not None and model.rope_swa.get("rope_type", "default") != "default":
        raise UnsupportedArchitectureError(
            f"{cfg['model_type']} with rope scaling on sliding layers", ["rope scaling on full-attention layers only"]
        )


def _check_gemma(model: Model) -> None:
    cfg = model.config
    big = model.n_layer == _GEMMA_27B_LAYERS[model.spec.arch]
    expected = model.n_embd // model.n_head if big else model.head_dim
    scalar = cfg.get("query_pre_attn_scalar", expected)
    if scalar != expected:
        raise UnsupportedArchitectureError(
            f"{cfg['model_type']} with query_pre_attn_scalar={scalar}",
            [f"query_pre_attn_scalar={expected} for {model.n_layer} layers"],
            "llama.cpp derives the attention scale from the layer count, so this checkpoint would give wrong outputs.",
        )
    if model.spec.arch == MODEL_ARCH.GEMMA2 and not (cfg.get("attn_logit_softcapping") and cfg.get("final_logit_softcapping")):
        raise UnsupportedArchitectureError("gemma2 without logit soft-capping", ["gemma2 with attn and final soft-capping"])
    if model.spec.arch == MODEL_ARCH.GEMMA3 and cfg.get("attn_logit_softcapping"):
        raise UnsupportedArchitectureError("gemma3 with attention soft-capping", ["gemma3 without it"])


def _llama3_factors(rope: dict[str, Any], n_rot: int) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1's rope scaling (llama.cpp's rope_freqs tensor).

    High frequencies (wavelength under original/high_freq_factor) keep their
    value, low ones (over original/low_freq_factor) are divided by ``factor``,
    and the band between is interpolated.
    """
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope["original_max_position_embeddings"])
    freqs = float(rope["rope_theta"]) ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    interpolated = 1.0 / ((1.0 - smooth) / factor + smooth)
    out = np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, interpolated))
    return out.astype(np.float32)
