"""Stage ``sensitivity`` and size-targeted mixes: what each tensor's rounding costs, and the cheapest way to fit a budget.

llama.cpp's K_M/K_S files follow a fixed recipe (attn_v and some ffn_down
one step up, ...). Given a size, edgepack instead measures, for every weight
tensor and every candidate type, the KL divergence its rounding would add
(``Sensitivity``, on the float reference) and picks the combination with the
least total under the budget (``plan_mix``); the quantize stage hands the
choice to llama.cpp as per-tensor type overrides.

``sensitivity.json`` (schema 1)::

    {"schema": 1, "calibration": {provenance}, "imatrix_sha256": str | null,
     "tensors": {GGUF name: {"columns": int, "rows": int, "loss": {tensor type: predicted KL per position}}}}
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError, UsageError
from ..fsutil import sha256_file, write_json
from ..stages import Artifact, Kind, Planned, Stage, side_input
from .ggml import HEADER_SLACK, TENSOR_NEEDS_IMATRIX, TENSOR_TYPES, TensorInfo, ggml, tensor_type
from .imatrix import ImatrixFile, calibration_windows, load_reference

SENSITIVITY_FILE = "sensitivity.json"
SIZE_MARGIN = 16384  # bytes the dry run's 0.01 MiB rounding may hide
# Candidate tensor types for size-targeted mixes; a tensor gets those whose blocks divide its rows.
CANDIDATES = ("Q2_K", "Q3_K", "IQ3_S", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")


def measure_fisher(model, weights: dict[str, Any], windows: list[list[int]], *, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per GGUF tensor, (rows, columns) factors of its Fisher diagonal per position: F_ij ~ rows_i * columns_j.

    With labels sampled from the model itself, E[g g^T] of the gradient of
    the log-likelihood is the Fisher information, whose quadratic form is the
    second-order KL divergence: KL(p || p with W+dW) ~ 1/2 dW^T F dW. The
    gradient is taken per calibration window, not per position, so that an
    error repeated at every position (rounding a weight shifts all of them
    alike) adds up coherently through attention, as it does in the model:
    measured on SmolLM2, per-position estimates missed attn_v's cost 3-4x,
    per-window ones land within 0.6-1.1x of the measured KL for every tensor
    kind. Only the row and column sums of each squared gradient are kept
    (a rank-1 fit, which predicted within 10% of the full diagonal), so
    memory stays at a few vectors per tensor.
    """
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    rows = {n: torch.zeros(w.shape[0], dtype=torch.float64) for n, w in weights.items()}
    cols = {n: torch.zeros(w.shape[1], dtype=torch.float64) for n, w in weights.items()}
    hooks = []

    def collect(name):
        def hook(param):
            g2 = param.grad.detach().double().pow(2)
            rows[name] += g2.sum(1)
            cols[name] += g2.sum(0)
            param.grad = None  # only the sums are kept; a tied weight gets both uses' gradient first

        return hook

    for name, w in weights.items():
        w.requires_grad_(True)
        hooks.append(w.register_post_accumulate_grad_hook(collect(name)))
    gen = torch.Generator().manual_seed(seed)
    tokens = 0
    try:
        for window in windows:
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0].float(), -1)
            labels = torch.multinomial(logp.detach().exp(), 1, generator=gen)
            (-logp.gather(1, labels).sum()).backward()
            tokens += len(window)
    finally:
        for h in hooks:
            h.remove()
        for w in weights.values():
            w.requires_grad_(False)
    return {n: ((rows[n] / tokens).numpy(), (cols[n] / max(float(cols[n].sum()), 1e-30)).numpy()) for n in weights}


def predicted_loss(factors: tuple[np.ndarray, np.ndarray], w: np.ndarray, wq: np.ndarray) -> float:
    """Second-order KL divergence per position from replacing ``w`` by ``wq``: 1/2 sum_ij F_ij dW_ij^2."""
    rows, cols = factors
    return 0.5 * float(rows @ (np.square(w - wq, dtype=np.float64) @ cols))


class Sensitivity(Stage):
    """HF reference -> predicted KL divergence of every weight tensor in every candidate type (``sensitivity.json``).

    Each candidate is made by llama.cpp's own quantization code (ggml, with
    the importance matrix the final quantization will use), so the measured
    rounding error is the one the file will hold; the Fisher weighting says
    what that error costs in the model's output distribution.
    """

    name = "sensitivity"
    version = 1
    input_kinds = (Kind.HF,)
    output_kind = Kind.FILE

    @dataclass(frozen=True)
    class Config:
        calibration: str = side_input("builtin")  # calibration.load preset
        tokens: int = 8192  # calibration tokens for the gradient pass, rounded down to whole windows
        window: int = 512
        chat: bool | None = None  # chat-format the samples; None: when the tokenizer has a chat template
        imatrix: str | None = side_input()  # the importance matrix the quantize stage will use (None: quantize without)
        types: tuple[str, ...] = CANDIDATES  # candidate tensor types
        seed: int = 0  # for the sampled labels

    def plan(self, inp: Artifact | None, config: Config) -> list[Planned]:
        return [Planned(SENSITIVITY_FILE)]

    def run(self, inp: Artifact, config: Config, out_dir: Path) -> Artifact:
        types = [tensor_type(t) for t in config.types]
        imat = ImatrixFile.load(config.imatrix) if config.imatrix else None
        model, tok, names = load_reference(inp.path)
        windows, record = calibration_windows(tok, config.calibration, config.tokens, config.window, config.chat)
        modules = dict(model.named_modules())
        weights = {g: modules[n].weight for n, g in names.items()}
        weights["token_embd.weight"] = model.get_input_embeddings().weight  # a tied head shares it
        fisher = measure_fisher(model, weights, windows, seed=config.seed)
        g = ggml()
        table = {}
        for name, param in sorted(weights.items()):
            w = param.detach().float().numpy()
            im = imat.entries.get(name) if imat else None
            loss = {}
            for kind in types:
                if w.shape[1] % g.block(TENSOR_TYPES[kind]) or (kind in TENSOR_NEEDS_IMATRIX and im is None):
                    continue
                loss[kind] = predicted_loss(fisher[name], w, g.roundtrip(w, TENSOR_TYPES[kind], im))
            table[name] = {"columns": w.shape[1], "rows": w.shape[0], "loss": loss}
        out = out_dir / SENSITIVITY_FILE
        write_json(out, {
            "schema": 1,
            "calibration": record,
            "imatrix_sha256": sha256_file(config.imatrix) if config.imatrix else None,
            "tensors": table,
        })  # fmt: skip
        return Artifact(Kind.FILE, out, {"calibration": record, "tensors": len(table)})


# -- choosing the mix ------------------------------------------------------------------------------


def plan_mix(options: dict[str, list[tuple[str, int, float]]], budget: int) -> dict[str, str]:
    """Choose one (type, bytes, loss) option per tensor: least total loss with total bytes <= ``budget``.

    A multiple-choice knapsack, solved the Lagrangian way: each tensor's
    options are reduced to the lower convex hull of (bytes, loss); every
    tensor starts at its smallest option and the upgrade with the most loss
    saved per byte is taken next while it fits; the bytes left over then go,
    best saving first, to any upgrade that still fits. Raises UsageError when
    even the smallest options exceed the budget.
    """
    hulls = {name: _hull(opts) for name, opts in options.items()}
    choice = {name: 0 for name in hulls}
    used = sum(h[0][1] for h in hulls.values())
    if used > budget:
        raise UsageError(
            f"the smallest types allowed still need {used / 1e6:.2f} MB of weights, over the {budget / 1e6:.2f} MB left for them: "
            "raise the target size, or allow smaller `target_types`"
        )
    heap = [(-_gain(h, 0), name) for name, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], choice[name]
        extra = h[i + 1][1] - h[i][1]
        if used + extra > budget:
            continue
        choice[name], used = i + 1, used + extra
        if i + 2 < len(h):
            heapq.heappush(heap, (-_gain(h, i + 1), name))
    picked = {name: hulls[name][i] for name, i in choice.items()}
    while True:  # spend what is left on the best upgrade that still fits, hull or not
        best = None
        for name, opts in options.items():
            _, size, loss = picked[name]
            for opt in opts:
                saved, extra = loss - opt[2], opt[1] - size
                if saved > 0 and used + extra <= budget and (best is None or saved > best[0]):
                    best = (saved, name, opt, extra)
        if best is None:
            break
        _, name, opt, extra = best
        picked[name], used = opt, used + extra
    return {name: opt[0] for name, opt in picked.items()}


def _hull(opts: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """Options on the lower convex hull of (bytes, loss), smallest first; dominated ones dropped."""
    pts: list[tuple[str, int, float]] = []
    for opt in sorted(opts, key=lambda o: (o[1], o[2])):
        if pts and opt[2] >= pts[-1][2]:
            continue  # more bytes for no less loss
        while len(pts) >= 2 and _slope(pts[-2], pts[-1]) >= _slope(pts[-1], opt):
            pts.pop()
        pts.append(opt)
    return pts


def _slope(a, b) -> float:
    return (b[2] - a[2]) / max(b[1] - a[1], 1)


def _gain(h: list, i: int) -> float:
    return (h[i][2] - h[i + 1][2]) / max(h[i + 1][1] - h[i][1], 1)


def plan_target(config, tensors: dict[str, TensorInfo], data_offset: int, fixed: dict[str, str]) -> dict[str, Any]:
    """Per-tensor types meeting a Quantize.Config's target with the least predicted loss; ``fixed`` are types set by the user.

    Raises UsageError, CalibrationError.
    """
    if not config.sensitivity:
        raise UsageError("a size target needs measured sensitivity: run the sensitivity stage on the reference checkpoint first")
    table = load_table(Path(config.sensitivity), config.imatrix)
    options, budget, goal = _problem(config, tensors, data_offset, fixed, table)
    types = plan_mix(options, budget)
    losses = {name: dict((k, loss) for k, _, loss in opts) for name, opts in options.items()}
    counts: dict[str, int] = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {
        **goal,
        "predicted_loss": round(sum(losses[n][k] for n, k in types.items()), 6),
        "chosen": dict(sorted(counts.items())),
        "types": types,
    }


def check_target(config, tensors: dict[str, TensorInfo], data_offset: int, fixed: dict[str, str]) -> None:
    """Raise UsageError if even the smallest candidate types miss the target: from sizes alone, before sensitivity is measured."""
    options, budget, _ = _problem(config, tensors, data_offset, fixed, None)
    plan_mix({name: [min(opts, key=lambda o: o[1])] for name, opts in options.items()}, budget)


def _problem(config, tensors, data_offset, fixed, table: dict[str, Any] | None):
    """(options per tensor, byte budget for them, goal record) of a target; without a table every candidate costs no loss."""
    if config.target_size and config.target_bpw:
        raise UsageError("give a target size or a target bits per weight, not both")
    usable = {tensor_type(k) for k in config.target_types} if config.target_types else set(TENSOR_TYPES)
    g = ggml()
    options: dict[str, list[tuple[str, int, float]]] = {}
    rest = 0  # bytes of the tensors whose type is not ours to choose
    for name, t in tensors.items():
        if name in fixed:
            rest += g.nbytes(TENSOR_TYPES[fixed[name]], t.shape)
            continue
        if not t.quantizable:
            rest += g.nbytes(t.type, t.shape)
            continue
        if table is None:
            loss = {k: 0.0 for k in CANDIDATES if t.shape[0] % g.block(TENSOR_TYPES[k]) == 0}
        else:
            entry = table.get(name)
            if entry is None or (entry["columns"], entry["rows"]) != (t.shape[0], int(np.prod(t.shape[1:]))):
                raise CalibrationError(
                    f"the sensitivity table {config.sensitivity} has no entry of shape {list(t.shape)} for {name}: "
                    "it was measured on another model; run the sensitivity stage on this model's reference"
                )
            loss = entry["loss"]
        allowed = [(k, v) for k, v in loss.items() if k in usable and (config.imatrix or k not in TENSOR_NEEDS_IMATRIX)]
        if not allowed:
            raise UsageError(f"no measured type allowed for the size target fits {name} ({t.shape[0]} columns): allow more `target_types`", option="target_types")
        options[name] = [(k, g.nbytes(TENSOR_TYPES[k], t.shape), v) for k, v in allowed]
    if config.target_size:
        budget = config.target_size - data_offset - HEADER_SLACK - SIZE_MARGIN - rest
        return options, budget, {"target_size": config.target_size}
    n_params = sum(int(np.prod(t.shape)) for t in tensors.values())
    return options, int(config.target_bpw * n_params / 8) - rest, {"target_bpw": config.target_bpw}


def load_table(path: Path, imatrix: str | None) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        table = data["tensors"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CalibrationError(f"{path} is not a sensitivity table ({e}): run the sensitivity stage again") from e
    want, had = (sha256_file(imatrix) if imatrix else None), data.get("imatrix_sha256")
    if had != want:
        if want is None:
            why = "with an importance matrix but this quantization has none: pass the same imatrix"
        elif had is None:
            why = "without an importance matrix but this quantization uses one: run the sensitivity stage with it"
        else:
            why = "with another importance matrix than this quantization uses: run the sensitivity stage with the same one"
        raise CalibrationError(f"{path} was measured {why}")
    return table
