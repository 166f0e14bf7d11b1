"""Calibration and evaluation text, shared by every stage that needs data.

Presets:

``builtin``
    Gathered at run time from the docstrings of the Python standard library
    (English prose with some code), so edgepack ships no text it did not
    write and works offline. Each docstring falls, by a hash of its qualified
    name, into the calibration split (80 %) or the held-out eval split
    (20 %); the two never overlap.
a file path
    A UTF-8 text file of the user's; paragraphs (blank-line separated) are samples.
``hf:DATASET[:CONFIG]:SPLIT:COLUMN``
    A Hugging Face dataset, when online (``datasets`` must be installed).

Instruct models are calibrated on chat-formatted text: each sample becomes a
user turn asking about a topic and an assistant turn holding the text, in the
model's own chat template.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import CalibrationError, MissingDependencyError, OfflineError, UsageError
from ..options import option

Split = Literal["calibration", "eval"]
_EVAL_SHARE = 20  # percent of builtin docstrings held out for evaluation
_SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "pydoc_data", "ensurepip", "venv", "__")


@dataclass(frozen=True)
class Text:
    """A named list of samples with a content hash for provenance."""

    name: str
    samples: tuple[tuple[str, str], ...]  # (topic, text)

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
        help="Calibration text for the importance matrix, sensitivity, GPTQ and pruning: builtin (default), a UTF-8 text file, "
        "or hf:DATASET[:CONFIG]:SPLIT:COLUMN.",
    )  # fmt: skip


def check_preset(preset: str, option_name: str = "calibration") -> str:
    """``preset`` after checking its form (a dataset is only fetched when a stage needs it); raises UsageError."""
    if preset == "builtin" or preset.startswith("hf:") and len(preset.split(":")) in (4, 5):
        return preset
    if preset.startswith("hf:"):
        raise UsageError(f"`{option_name}` {preset!r}: write hf:DATASET[:CONFIG]:SPLIT:COLUMN, e.g. hf:wikitext:wikitext-2-raw-v1:test:text", option=option_name)
    if not Path(preset).expanduser().is_file():
        raise UsageError(f"`{option_name}` {preset!r}: no such file; give builtin, a UTF-8 text file or hf:DATASET[:CONFIG]:SPLIT:COLUMN", option=option_name)
    return preset


def load(preset: str = "builtin", split: Split = "calibration") -> Text:
    """Load a preset's samples; raises CalibrationError, OfflineError or MissingDependencyError."""
    if preset == "builtin":
        return _builtin(split)
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


def _stdlib_modules() -> list[str]:
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and not n.startswith(_SKIP))
    return names


@functools.lru_cache(maxsize=2)  # importing the whole standard library takes seconds: once per process
def _builtin(split: Split) -> Text:
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in _stdlib_modules():
            try:
                mod = importlib.import_module(modname)
            except Exception:  # noqa: BLE001 - platform-specific modules (winreg, ...) simply do not contribute
                continue
            for qual, obj in _documented(mod, modname):
                doc = inspect.getdoc(obj)
                if not doc or len(doc) < 200 or doc in seen:
                    continue
                seen.add(doc)
                bucket = int(hashlib.sha256(qual.encode()).hexdigest()[:8], 16) % 100
                if (bucket < _EVAL_SHARE) == (split == "eval"):
                    out.append((qual, doc))
    out.sort()
    return Text(f"builtin:{split}", tuple(out))


def _documented(mod, modname: str):
    yield modname, mod
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield f"{modname}.{name}", obj
            if inspect.isclass(obj):
                for mname, member in sorted(vars(obj).items()):
                    if not mname.startswith("_") and inspect.isfunction(member):
                        yield f"{modname}.{name}.{mname}", member


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
    if not chat or not getattr(tokenizer, "chat_template", None):
        return [t for _, t in text.samples]
    out = []
    for topic, body in text.samples:
        msgs = [
            {"role": "user", "content": f"Explain {topic} in Python."},
            {"role": "assistant", "content": body},
        ]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return out


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
