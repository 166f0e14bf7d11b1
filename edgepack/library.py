"""Bundles by name: what ``convert`` leaves in ``$EDGEPACK_HOME/bundles/<name>/``.

Users of Ollama and LM Studio type names, not paths, so every command that takes a model
takes a bundle name too (``locate``). A path that exists here wins over a bundle of the same
name, and the error says so when that path does not load (``shadowed``). Removing a bundle
(``remove``) is refused while a session holds it: ``runtime.load`` keeps a shared lock on the
manifest of a bundle it loaded (``hold``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import IO, Any

from . import constants
from .bundle import MANIFEST, Bundle
from .errors import BundleError, EdgepackError, SourceNotFoundError

try:  # advisory locks exist on POSIX; elsewhere the OS itself refuses to delete open files
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def locate(ref: str | os.PathLike, what: str = "a bundle folder") -> Path:
    """The path ``ref`` names: itself when it exists, else the bundle of that name.

    Raises SourceNotFoundError saying what to do: the ``convert`` command for a recipe that
    has not been converted, the bundles there are for any other name (``what`` lists the
    other things the caller takes).
    """
    p = resolve(ref)
    if p.exists():
        return p
    raise SourceNotFoundError(missing(str(ref), what))


def resolve(ref: str | os.PathLike) -> Path:
    """``locate`` without the error: the path itself when it names nothing (its loader says why)."""
    p = Path(ref).expanduser()
    return p if p.exists() else _named(str(ref)) or p


def open_bundle(ref: str | os.PathLike) -> Bundle:
    """``Bundle.open`` of a bundle folder or name; raises what ``locate`` and ``Bundle.open`` raise."""
    return Bundle.open(locate(ref))


def missing(ref: str, what: str | None) -> str:
    """Why ``ref`` names nothing, and what to give instead (``what``: the other things the caller takes)."""
    from . import recipes  # parsing the recipes costs a load a few ms, and only a miss needs them

    if recipes.find(ref) is not None:
        return f"{ref!r} has not been converted yet: run `edgepack convert {ref}` first (it makes the bundle {ref})"
    names = [b.name for b in _bundle_dirs()]
    here = f"bundles here: {', '.join(names)}" if names else "no bundles yet; `edgepack convert` makes them"
    if what is None:
        return f"no bundle named {ref!r} in {constants.bundles_dir()} ({here})"
    return f"no model at {ref!r}: give a bundle name ({here}), {what}"


def shadowed(p: Path) -> Path | None:
    """The bundle named like the local path ``p`` that ``locate`` preferred, if there is one."""
    if p.is_absolute() or len(p.parts) != 1:
        return None
    return _named(str(p))


def _named(name: str) -> Path | None:
    if not name or os.sep in name or name in (".", ".."):
        return None
    root = constants.bundles_dir() / name
    return root if (root / MANIFEST).is_file() else None


def _bundle_dirs() -> list[Path]:
    root = constants.bundles_dir()
    return sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []


def bundles() -> list[dict[str, Any]]:
    """Each bundle in the home: name, path, bytes, and per variant its size, KLD and decode speed (when measured;
    a variant eval also measured with a quantized KV cache is listed again as ``<id>+kv-<type>``).

    A bundle whose manifest does not open is listed with its error rather than hidden.
    """
    from .report import rows

    out = []
    for root in _bundle_dirs():
        try:
            bundle = Bundle.open(root)
        except EdgepackError as e:
            out.append({"name": root.name, "path": str(root), "error": str(e)})
            continue
        variants = [
            {"id": r["variant"], "format": r["format"], "bytes": round(r["mb"] * 1e6), "kld": r["kld"], "decode_tokens_per_s": r["decode"]}
            for r in rows(bundle.data)
        ]
        out.append({"name": root.name, "path": str(root), "bytes": sum(v.bytes for v in bundle.variants), "variants": variants})
    return out


def hold(bundle_root: Path) -> IO[bytes] | None:
    """A shared lock on the bundle's manifest for as long as the returned file stays open."""
    if fcntl is None:
        return None
    f = open(bundle_root / MANIFEST, "rb")  # noqa: SIM115 - the caller keeps it open for the session's life
    fcntl.flock(f, fcntl.LOCK_SH)
    return f


def remove(name: str, *, cache: bool = False) -> dict[str, Any]:
    """Delete the bundle ``name`` from the home; with ``cache``, also the stage-cache entries no other bundle there lists.

    Raises SourceNotFoundError for an unknown name and BundleError while a session has it loaded.
    Cache entries are outputs ``convert`` can make again, so one that a bundle elsewhere (``--out``)
    also came from costs only time.
    """
    root = _named(name)
    if root is None:
        raise SourceNotFoundError(missing(name, None))
    keys = _keys(root) if cache else set()
    with open(root / MANIFEST, "rb") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BundleError(f"bundle {name} is loaded by a running edgepack (serve, chat or an app): stop it, then remove the bundle") from None
        freed = _bytes(root)
        shutil.rmtree(root)
    entries = []
    if cache:
        for other in _bundle_dirs():
            keys -= _keys(other)
        for key in sorted(keys):
            entry = constants.stages_dir() / key
            if entry.is_dir():
                freed += _bytes(entry)
                shutil.rmtree(entry)
                entries.append(key)
    return {"name": name, "path": str(root), "cache_entries": entries, "bytes": freed}


def _keys(root: Path) -> set[str]:
    try:
        steps = Bundle.open(root).data.get("steps", [])
    except EdgepackError:
        return set()
    return {s["key"] for s in steps if s.get("key")}


def _bytes(root: Path) -> int:
    """Bytes the files under ``root`` free: a file hard-linked elsewhere (a variant and its cache entry) counts once, at its last link."""
    total = 0
    for p in root.rglob("*"):
        st = p.lstat()
        if p.is_file() and not p.is_symlink() and st.st_nlink == 1:
            total += st.st_size
    return total
