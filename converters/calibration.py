"""Calibration and evaluation text, shared by every stage that needs data.

Presets:

``builtin``
    Gathered at run time from the docstrings of the Python standard library
    (English prose with some code), so edgepack ships no text it did not
    write and works offline. Each docstring falls, by a hash of its qualified
    name, into the calibration split (80 %) or the held-out eval split
    (20 %); the two never overlap.
``chat``
    ``builtin``'s samples, always chat formatted where they are read (the chat domain of ``domains``).
``prose``
    Long English prose, plain: the license texts every Debian-like system keeps in
    /usr/share/common-licenses, and the Python installation's own LICENSE.txt. Whole
    license families (GPL-2 and GPL-3 share paragraphs) fall into one split, the
    eval split taking families until it holds a fifth of the characters.
``code``
    Python source of the standard library with its docstrings blanked (those are
    ``builtin``'s), plain; split by file like ``builtin``.
``mix``
    ``builtin``'s docstrings (half the rows, chat formatted for instruct models),
    ``prose`` and ``code`` (a quarter each, plain) interleaved, so quantization is
    fitted to more than one domain (converters/onnx.py has the measured effect).
``domains``
    Eval only: ``chat``, ``prose`` and ``code``, each scored on its own (``DOMAINS``).
a file path
    A UTF-8 text file of the user's; paragraphs (blank-line separated) are samples.
``hf:DATASET[:CONFIG]:SPLIT:COLUMN``
    A Hugging Face dataset, when online (``datasets`` must be installed).

Instruct models are calibrated on chat-formatted text: each sample becomes a
user turn asking about a topic and an assistant turn holding the text, in the
model's own chat template.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import CalibrationError, MissingDependencyError, OfflineError, UsageError
from ..options import option
from . import stdlib_docs

Split = Literal["calibration", "eval"]
DOMAINS = ("chat", "prose", "code")  # the held-out domains eval and the benchmarks score
PRESETS = ("builtin", "chat", "prose", "code", "mix")
_EVAL_SHARE = 20  # percent of builtin docstrings held out for evaluation
_CHUNK = 2000  # characters per prose or code sample: about 500 tokens, one GPTQ row
_MIX_ROWS = 100  # prose and code samples in ``mix``, and twice as many docstrings: 400 rows, more than GPTQ's 256


@dataclass(frozen=True)
class Text:
    """A named list of samples with a content hash for provenance."""

    name: str
    samples: tuple[tuple[str, str], ...]  # (topic, text)
    plain: frozenset[str] = frozenset()  # topics never chat formatted: prose and code answer no question
    chat: bool = False  # every other sample is chat formatted wherever it is read (the chat domain)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for topic, text in self.samples:
            h.update(topic.encode() + b"\0" + text.encode() + b"\0")
        return h.hexdigest()

    def provenance(self, tokens: int) -> dict:
        return {"name": self.name, "sha256": self.sha256, "tokens": tokens, "samples": len(self.samples)}


def option_field(panel: str = "") -> str:
    """The ``calibration`` option of the formats and transforms that read calibration text (one option, shared)."""
    return option(
        "builtin", metavar="PRESET", panel=panel,
        help="Calibration text for the importance matrix, sensitivity, GPTQ and pruning: builtin (default; mix for onnx:int4), "
        "mix (docstrings, prose and code), prose, code, a UTF-8 text file, or hf:DATASET[:CONFIG]:SPLIT:COLUMN.",
    )  # fmt: skip


def check_preset(preset: str, option_name: str = "calibration") -> str:
    """``preset`` after checking its form (a dataset is only fetched when a stage needs it); raises UsageError."""
    if preset in PRESETS or preset.startswith("hf:") and len(preset.split(":")) in (4, 5):
        return preset
    if preset.startswith("hf:"):
        raise UsageError(f"`{option_name}` {preset!r}: write hf:DATASET[:CONFIG]:SPLIT:COLUMN, e.g. hf:wikitext:wikitext-2-raw-v1:test:text", option=option_name)
    if not Path(preset).expanduser().is_file():
        raise UsageError(f"`{option_name}` {preset!r}: no such file; give builtin, mix, a UTF-8 text file or hf:DATASET[:CONFIG]:SPLIT:COLUMN", option=option_name)
    return preset


def load(preset: str = "builtin", split: Split = "calibration") -> Text:
    """Load a preset's samples; raises CalibrationError, OfflineError or MissingDependencyError."""
    if preset == "builtin":
        return _builtin(split)
    if preset == "chat":
        return Text(f"chat:{split}", _builtin(split).samples, chat=True)
    if preset == "prose":
        return _prose(split)
    if preset == "code":
        return _code(split)
    if preset == "mix":
        return _mix(split)
    if preset.startswith("hf:"):
        return _hf(preset, split)
    path = Path(preset).expanduser()
    if not path.is_file():
        raise CalibrationError(f"calibration text {preset!r} is neither 'builtin', hf:DATASET:SPLIT:COLUMN, nor a file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path} is not UTF-8 text: convert it first") from e
    paras = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not paras:
        raise CalibrationError(f"{path} is empty: give a text file with some paragraphs")
    return Text(f"file:{path.name}", tuple((f"{path.name}#{i}", p) for i, p in enumerate(paras)))


@functools.lru_cache(maxsize=1)  # importing the whole standard library takes seconds: once per process
def _stdlib_docs() -> list[tuple[str, str]]:
    script = Path(stdlib_docs.__file__)
    try:
        done = subprocess.run([sys.executable, "-I", "-S", str(script)], capture_output=True, text=True, timeout=600, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise CalibrationError(f"gathering the builtin calibration text from the standard library failed ({e}): give --calibration FILE") from e
    return [(q, d) for q, d in json.loads(done.stdout)]


@functools.lru_cache(maxsize=2)
def _builtin(split: Split) -> Text:
    out = [(q, d) for q, d in _stdlib_docs() if (int(hashlib.sha256(q.encode()).hexdigest()[:8], 16) % 100 < _EVAL_SHARE) == (split == "eval")]
    out.sort()
    return Text(f"builtin:{split}", tuple(out))


def _prose_files() -> list[Path]:
    licenses = Path("/usr/share/common-licenses")
    files = {f.resolve() for f in licenses.iterdir() if f.is_file()} if licenses.is_dir() else set()
    own = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    return sorted(files | ({own.resolve()} if own.is_file() else set()))


@functools.lru_cache(maxsize=2)
def _prose(split: Split) -> Text:
    families: dict[str, list[Path]] = {}
    for f in _prose_files():  # GPL-2 and GPL-3 are one family: they share whole paragraphs
        families.setdefault(re.split(r"[-.]\d", f.name, maxsplit=1)[0], []).append(f)
    texts = {fam: [(f, f.read_text(encoding="utf-8", errors="replace")) for f in fs] for fam, fs in families.items()}
    total = sum(len(t) for fs in texts.values() for _, t in fs)
    held, size = set(), 0
    for fam in sorted(texts, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        if size >= total * _EVAL_SHARE / 100:
            break
        held.add(fam)
        size += sum(len(t) for _, t in texts[fam])
    parts: dict[bool, list[tuple[str, str]]] = {True: [], False: []}
    for fam, fs in sorted(texts.items()):
        for f, raw in fs:
            paras = [" ".join(p.split()) for p in raw.split("\n\n") if p.strip()]
            parts[fam in held] += [(f"prose:{f.name}#{i}", chunk) for i, chunk in enumerate(_chunks(paras, " "))]
    return _split_text("prose", split, parts, "no prose on this machine (/usr/share/common-licenses and Python's LICENSE.txt are missing)")


def _chunks(parts: list[str], sep: str, size: int = _CHUNK) -> list[str]:
    """Consecutive parts joined into samples of at most ``size`` characters (a longer part stays whole)."""
    out, cur = [], ""
    for p in parts:
        if cur and len(cur) + len(sep) + len(p) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}{sep}{p}" if cur else p
    return out + ([cur] if cur else [])


@functools.lru_cache(maxsize=2)
def _code(split: Split) -> Text:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[bool, list[tuple[str, str]]] = {True: [], False: []}  # held out -> samples
    for name in stdlib_docs.modules():
        pkg = root / name
        for f in sorted(pkg.glob("*.py")) if pkg.is_dir() else [root / f"{name}.py"]:
            if not f.is_file():
                continue
            rel = f.relative_to(root).as_posix()
            held = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 100 < _EVAL_SHARE
            source = _without_docstrings(f.read_text(encoding="utf-8", errors="replace"))
            blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", source) if b.strip()]
            parts[held] += [(f"code:{rel}#{i}", chunk) for i, chunk in enumerate(_chunks(blocks, "\n\n"))]
    return _split_text("code", split, parts, f"this Python has no standard-library source under {root}")


def _split_text(preset: str, split: Split, parts: dict[bool, list[tuple[str, str]]], missing: str) -> Text:
    """The calibration or held-out samples; held-out ones that repeat a calibration sample word for word are dropped
    (the standard library copies some code between modules)."""
    seen = {body for _, body in parts[False]}
    out = parts[False] if split == "calibration" else [(t, b) for t, b in parts[True] if b not in seen]
    if not out:
        raise CalibrationError(f"{missing}: give a text file of your own instead")
    return Text(f"{preset}:{split}", tuple(out), plain=frozenset(t for t, _ in out))


def _without_docstrings(source: str) -> str:
    """``source`` with the lines of its docstrings removed: those are the ``builtin`` text, split by another rule."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # lib2to3-era fixtures and the like
        return ""
    drop: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                drop.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return "\n".join(line for i, line in enumerate(source.splitlines(), 1) if i not in drop)


@functools.lru_cache(maxsize=2)
def _mix(split: Split) -> Text:
    """Docstrings (half the rows, chat formatted for instruct models), prose and code (a quarter each, plain),
    each spread over its own text and interleaved, so a stage reading a prefix sees all three."""
    docs, prose, code = (_spread(p.samples, n) for p, n in ((_builtin(split), 2 * _MIX_ROWS), (_prose(split), _MIX_ROWS), (_code(split), _MIX_ROWS)))
    rows = [s for i in range(_MIX_ROWS) for s in (docs[2 * i], prose[i], docs[2 * i + 1], code[i])]
    return Text(f"mix:{split}", tuple(rows), plain=frozenset(t for t, _ in prose + code))


def _spread(samples: tuple[tuple[str, str], ...], n: int) -> list[tuple[str, str]]:
    """``n`` samples evenly spaced over ``samples`` (a shorter text repeats some)."""
    return [samples[i * len(samples) // n] for i in range(n)]


def _hf(preset: str, split: Split) -> Text:
    parts = preset[3:].split(":")
    if len(parts) not in (3, 4):
        raise CalibrationError(f"{preset!r}: write hf:DATASET[:CONFIG]:SPLIT:COLUMN, e.g. hf:wikitext:wikitext-2-raw-v1:test:text")
    dataset, config, hf_split, column = parts if len(parts) == 4 else (parts[0], None, parts[1], parts[2])
    try:
        import datasets
    except ImportError as e:
        raise MissingDependencyError("datasets", extra="datasets", purpose="Hugging Face datasets as text") from e
    try:
        ds = datasets.load_dataset(dataset, config, split=hf_split)
    except (ConnectionError, OSError) as e:
        raise OfflineError(f"cannot load dataset {dataset} ({e}): go online or use `calibration` builtin") from e
    if column not in ds.column_names:
        raise CalibrationError(f"dataset {dataset} has no column {column!r}; it has {', '.join(ds.column_names)}")
    rows = [(f"{dataset}#{i}", str(t).strip()) for i, t in enumerate(ds[column]) if str(t).strip()]
    held = [r for r in rows if (int(hashlib.sha256(r[0].encode()).hexdigest()[:8], 16) % 100 < _EVAL_SHARE) == (split == "eval")]
    return Text(f"{preset}:{split}", tuple(held))


def format_samples(text: Text, tokenizer, *, chat: bool) -> list[str]:
    """Samples as strings; with ``chat`` each is a user question and an assistant answer in the model's template."""
    if not (chat or text.chat) or not getattr(tokenizer, "chat_template", None):
        return [t for _, t in text.samples]
    return [body if topic in text.plain else tokenizer.apply_chat_template(chat_messages(topic, body), tokenize=False) for topic, body in text.samples]


def chat_messages(topic: str, body: str) -> list[dict[str, str]]:
    """A sample as a chat: a user turn asking about its topic, and the sample as the assistant's answer."""
    return [{"role": "user", "content": f"Explain {topic} in Python."}, {"role": "assistant", "content": body}]


def token_stream(text: Text, tokenizer, *, chat: bool, max_tokens: int | None = None) -> list[int]:
    """All samples tokenized and concatenated (no special tokens added beyond the template's)."""
    ids: list[int] = []
    for s in format_samples(text, tokenizer, chat=chat):
        ids.extend(tokenizer(s, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


def windows(ids: list[int], n: int, length: int, *, what: str = "calibration") -> list[list[int]]:
    """``n`` consecutive non-overlapping windows of ``length`` tokens; raises CalibrationError if too short."""
    need = n * length
    if len(ids) < need:
        raise CalibrationError(
            f"{what} text has {len(ids)} tokens but {n} windows of {length} need {need}: "
            "give a longer text file, fewer samples or shorter windows"
        )
    return [ids[i * length : (i + 1) * length] for i in range(n)]


SPAN = 64  # tokens per hashed span when checking eval windows against calibration text
_MULT = np.random.default_rng(20261127).integers(1, 2**63, size=SPAN, dtype=np.uint64) | np.uint64(1)


def span_hashes(ids) -> np.ndarray:
    """A 64-bit hash of every 64-token span (random linear hash mod 2**64)."""
    ids = np.asarray(ids)
    if len(ids) < SPAN:
        return np.zeros(0, dtype=np.uint64)
    spans = np.lib.stride_tricks.sliding_window_view(ids.astype(np.uint64), SPAN)
    with np.errstate(over="ignore"):
        return (spans * _MULT).sum(axis=1, dtype=np.uint64)


def disjoint_windows(ids: list[int], n: int, length: int, against: list[np.ndarray], *, what: str = "eval") -> tuple[list[list[int]], int]:
    """The first ``n`` windows of ``ids`` sharing no 64-token span with the ``against`` span hashes, and how many were skipped.

    Raises CalibrationError when too few clean windows remain.
    """
    out, skipped = [], 0
    for w in windows(ids, len(ids) // length, length, what=what):
        h = span_hashes(w)
        if any(np.isin(h, c).any() for c in against):
            skipped += 1
            continue
        out.append(w)
        if len(out) == n:
            return out, skipped
    raise CalibrationError(
        f"{what} text gives {len(out)} windows of {length} tokens free of calibration text ({skipped} overlapped), "
        f"{n} needed: give a longer {what} text that is disjoint from the calibration text, or fewer/shorter windows"
    )
