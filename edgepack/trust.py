"""Signed bundles: who made a bundle, and proof that its files are the ones its maker measured.

The manifest already holds every variant file's (and the reference's) size and sha256, so one Ed25519
signature over the manifest covers the whole bundle: ``verify`` checks the signature, then hashes each
listed file once and compares. The signed bytes are the manifest in canonical form (keys sorted, no
whitespace, UTF-8) without its ``bench`` slot, which holds speed measured on whatever machine ran
``edgepack bench`` last, not a claim of the maker; the signer's name is signed with it. The crypto is
the ``cryptography`` library's.

Files::

    <bundle>/edgepack.sig   {"algorithm": "ed25519", "signer": NAME, "public_key": BASE64, "signature": BASE64}
    KEY                     the private key, PKCS#8 PEM, readable by its owner only (``openssl genpkey
                            -algorithm ed25519`` makes the same kind)
    KEY.pub                 one line: ``ed25519 BASE64 NAME``; a trusted-keys file holds such lines,
                            one per key (blank lines and ``#`` comments are skipped)

What the signature does not cover: ``calibration/``, ``eval/`` and ``report/`` (nothing loads a model from
them), and the bench figures. Running ``edgepack eval`` after signing changes the manifest: sign again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import DRAFTS, MANIFEST, REFERENCE, VARIANTS, Bundle
from .errors import BundleError, KeyFileError, SignatureError, UsageError
from .fsutil import sha256_file, write_json
from .library import locate

SIGNATURE = "edgepack.sig"
_UNSIGNED = ("bench",)  # manifest slots left out of the signed bytes
_DOMAIN = b"edgepack bundle signature v1\n"  # a signature over a bundle can never pass for one over anything else


@dataclass(frozen=True)
class PublicKey:
    raw: bytes  # the 32-byte Ed25519 public key
    name: str = ""

    @property
    def key_id(self) -> str:
        """Short fingerprint shown to users: the first 16 hex digits of the key's sha256."""
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def line(self) -> str:
        return f"ed25519 {base64.b64encode(self.raw).decode()} {self.name}".rstrip()

    def who(self) -> str:
        return f"{self.name} (key {self.key_id})" if self.name else f"key {self.key_id}"


@dataclass(frozen=True)
class Verified:
    """A bundle that passed: who signed it, and how much was hashed to prove it."""

    signer: PublicKey
    files: int
    bytes: int


# -- keys ------------------------------------------------------------------------------------


def keygen(path: str | Path, name: str = "") -> PublicKey:
    """Write a new private key to ``path`` (owner-only) and its public line to ``path.pub``; return the public key.

    Raises UsageError when either file exists (a key is never overwritten) or ``name`` spans lines.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path).expanduser()
    pub = _pub_path(path)
    if "\n" in name or "\r" in name:
        raise UsageError("a key's name is one line: drop the line break", option="name")
    for p in (path, pub):
        if p.exists():
            raise UsageError(f"{p} exists and keygen never overwrites a key: choose another file name")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even for a moment
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = PublicKey(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw), name.strip())
    pub.write_text(public.line() + "\n")
    return public


def read_private_key(path: str | Path) -> tuple[Any, PublicKey]:
    """The Ed25519 private key in ``path`` and its public key, named by ``path.pub`` when that file holds it.

    Raises KeyFileError for a missing file, a public key, a malformed or passphrase-protected key, or another algorithm.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path).expanduser()
    if not path.is_file():
        raise KeyFileError(f"no key file at {path}: make one with `edgepack keygen {path}`")
    data = path.read_bytes()
    if data.lstrip().startswith(b"ed25519 "):
        raise KeyFileError(f"{path} is a public key: sign with the private key (the file keygen wrote without .pub)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise KeyFileError(f"{path} is protected by a passphrase: give an unencrypted PKCS#8 Ed25519 key") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path} is not a PEM private key: make a signing key with `edgepack keygen`") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is a {type(key).__name__.removeprefix('_')} key; edgepack signs with Ed25519: make one with `edgepack keygen`")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    name = ""
    if _pub_path(path).is_file():
        known = [k for k in read_public_keys(_pub_path(path)) if k.raw == raw]
        name = known[0].name if known else ""
    return key, PublicKey(raw, name)


def read_public_keys(sources: str | Path | Iterable[str | Path]) -> list[PublicKey]:
    """The public keys in each source: a file of ``ed25519 BASE64 NAME`` lines, or such a line itself.

    Raises KeyFileError for a missing file, a malformed line (named by file and line number), or no key at all.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    keys: list[PublicKey] = []
    for src in sources:
        if isinstance(src, str) and src.startswith("ed25519 "):
            keys.append(_parse_public(src, "the key given"))
            continue
        path = Path(src).expanduser()
        if not path.is_file():
            raise KeyFileError(f"no trusted-keys file at {path}: give the .pub file of each key you trust")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise KeyFileError(f"{path} is not a text file of public keys: give a .pub file `edgepack keygen` wrote") from e
        for n, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                keys.append(_parse_public(line.strip(), f"{path}, line {n}"))
    if not keys:
        raise KeyFileError("no trusted key given: pass the .pub file of each key you trust")
    return keys


def _parse_public(line: str, where: str) -> PublicKey:
    parts = line.split(maxsplit=2)
    try:
        if parts[0] != "ed25519":
            raise ValueError(parts[0])
        raw = base64.b64decode(parts[1], validate=True)
        if len(raw) != 32:
            raise ValueError(len(raw))
    except (IndexError, ValueError, binascii.Error) as e:
        hint = " (that is a private key: trust its .pub file)" if "PRIVATE KEY" in line else ""
        raise KeyFileError(f"{where} is not an Ed25519 public key{hint}: expected `ed25519 BASE64 NAME` as keygen writes") from e
    return PublicKey(raw, parts[2].strip() if len(parts) > 2 else "")


def _pub_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


# -- sign and verify -------------------------------------------------------------------------


def sign(bundle: str | Path, key: str | Path) -> PublicKey:
    """Sign ``bundle`` (a folder or a bundle's name) with the private key file ``key``, writing ``edgepack.sig``; return the signer.

    Every listed file is hashed first: a bundle whose files no longer match its manifest is refused.
    Raises KeyFileError, BundleError (bad manifest, a path leaving the bundle, a file that does not match).
    """
    private, public = read_private_key(key)
    root = locate(bundle)
    data = _manifest(root)
    if problem := _first_difference(root, data)[0]:
        raise BundleError(f"{problem[0]} does not match the manifest ({problem[1]}): re-run the conversion, then sign")
    signature = private.sign(_signed_bytes(data, public.name))
    record = {"algorithm": "ed25519", "signer": public.name, "public_key": base64.b64encode(public.raw).decode(),
              "signature": base64.b64encode(signature).decode()}
    write_json(root / SIGNATURE, record)
    return public


def verify(bundle: str | Path, trusted: str | Path | Iterable[str | Path] | None = None) -> Verified:
    """Check that ``bundle`` is exactly what its signer signed, and (given ``trusted`` keys) that one of them signed it.

    Order: the manifest's paths stay inside the bundle, the signer is trusted, the signature matches the
    manifest, then every listed file's size and sha256 (sizes first, each file hashed once), and no file
    under ``variants/`` or ``reference/`` is unlisted. Raises SignatureError naming the first file that
    differs, BundleError for a missing or malformed manifest or an escaping path, KeyFileError for bad keys.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    root = locate(bundle)
    keys = read_public_keys(trusted) if trusted is not None else None
    data = _manifest(root)
    signer, signature = _read_signature(root)
    signed = _signed_bytes(data, signer.name)
    if keys is not None and signer.raw not in {k.raw for k in keys}:
        raise SignatureError(f"{root} was signed by {signer.who()}, which is not among the trusted keys: "
                             "trust its .pub file only if you know it is its maker's")
    signer = next((k for k in keys or () if k.raw == signer.raw), signer)  # a trusted key is shown by the name its user gave it
    try:
        Ed25519PublicKey.from_public_bytes(signer.raw).verify(signature, signed)
    except InvalidSignature:
        raise SignatureError(f"{MANIFEST} differs from what {signer.who()} signed (or {SIGNATURE} was altered): "
                             "get the bundle again from its maker (or, if you made it, sign it again)", path=MANIFEST) from None
    problem, files, size = _first_difference(root, data)
    if problem:
        raise SignatureError(f"{problem[0]} differs from what {signer.who()} signed ({problem[1]}): get the bundle again from its maker", path=problem[0])
    return Verified(signer, files, size)


def status(bundle: str | Path) -> dict[str, Any] | None:
    """What the report shows: None for an unsigned bundle, else the signer and whether the bundle verifies."""
    root = Path(bundle)
    if not (root / SIGNATURE).exists():
        return None
    try:
        v = verify(root)
        return {"signer": v.signer.name, "key_id": v.signer.key_id, "verified": True, "problem": None}
    except (SignatureError, BundleError) as e:
        try:
            who = _read_signature(root)[0]
        except SignatureError:
            who = PublicKey(b"")
        return {"signer": who.name, "key_id": who.key_id if who.raw else None, "verified": False, "problem": str(e)}


def _manifest(root: Path) -> dict[str, Any]:
    """The manifest's data, every path in it checked to stay inside the bundle before any file is read."""
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{root} is not a bundle (no {MANIFEST}): give a bundle folder")
    try:
        data = json.loads((root / MANIFEST).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SignatureError(f"{MANIFEST} of {root} is not valid JSON ({e}): it was damaged; get the bundle again", path=MANIFEST) from e
    if not isinstance(data, dict):
        raise SignatureError(f"{MANIFEST} of {root} is not a manifest: get the bundle again", path=MANIFEST)
    b = Bundle(root, data)
    try:
        paths = [rel for rel, _, _ in listed(data)] + [v["path"] for v in data.get("variants", [])]
    except (KeyError, TypeError, AttributeError) as e:
        raise SignatureError(f"{MANIFEST} of {root} lacks a file's path, size or hash ({e!r}): get the bundle again", path=MANIFEST) from e
    for rel in paths:
        b.resolve(rel)  # raises BundleError for a path that leaves the bundle, before anything is read
    return data


def _read_signature(root: Path) -> tuple[PublicKey, bytes]:
    path = root / SIGNATURE
    if not path.is_file():
        raise SignatureError(f"{root} is not signed (no {SIGNATURE}): ask its maker for a signed bundle, "
                             "or load it without trusted keys if you trust where it came from")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec.get("algorithm") != "ed25519":
            raise ValueError(f"algorithm {rec.get('algorithm')!r}")
        raw = base64.b64decode(rec["public_key"], validate=True)
        sig = base64.b64decode(rec["signature"], validate=True)
        if len(raw) != 32 or len(sig) != 64:
            raise ValueError("wrong length")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, UnicodeDecodeError) as e:
        raise SignatureError(f"{SIGNATURE} of {root} is malformed ({e}): get the bundle again from its maker", path=SIGNATURE) from e
    return PublicKey(raw, str(rec.get("signer") or "")), sig


def _signed_bytes(data: dict[str, Any], signer: str) -> bytes:
    """What the signature covers: the signer's name and the manifest less its unsigned slots, canonical JSON."""
    manifest = {k: v for k, v in data.items() if k not in _UNSIGNED}
    return _DOMAIN + json.dumps({"signer": signer, "manifest": manifest}, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def listed(data: dict[str, Any]) -> Iterator[tuple[str, int, str]]:
    """(bundle-relative path, bytes, sha256) of every file the manifest vouches for: variants, drafts, then the reference."""
    for v in [*data.get("variants", []), *data.get("drafts", [])]:
        for f in v.get("files", []):
            yield f["path"], f["bytes"], f["sha256"]
    for f in data.get("source", {}).get("files", []):
        yield f"{REFERENCE}/{f['path']}", f["bytes"], f["sha256"]


def _first_difference(root: Path, data: dict[str, Any]) -> tuple[tuple[str, str] | None, int, int]:
    """(the first file that differs and how, or None; files hashed; bytes hashed). Sizes are compared before any hash."""
    has_reference = (root / REFERENCE).is_dir()
    present = [(rel, size, sha) for rel, size, sha in listed(data) if has_reference or not rel.startswith(f"{REFERENCE}/")]
    for rel, size, _ in present:
        p = root / rel
        if not p.is_file():
            return (rel, "missing"), 0, 0
        actual = p.stat().st_size
        if actual != size:
            how = f"truncated: {actual} of {size} bytes" if actual < size else f"{actual} bytes, not {size}"
            return (rel, how), 0, 0
    names = {rel for rel, _, _ in present}
    for folder in (VARIANTS, DRAFTS, REFERENCE):
        for p in sorted((root / folder).rglob("*")) if (root / folder).is_dir() else ():
            rel = p.relative_to(root).as_posix()
            if not p.is_dir() and rel not in names:
                return (rel, "a file the manifest does not list"), 0, 0
    total = 0
    for rel, size, sha in present:
        if sha256_file(root / rel) != sha:
            return (rel, "its sha256 differs"), 0, 0
        total += size
    return None, len(present), total
