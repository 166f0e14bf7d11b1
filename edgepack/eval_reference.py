"""The reference of ``eval``: the float checkpoint's next-token distributions on the eval text, kept in the bundle.

The reference (the float checkpoint the bundle was converted from) is run once
with the transformers backend, in float32; what the metrics need is kept in the bundle, so later evals
need neither the checkpoint nor full logits (a float32 row of a 49,152-token
vocabulary is 192 KB per position)::

    eval/reference.npz    tokens [W, L]; per position: the reference's top-k token ids and
                          log-probs, the log of the mass outside the top-k, and the
                          log-prob of the actual next token
    eval/reference.json   settings, text provenance, greedy answers to the prompt set

Both are rebuilt when the source, the eval text, the calibration or the settings
change (``_reference_key``). Eval windows share no 64-token span with any
calibration text the manifest records (checked by hash, ``_clean_windows``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle
from .converters import calibration
from .errors import BundleError, CalibrationError, EdgepackError, UsageError
from .fsutil import atomic_path, write_json
from .runtime import load
from .runtime.base import Session

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
REF_NPZ = "reference.npz"
REF_JSON = "reference.json"
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

    text: str = "auto"  # auto (wikitext-2 when online, else builtin) | builtin | chat | prose | code | a file | hf:... ;
    # several, comma-separated, are scored each on its own; "domains" is chat,prose,code (calibration.DOMAINS)
    windows: int = 8  # scored windows
    window_len: int = 512  # tokens per window
    top_k: int = 64  # reference log-probs kept per position
    variant_top_k: int = 256  # variant log-probs requested per position (for the KL buckets)
    prompts: int = 8  # prompts for generation agreement (0 skips it)
    prompts_file: str | None = None  # one prompt per line instead of the built-in set
    max_new_tokens: int = 64  # greedy answer length
    calibration_files: tuple[str, ...] = ()  # the user files a bundle was calibrated on, to check disjointness

    def texts(self) -> list[str]:
        """The eval texts this config names, in order, each once."""
        names = [t.strip() for t in self.text.split(",") if t.strip()]
        names = [d for n in names for d in (calibration.DOMAINS if n == "domains" else (n,))]
        return list(dict.fromkeys(names)) or ["auto"]

    def check(self) -> None:
        if self.windows < 1 or self.window_len < 16:
            raise UsageError("eval needs at least 1 window of at least 16 tokens: raise `windows` / `window_len`", option="windows")
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
    bundle: Bundle, cfg: EvalConfig, *, device: str = "auto", threads: int | None = None, name: str = "reference"
) -> Reference:
    """The bundle's stored reference on ``cfg``'s one text if its settings match, else compute and store it.

    ``name`` is the stem of its files in eval/ (one per eval text). Raises BundleError (reference checkpoint gone), CalibrationError (text too short or
    overlapping calibration), OfflineError, MissingDependencyError.
    """
    folder = bundle.root / EVAL_DIR
    npz, meta_json = folder / f"{name}.npz", folder / f"{name}.json"
    text = _eval_text(cfg.text)
    key = _reference_key(bundle, cfg, text)
    if meta_json.is_file() and npz.is_file():
        meta = json.loads(meta_json.read_text())
        with np.load(npz) as z:
            if meta.get("key") == key and "key" in z.files and str(z["key"]) == key:  # both files of the same run (each is written atomically)
                return Reference(z["tokens"], z["top_ids"], z["top_logp"], z["rest_logp"], z["target_logp"], meta)
    log.info(f"computing reference distributions on {text.name} with transformers (once per bundle)")
    start = time.perf_counter()
    with load(_reference_path(bundle), backend="transformers", device=device, threads=threads, n_ctx=_reference_ctx(cfg)) as model:
        ids = _token_stream(text, model)
        prefix = model.tokenize("", add_special=True)  # BOS, for models that need one (Gemma, Llama 2)
        wins, skipped = _clean_windows(bundle, ids, cfg, cfg.window_len - len(prefix), model)
        wins = [prefix + w for w in wins]
        rows = [model.score(w, top_k=cfg.top_k) for w in wins]
        prompts = _prompts(cfg)
        prompt_ids = [_prompt_ids(model, p) for p in prompts]
        answers = [greedy(model, p, cfg.max_new_tokens) for p in prompt_ids]
        used = model.info.device
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
            "device": used,
            "ppl": float(np.exp(-np.mean([r.logprobs for r in rows]))),
            "prompts": prompts,
            "prompt_ids": prompt_ids,
            "answers": answers,
            "wall_s": round(time.perf_counter() - start, 2),
        },
    )
    with atomic_path(npz) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f, key=np.array(key), tokens=ref.tokens, top_ids=ref.top_ids, top_logp=ref.top_logp, rest_logp=ref.rest_logp, target_logp=ref.target_logp
        )
    write_json(meta_json, ref.meta)
    return ref


def greedy(session: Session, ids: list[int], n: int) -> str:
    """The greedy answer to prompt ids, as eval compares answers: at most ``n`` tokens, stripped."""
    return session.generate(ids, max_tokens=n, temperature=0.0).text.strip()


def _reference_ctx(cfg: EvalConfig) -> int:
    """Room for a window and for a chat prompt plus its answer (capped at the trained context by the backend)."""
    return max(cfg.window_len, 4096)


def _token_stream(text: calibration.Text, session: Session) -> list[int]:
    """The text's samples tokenized and concatenated, no special tokens added; the chat text's in the model's chat template."""
    if text.chat:
        try:
            return [
                t for topic, body in text.samples
                for t in session.chat_tokens(calibration.chat_messages(topic, body), add_generation_prompt=False)
            ]  # fmt: skip
        except UsageError:  # no chat template (a base model): the samples as they are
            pass
    return [t for _, body in text.samples for t in session.tokenize(body)]


def _prompt_ids(session: Session, prompt: str) -> list[int]:
    """A prompt as one user message in the model's chat template; a model without one gets the prompt as text, BOS first."""
    try:
        return session.chat_tokens([{"role": "user", "content": prompt}])
    except UsageError:  # no chat template (a base model)
        return session.tokenize(prompt, add_special=True)


def _reference_path(bundle: Bundle) -> Path:
    """The float checkpoint: the bundle's own, else pulled again from the manifest's ``ref`` and checked against its hashes.

    Raises BundleError when it cannot be had, or what was pulled is not what the bundle was made from.
    """
    if (path := bundle.reference()) is not None:
        return path
    from .converters.pull import pull

    source = bundle.data.get("source", {})
    ref = source.get("ref", "the source model")
    try:
        art = pull(ref)
    except EdgepackError as e:
        raise BundleError(
            f"the reference checkpoint of {bundle.root} is gone and pulling {ref!r} again failed ({e}): "
            "pull it where this machine can, or eval with the settings the bundle was evaluated with"
        ) from e
    want = {f["path"]: f["sha256"] for f in source.get("files", [])}
    got = {f["path"]: f["sha256"] for f in art.meta.get("files", [])}
    if want and any(got.get(name) != sha for name, sha in want.items()):
        raise BundleError(f"{ref!r} pulled again is not the checkpoint {bundle.root} was converted from (its files differ): re-convert")
    log.info(f"the reference checkpoint was gone; pulled {ref} again and checked it against the manifest")
    return art.path


def _eval_text(preset: str) -> calibration.Text:
    from . import constants

    if preset != "auto":
        return calibration.load(preset, split="eval")
    if not constants.hf_offline() and not constants.hub_reachable():
        log.info("the hub cannot be reached, so eval uses the built-in text instead of wikitext-2")
    elif not constants.hf_offline():
        try:
            return calibration.load(HF_DEFAULT, split="eval")
        except EdgepackError as e:  # no `datasets`, dataset gone
            log.info(f"wikitext-2 unavailable ({e}); using the built-in eval text")
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


def _clean_windows(bundle: Bundle, ids: list[int], cfg: EvalConfig, length: int, session: Session) -> tuple[list[list[int]], int]:
    """The first ``cfg.windows`` windows sharing no 64-token span with any calibration text.

    Windows that overlap are skipped (the stdlib repeats some docstring passages);
    raises CalibrationError when too few clean windows remain or a calibration text
    cannot be found again to check against.
    """
    texts = _calibration_texts(bundle, cfg.calibration_files)
    against = [calibration.span_hashes(_token_stream(t, session)) for t in texts]
    return calibration.disjoint_windows(ids, cfg.windows, length, against)


def _calibration_texts(bundle: Bundle, files: tuple[str, ...]) -> list[calibration.Text]:
    """Every calibration text the manifest records, reloaded and checked against its sha256, each once.

    Stages that share a text (imatrix and sensitivity, GPTQ under several variants) each record it.
    """
    given = [calibration.load(f) for f in files]
    out, seen = [], set()
    for rec in bundle.data.get("calibration", []):
        name = rec.get("name", "")
        if (name, rec.get("sha256")) in seen:
            continue
        seen.add((name, rec.get("sha256")))
        preset, _, split = name.rpartition(":")
        if name.startswith("file:"):
            text = next((t for t in given if t.sha256 == rec.get("sha256")), None)
            if text is None:
                raise CalibrationError(
                    f"the bundle was calibrated on the user file {name[5:]!r}; pass it in `calibration_files` so eval can "
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
