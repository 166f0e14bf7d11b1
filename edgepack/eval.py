"""``eval``: score every variant of a bundle against its float reference, on the same tokens.

Every variant, and the float reference, is fed the same token ids (from the
reference tokenizer) through edgepack's runtime (``Session.score``), so GGUF, ONNX
and GPTQ are comparable; the reference and GPTQ variants run on the transformers
backend. The pieces: ``eval_reference`` computes and stores the reference
distributions (and checks the eval text against the calibration text),
``eval_metrics`` scores a variant against them. Results land in the bundle::

    eval/reference.npz, eval/reference.json   the reference (see ``eval_reference``)
    eval/<variant>.json                       one variant's metrics and answers
    edgepack.json "eval"                      {"reference": {...}, "variants": {id: metrics without answers}}
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import library
from .bundle import Bundle
from .errors import BundleError, UsageError
from .eval_metrics import generation_agreement, kl_topk, score_variant
from .eval_reference import EVAL_DIR, PROMPTS, REF_JSON, REF_NPZ, EvalConfig, Reference, reference
from .fsutil import write_json
from .runtime import load, registry

if TYPE_CHECKING:
    from .executor import Cluster

log = logging.getLogger(__name__)

__all__ = [
    "EVAL_DIR", "PROMPTS", "REF_JSON", "REF_NPZ", "EvalConfig", "Reference", "as_bundle", "evaluate",
    "generation_agreement", "kl_topk", "reference", "score_variant",
]


def _trained_context(bundle: Bundle) -> int | None:
    folder = bundle.reference()
    if folder is None:
        return None
    cfg = json.loads((folder / "config.json").read_text())
    return cfg.get("text_config", cfg).get("max_position_embeddings")


def evaluate(
    bundle: Bundle | str | Path,
    cfg: EvalConfig | None = None,
    *,
    variants: list[str] | None = None,
    device: str = "auto",
    threads: int | None = None,
    kv_type: str = "f16",
    cluster: Cluster | None = None,
) -> dict[str, Any]:
    """Score ``variants`` (default: all) of a bundle; write eval/ and the manifest's "eval" slot.

    With a quantized ``kv_type`` the scores are what the variant and that KV cache lose together,
    recorded as ``<variant>+kv-<type>`` beside the variant's own. With a ``cluster`` each variant is scored
    in its own task (the reference is made here, once); the bundle must be on storage its nodes mount.

    Raises UsageError, BundleError, CalibrationError and whatever loading a variant raises.
    """
    cfg = cfg or EvalConfig()
    cfg.check()
    b = bundle if isinstance(bundle, Bundle) else library.open_bundle(bundle)
    trained = _trained_context(b)
    if trained and cfg.window_len > trained:
        log.info(f"eval windows shortened from {cfg.window_len} to the model's {trained}-token context")
        cfg = replace(cfg, window_len=trained)
    chosen = [b.variant(v) for v in variants] if variants else b.variants
    for v in chosen:
        runner = registry.for_format(v.format)
        if runner is not None and not runner.can_score:
            raise UsageError(f"variant {v.id} runs on {runner.name}, which cannot score tokens: eval the other variants with --variant")
    if not chosen:
        raise BundleError(f"bundle {b.root} has no variants to evaluate: convert some with `edgepack convert --to ...`")
    texts = cfg.texts()
    # one reference per text; the prompts are answered once, with the first
    refs = [
        reference(b, replace(cfg, text=t, prompts=cfg.prompts if i == 0 else 0), device=device, threads=threads,
                  name=REF_NPZ.removesuffix(".npz") + ("" if len(texts) == 1 else f"-{i}"))
        for i, t in enumerate(texts)
    ]  # fmt: skip
    ref = refs[0]
    n_ctx = max(cfg.window_len, max((len(p) for p in ref.meta.get("prompt_ids", [])), default=0) + cfg.max_new_tokens)
    items = [(b.root, v.id, refs, cfg, device, n_ctx, threads, kv_type) for v in chosen]
    scored = cluster.map(_score, items) if cluster else (_score(*item) for item in items)
    for v, (res, used, wall_s) in zip(chosen, scored):
        key = v.id if kv_type == "f16" else f"{v.id}+kv-{kv_type}"
        res = {"variant": v.id, "format": v.format, "backend": v.backend, "device": used, "kv_type": kv_type, **res}
        res["wall_s"] = wall_s
        write_json(b.root / EVAL_DIR / f"{key}.json", res)
        b.record_eval(key, {k: val for k, val in res.items() if k != "answers"})
        per_text = "".join(f"; {name} {r['kld']['mean']:.5f}" for name, r in res.get("texts", {}).items())
        log.info(f"eval {key}: PPL {res['ppl']:.3f}, KLD {res['kld']['mean']:.5f}{per_text}, top-1 {res['top1_agreement']:.3f}")
    keys = ("text", "windows", "window_len", "top_k", "skipped_overlapping_windows", "ppl")
    record = {**{k: ref.meta[k] for k in keys}, "file": f"{EVAL_DIR}/{REF_NPZ}"}
    if len(refs) > 1:  # the top-level entries are the first text's; each text's own under "texts"
        record["texts"] = {r.meta["text"]["name"]: {k: r.meta[k] for k in keys} for r in refs}
        record["file"] = f"{EVAL_DIR}/{REF_NPZ.removesuffix('.npz')}-0.npz"
    b.record_eval_reference(record)
    b.save()
    return b.data["eval"]


def _score(root: Path, vid: str, refs: list[Reference], cfg: EvalConfig, device: str, n_ctx: int, threads: int | None, kv_type: str) -> tuple[dict[str, Any], str, float]:
    """One variant's scores, the device it ran on and the seconds it took (a task of its own on a cluster)."""
    start = time.perf_counter()
    with load(root, variant=vid, device=device, n_ctx=n_ctx, threads=threads, kv_type=kv_type) as model:
        res = score_variant(model, refs, cfg)
        used = model.info.device
    return res, used, round(time.perf_counter() - start, 2)


def as_bundle(target: str | Path, *, reference: str | None = None, out: str | Path | None = None) -> Bundle:
    """``target`` itself if it is a bundle; else a bundle at ``out`` holding that one model, linked in.

    A lone model a backend claims (a .gguf file, an ONNX folder, a GPTQ checkpoint folder) gets an
    eval-and-bench bundle (default ``$EDGEPACK_HOME/bundles/<name>``) whose source is
    ``reference`` (anything ``edgepack pull`` takes), so eval has its float reference.
    Raises SourceNotFoundError, UsageError, and what pulling the reference raises.
    """
    from . import constants
    from .bundle import MANIFEST, source_record
    from .stages import Artifact, Kind

    p = library.locate(target, f"a bundle folder or {_claimed()}")
    if (p / MANIFEST).is_file():
        return Bundle.open(p)
    runner = registry.claiming(p)
    if runner is None:
        raise UsageError(f"{p} is not a bundle or {_claimed()}")
    fmt, backend = runner.formats[0], runner.name
    name = p.stem if p.is_file() else p.name
    root = Path(out) if out else constants.bundles_dir() / name
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise UsageError(f"{root} exists and is not a bundle: choose an empty or new folder with -o")
    source = source_record(str(p), {"origin": f"local:{p}"})
    if reference:
        from .converters.pull import pull

        art = pull(reference)
        source = source_record(reference, art.meta)
    b = Bundle.open(root) if (root / MANIFEST).is_file() else Bundle.create(root, name, source)
    b.data["source"] = source if reference or not b.data.get("source") else b.data["source"]
    if reference:
        b.keep_reference(art.path)
    lone = Artifact(Kind.FILE if p.is_file() else Kind.HF, p.resolve())
    b.place_variant(f"{fmt}-{name.lower()}", lone, format=fmt, backend=backend, meta={}, bits_per_weight=None)
    b.save()
    return b


def _claimed() -> str:
    return " or ".join(b.what for b in registry.backends())
