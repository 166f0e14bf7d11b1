"""``eval``: score every variant of a bundle against its float reference, on the same tokens.

The reference (the float checkpoint the bundle was converted from) is run once
with transformers; what the metrics need is kept in the bundle, so later evals
need neither the checkpoint nor full logits (a float32 row of a 49,152-token
vocabulary is 192 KB per position)::

    eval/reference.npz    tokens [W, L]; per position: the reference's top-k token ids and
                          log-probs, the log of the mass outside the top-k, and the
                          log-prob of the actual next token
    eval/reference.json   settings, text provenance, greedy answers to the prompt set
    eval/<variant>.json   one variant's metrics and answers
    edgepack.json "eval"  {"reference": {...}, "variants": {id: metrics without answers}}

Every variant is fed the same token ids (from the reference tokenizer) through
edgepack's runtime (``Session.score``), so GGUF, ONNX and GPTQ are comparable.

KL divergence from top-k lists: the reference keeps its top-k, the variant
returns its top-``variant_top_k``. Tokens in both lists are their own buckets;
everything else is one "rest" bucket whose mass is known exactly on both sides
(1 - the buckets). KL between these coarsened distributions is, by the log-sum
inequality, never above the true KL, and equals it when the rest holds little
mass; ``kld_coverage`` reports the reference mass the buckets covered. Measured
on SmolLM2-135M against full-vocabulary KL (512 tokens; Q2_K, Q4_K_M, Q8_0, Q4_1
GGUFs): top-32/128 gives 0.73-0.79 of the true value, the default top-64/256
0.79-0.85, top-250/1000 0.87-0.95; the ratio barely moves between variants, so
their ranking holds.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .bundle import Bundle
from .converters import calibration
from .errors import BundleError, CalibrationError, EdgepackError, MissingDependencyError, SourceNotFoundError, UsageError
from .fsutil import atomic_path, write_json

EVAL_DIR = "eval"
REF_NPZ = "reference.npz"
REF_JSON = "reference.json"
SPAN = 64  # tokens per hashed span when checking eval windows against calibration text
HF_DEFAULT = "hf:wikitext:wikitext-2-raw-v1:test:text"

# Written for edgepack: short tasks whose greedy answers say whether a variant still behaves like its reference.
PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the square of a number.",
    "List three colours of the rainbow.",
    "Explain in two sentences why the sky looks blue.",
    "Translate 'good morning' into Spanish.",
    "What is 12 plus 30?",
    "Give one tip for writing readable code.",
    "Name a planet in the solar system and one fact about it.",
    "Summarise what a hash table is in one sentence.",
    "Suggest a name for a small grey cat.",
)


@dataclass
class EvalConfig:
    """What eval scores; the reference is rebuilt when any of these (or the calibration) change."""

    text: str = "auto"  # auto (wikitext-2 when online, else builtin) | builtin | a file | hf:DATASET[:CONFIG]:SPLIT:COLUMN
    windows: int = 8  # scored windows
    window_len: int = 512  # tokens per window
    top_k: int = 64  # reference log-probs kept per position
    variant_top_k: int = 256  # variant log-probs requested per position (for the KL buckets)
    prompts: int = 8  # prompts for generation agreement (0 skips it)
    prompts_file: str | None = None  # one prompt per line instead of the built-in set
    max_new_tokens: int = 64  # greedy answer length
    calibration_files: tuple[str, ...] = ()  # the user files a bundle was calibrated on, to check disjointness

    def check(self) -> None:
        if self.windows < 1 or self.window_len < 16:
            raise UsageError("eval needs at least 1 window of at least 16 tokens: raise --windows / --window-len")
        if not 1 <= self.top_k <= self.variant_top_k <= 1000:
            raise UsageError("eval needs 1 <= top_k <= variant_top_k <= 1000 (the runtime returns at most 1000 per position)")
        if self.prompts < 0 or self.max_new_tokens < 1:
            raise UsageError("prompts must be >= 0 and max_new_tokens >= 1")


@dataclass
class Reference:
    tokens: np.ndarray  # [W, L] int32
    top_ids: np.ndarray  # [W, L-1, k] int32
    top_logp: np.ndarray  # [W, L-1, k] float32
    rest_logp: np.ndarray  # [W, L-1] float32
    target_logp: np.ndarray  # [W, L-1] float32
    meta: dict[str, Any]


# -- reference ---------------------------------------------------------------------------------


def reference(
    bundle: Bundle, cfg: EvalConfig, *, device: str = "auto", threads: int | None = None, log: Callable[[str], None] = print
) -> Reference:
    """The bundle's stored reference if its settings match, else compute and store it.

    Raises BundleError (reference checkpoint gone), CalibrationError (text too short or
    overlapping calibration), OfflineError, MissingDependencyError.
    """
    folder = bundle.root / EVAL_DIR
    text = _eval_text(cfg.text, log)
    key = _reference_key(bundle, cfg, text)
    if (folder / REF_JSON).is_file() and (folder / REF_NPZ).is_file():
        meta = json.loads((folder / REF_JSON).read_text())
        with np.load(folder / REF_NPZ) as z:
            if meta.get("key") == key and "key" in z.files and str(z["key"]) == key:  # both files of the same run (each is written atomically)
                return Reference(z["tokens"], z["top_ids"], z["top_logp"], z["rest_logp"], z["target_logp"], meta)
    log(f"computing reference distributions on {text.name} with transformers (once per bundle)")
    model = HFModel(_reference_path(bundle), device=device, threads=threads)
    start = time.perf_counter()
    ids = calibration.token_stream(text, model.tokenizer, chat=False)
    prefix = model.tokenizer("", add_special_tokens=True)["input_ids"]  # BOS, for models that need one (Gemma, Llama 2)
    wins, skipped = _clean_windows(bundle, ids, cfg, cfg.window_len - len(prefix), model.tokenizer)
    wins = [prefix + w for w in wins]
    rows = [model.score(w, top_k=cfg.top_k) for w in wins]
    prompts = _prompts(cfg)
    prompt_ids = [model.chat_ids(p) for p in prompts]
    answers = [model.greedy(p, cfg.max_new_tokens) for p in prompt_ids]
    ref = Reference(
        tokens=np.asarray(wins, dtype=np.int32),
        top_ids=np.stack([r.top_ids for r in rows]).astype(np.int32),
        top_logp=np.stack([r.top_logprobs for r in rows]).astype(np.float32),
        rest_logp=np.stack([r.rest_logprob for r in rows]).astype(np.float32),
        target_logp=np.stack([r.logprobs for r in rows]).astype(np.float32),
        meta={
            "key": key,
            "config": asdict(cfg),
            "text": text.provenance(len(ids)),
            "windows": len(wins),
            "window_len": cfg.window_len,
            "top_k": cfg.top_k,
            "skipped_overlapping_windows": skipped,
            "device": model.device,
            "ppl": float(np.exp(-np.mean([r.logprobs for r in rows]))),
            "prompts": prompts,
            "prompt_ids": prompt_ids,
            "answers": answers,
            "wall_s": round(time.perf_counter() - start, 2),
        },
    )
    with atomic_path(folder / REF_NPZ) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f, key=np.array(key), tokens=ref.tokens, top_ids=ref.top_ids, top_logp=ref.top_logp, rest_logp=ref.rest_logp, target_logp=ref.target_logp
        )
    write_json(folder / REF_JSON, ref.meta)
    model.close()
    return ref


def _reference_path(bundle: Bundle) -> Path:
    raw = bundle.data.get("source", {}).get("reference_path")
    path = Path(raw) if raw else None
    if path is None or not (path / "config.json").is_file():
        ref = bundle.data.get("source", {}).get("ref", "the source model")
        raise BundleError(
            f"the reference checkpoint of {bundle.root} ({raw}) is gone and the bundle holds no reference for these settings: "
            f"run `edgepack pull {ref}` again, or eval with the settings the bundle was evaluated with"
        )
    return path


def _trained_context(bundle: Bundle) -> int | None:
    raw = bundle.data.get("source", {}).get("reference_path")
    cfg_path = Path(raw) / "config.json" if raw else None
    if cfg_path is None or not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    return cfg.get("text_config", cfg).get("max_position_embeddings")


def _eval_text(preset: str, log: Callable[[str], None]) -> calibration.Text:
    from . import constants

    if preset != "auto":
        return calibration.load(preset, split="eval")
    if not constants.hf_offline():
        try:
            return calibration.load(HF_DEFAULT, split="eval")
        except EdgepackError as e:  # offline, no `datasets`, dataset gone
            log(f"wikitext-2 unavailable ({e}); using the built-in eval text")
    return calibration.load("builtin", split="eval")


def _reference_key(bundle: Bundle, cfg: EvalConfig, text: calibration.Text) -> str:
    src = bundle.data.get("source", {})
    payload = {
        "files": sorted(f.get("sha256", "") for f in src.get("files", [])),
        "revision": src.get("revision"),
        "text": text.sha256,
        "calibration": sorted(c.get("sha256", "") for c in bundle.data.get("calibration", [])),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("variant_top_k", "calibration_files")},
        "prompts": _prompts(cfg),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _prompts(cfg: EvalConfig) -> list[str]:
    if cfg.prompts_file:
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise UsageError(f"prompts file {path} does not exist: give a text file with one prompt per line")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return lines[: cfg.prompts]
    return list(PROMPTS[: cfg.prompts])


# -- disjointness from calibration ---------------------------------------------------------------


def _clean_windows(bundle: Bundle, ids: list[int], cfg: EvalConfig, length: int, tokenizer) -> tuple[list[list[int]], int]:
    """The first ``cfg.windows`` windows sharing no 64-token span with any calibration text.

    Windows that overlap are skipped (the stdlib repeats some docstring passages);
    raises CalibrationError when too few clean windows remain or a calibration text
    cannot be found again to check against.
    """
    texts = _calibration_texts(bundle, cfg.calibration_files)
    cal_hashes = [_span_hashes(np.asarray(calibration.token_stream(t, tokenizer, chat=False))) for t in texts]
    out, skipped = [], 0
    for w in calibration.windows(ids, len(ids) // length, length, what="eval"):
        h = _span_hashes(np.asarray(w))
        if any(np.isin(h, c).any() for c in cal_hashes):
            skipped += 1
            continue
        out.append(w)
        if len(out) == cfg.windows:
            return out, skipped
    raise CalibrationError(
        f"eval text gives {len(out)} windows of {cfg.window_len} tokens free of calibration text ({skipped} overlapped), "
        f"{cfg.windows} needed: give a longer eval text that is disjoint from the calibration text, or fewer/shorter windows"
    )


def _calibration_texts(bundle: Bundle, files: tuple[str, ...]) -> list[calibration.Text]:
    """Every calibration text the manifest records, reloaded and checked against its sha256."""
    given = [calibration.load(f) for f in files]
    out = []
    for rec in bundle.data.get("calibration", []):
        name = rec.get("name", "")
        preset, _, split = name.rpartition(":")
        if name.startswith("file:"):
            text = next((t for t in given if t.sha256 == rec.get("sha256")), None)
            if text is None:
                raise CalibrationError(
                    f"the bundle was calibrated on the user file {name[5:]!r}; pass it with --calibration-file so eval can "
                    "check that the eval text is disjoint from it"
                )
        elif split in ("calibration", "eval"):
            text = calibration.load(preset, split=split)
        else:
            raise CalibrationError(f"the manifest names calibration text {name!r}, which eval does not know: re-run the conversion")
        if rec.get("sha256") and text.sha256 != rec["sha256"]:
            raise CalibrationError(f"calibration text {name} changed since the conversion: re-run the conversion to re-check it")
        out.append(text)
    return out


_MULT = np.random.default_rng(20261127).integers(1, 2**63, size=SPAN, dtype=np.uint64) | np.uint64(1)


def _span_hashes(ids: np.ndarray) -> np.ndarray:
    """A 64-bit hash of every 64-token span (random linear hash mod 2**64)."""
    if len(ids) < SPAN:
        return np.zeros(0, dtype=np.uint64)
    spans = np.lib.stride_tricks.sliding_window_view(ids.astype(np.uint64), SPAN)
    with np.errstate(over="ignore"):
        return (spans * _MULT).sum(axis=1, dtype=np.uint64)


# -- metrics -------------------------------------------------------------------------------------


def kl_topk(p_ids, p_logp, p_rest, q_ids, q_logp, q_rest) -> tuple[np.ndarray, np.ndarray]:
    """Per-position KL(P || Q) over shared top-k buckets plus one rest bucket, and the P mass covered.

    Arrays are [N, k] (P) and [N, kq] (Q) ids/log-probs and [N] log rest masses.
    See the module docstring for why this is a lower bound of the true KL.
    """
    match = p_ids[:, :, None] == q_ids[:, None, :]  # [N, k, kq]
    shared = match.any(axis=2)
    q_at = np.where(shared, np.where(match, q_logp[:, None, :], -np.inf).max(axis=2), -np.inf)
    p = np.exp(p_logp.astype(np.float64))
    q_top = np.exp(q_logp.astype(np.float64))
    in_q = match.any(axis=1)  # [N, kq]: q's entries that are buckets
    p_rest = np.exp(p_rest.astype(np.float64)) + np.where(shared, 0.0, p).sum(axis=1)
    q_rest_mass = np.exp(q_rest.astype(np.float64)) + np.where(in_q, 0.0, q_top).sum(axis=1)
    terms = np.where(shared, p * (p_logp - q_at), 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest_term = np.where(p_rest > 0, p_rest * (np.log(p_rest) - np.log(np.maximum(q_rest_mass, 1e-300))), 0.0)
    return np.maximum(terms + rest_term, 0.0), np.where(shared, p, 0.0).sum(axis=1)


def _stats(x: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "p90": float(np.percentile(x, 90)),
        "p99": float(np.percentile(x, 99)),
        "max": float(x.max()),
        "sem": float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0,
    }


def score_variant(model, ref: Reference, cfg: EvalConfig) -> dict[str, Any]:
    """Token-level and generation metrics of ``model`` (a Session or HFModel) against ``ref``."""
    kls, cover, lq, top1 = [], [], [], []
    for w in range(len(ref.tokens)):
        s = model.score(ref.tokens[w].tolist(), top_k=cfg.variant_top_k)
        kl, cov = kl_topk(ref.top_ids[w], ref.top_logp[w], ref.rest_logp[w], s.top_ids, s.top_logprobs, s.rest_logprob)
        kls.append(kl)
        cover.append(cov)
        lq.append(np.asarray(s.logprobs, dtype=np.float64))
        top1.append(s.top_ids[:, 0] == ref.top_ids[w][:, 0])
    kl, lq = np.concatenate(kls), np.concatenate(lq)
    lp = ref.target_logp.reshape(-1).astype(np.float64)
    out: dict[str, Any] = {
        "tokens": int(len(lq)),
        "ppl": float(np.exp(-lq.mean())),
        "ppl_reference": float(np.exp(-lp.mean())),
        "kld": _stats(kl),
        "kld_coverage": float(np.concatenate(cover).mean()),
        "top1_agreement": float(np.concatenate(top1).mean()),
        "mean_abs_dp": float(np.abs(np.exp(lq) - np.exp(lp)).mean()),
    }
    prompt_ids, refs = ref.meta.get("prompt_ids", []), ref.meta.get("answers", [])
    if prompt_ids:
        answers = [_greedy(model, ids, cfg.max_new_tokens) for ids in prompt_ids]
        out["generation"] = generation_agreement(answers, refs)
        out["answers"] = answers
    return out


def _greedy(model, ids: list[int], n: int) -> str:
    if isinstance(model, HFModel):
        return model.greedy(ids, n)
    return model.generate(ids, max_tokens=n, temperature=0.0).text.strip()


def generation_agreement(answers: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu), mean ROUGE-L F1 (rouge-score) and exact-match rate of answers vs references."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)]
    return {
        "prompts": len(answers),
        "bleu": float(sacrebleu.corpus_bleu(answers, [references]).score),
        "rouge_l": float(np.mean(rouge)) if rouge else 0.0,
        "exact_match": float(np.mean([a.strip() == r.strip() for a, r in zip(answers, references)])) if answers else 0.0,
    }


# -- the command ---------------------------------------------------------------------------------


def evaluate(
    bundle: Bundle | str | Path,
    cfg: EvalConfig | None = None,
    *,
    variants: list[str] | None = None,
    device: str = "auto",
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score ``variants`` (default: all) of a bundle; write eval/ and the manifest's "eval" slot.

    Raises UsageError, BundleError, CalibrationError and whatever loading a variant raises.
    """
    from . import runtime

    cfg = cfg or EvalConfig()
    cfg.check()
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    trained = _trained_context(b)
    if trained and cfg.window_len > trained:
        log(f"eval windows shortened from {cfg.window_len} to the model's {trained}-token context")
        cfg = replace(cfg, window_len=trained)
    chosen = [b.variant(v) for v in variants] if variants else b.variants
    if not chosen:
        raise BundleError(f"bundle {b.root} has no variants to evaluate: convert some with `edgepack convert --to ...`")
    ref = reference(b, cfg, device=device, threads=threads, log=log)
    results = b.data.setdefault("eval", {}).setdefault("variants", {})
    n_ctx = max(cfg.window_len, max((len(p) for p in ref.meta.get("prompt_ids", [])), default=0) + cfg.max_new_tokens)
    for v in chosen:
        start = time.perf_counter()
        if v.backend == "transformers":
            model = HFModel(b.resolve(v.path), device=device, threads=threads, quantized=True)
        else:
            model = runtime.load(b.root, variant=v.id, device=device, n_ctx=n_ctx, threads=threads)
        try:
            res = score_variant(model, ref, cfg)
            used = model.info.device if hasattr(model, "info") else model.device
        finally:
            model.close()
        res = {"variant": v.id, "format": v.format, "backend": v.backend, "device": used, **res}
        res["wall_s"] = round(time.perf_counter() - start, 2)
        write_json(b.root / EVAL_DIR / f"{v.id}.json", res)
        results[v.id] = {k: val for k, val in res.items() if k != "answers"}
        log(f"eval {v.id}: PPL {res['ppl']:.3f}, KLD {res['kld']['mean']:.5f}, top-1 {res['top1_agreement']:.3f}")
    b.data["eval"]["reference"] = {k: ref.meta[k] for k in ("text", "windows", "window_len", "top_k", "skipped_overlapping_windows", "ppl")}
    b.data["eval"]["reference"]["file"] = f"{EVAL_DIR}/{REF_NPZ}"
    b.save()
    return b.data["eval"]


def as_bundle(target: str | Path, *, reference: str | None = None, out: str | Path | None = None, log: Callable[[str], None] = print) -> Bundle:
    """``target`` itself if it is a bundle; else a bundle at ``out`` holding that one model, linked in.

    A lone model (a .gguf file, an ONNX folder, a GPTQ checkpoint folder) gets an
    eval-and-bench bundle (default ``$EDGEPACK_HOME/bundles/<name>``) whose source is
    ``reference`` (anything ``edgepack pull`` takes), so eval has its float reference.
    Raises SourceNotFoundError, UsageError, and what pulling the reference raises.
    """
    import os
    import shutil

    from . import constants
    from .bundle import MANIFEST, Variant

    p = Path(target).expanduser()
    if (p / MANIFEST).is_file():
        return Bundle.open(p)
    if p.is_file() and p.suffix.lower() == ".gguf":
        fmt, backend = "gguf", "llama.cpp"
    elif (p / "genai_config.json").is_file():
        fmt, backend = "onnx", "onnx"
    elif (p / "config.json").is_file() and "quantization_config" in json.loads((p / "config.json").read_text()):
        fmt, backend = "gptq", "transformers"
    elif not p.exists():
        raise SourceNotFoundError(f"no bundle or model at {str(p)!r}: give a bundle folder, a .gguf file or an ONNX folder")
    else:
        raise UsageError(f"{p} is not a bundle, a .gguf file, an ONNX folder or a quantized checkpoint")
    name = p.stem if p.is_file() else p.name
    root = Path(out) if out else constants.bundles_dir() / name
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise UsageError(f"{root} exists and is not a bundle: choose an empty or new folder with -o")
    source: dict[str, Any] = {"ref": str(p), "origin": f"local:{p.resolve()}", "revision": None, "architecture": None, "files": []}
    if reference:
        from .converters.pull import pull

        art = pull(reference, log=log)
        source.update(ref=reference, origin=art.meta.get("origin"), revision=art.meta.get("revision"),
                      architecture=art.meta.get("architecture"), reference_path=str(art.path), files=art.meta.get("files", []))
    b = Bundle.open(root) if (root / MANIFEST).is_file() else Bundle.create(root, name, source)
    b.data["source"] = source if reference or not b.data.get("source") else b.data["source"]
    vid = f"{fmt}-{name.lower()}"
    dest = root / "variants" / vid
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for src in [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()):
        dst = dest / (src.name if p.is_file() else src.relative_to(p))
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    loadable = dest / p.name if p.is_file() else dest
    files = [b.file_record(f) for f in ([loadable] if p.is_file() else sorted(f for f in dest.rglob("*") if f.is_file()))]
    b.add_variant(Variant(vid, fmt, backend, loadable.relative_to(root).as_posix(), files))
    b.save()
    return b


class HFModel:
    """A transformers model scored and decoded like a runtime Session: the reference, and GPTQ variants."""

    def __init__(self, path: Path, *, device: str = "auto", threads: int | None = None, quantized: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            # the reference in float32 whatever it was saved in; quantized kernels want their own dtype
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if quantized else torch.float32)
        except ImportError as e:  # a quantized checkpoint whose kernels are not installed
            raise MissingDependencyError("gptqmodel", extra="gptq", purpose=f"scoring {path.name} with transformers") from e
        except (OSError, ValueError) as e:
            raise BundleError(f"transformers cannot load {path} ({e}): re-pull or re-convert it") from e
        self.device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        self.model.to(self.device).eval()

    def chat_ids(self, prompt: str) -> list[int]:
        msgs = [{"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def score(self, tokens: list[int], *, top_k: int):
        import torch

        from .runtime.base import Scores

        with torch.inference_mode():
            x = torch.tensor([tokens], device=self.device)
            logp = torch.log_softmax(self.model(x).logits[0, :-1].double(), dim=-1)
            nxt = torch.tensor(tokens[1:], device=self.device)
            target = logp.gather(1, nxt[:, None])[:, 0]
            vals, idx = logp.topk(top_k, dim=-1)
            rest = torch.logsumexp(logp.scatter(1, idx, float("-inf")), dim=-1)
        return Scores(target.cpu().numpy(), idx.cpu().numpy(), vals.cpu().numpy(), rest.cpu().numpy())

    def greedy(self, ids: list[int], n: int) -> str:
        import torch

        with torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            out = self.model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()

    def close(self) -> None:
        self.model = None
