"""The bundle: a folder holding a converted model's variants and ``edgepack.json``.

Layout, owned by the methods below (nothing else writes into a bundle's folders)::

    <bundle>/
        edgepack.json                 the manifest (schema below)
        variants/<variant-id>/...     one folder per variant (a .gguf, an ONNX folder, a GPTQ checkpoint)
        drafts/<draft-id>/...         draft models for speculative decoding (a .gguf), not variants of their own
        calibration/                  importance matrices and other calibration outputs
        reference/                    the float checkpoint eval compares with, hard-linked from the cache
        eval/                         reference distributions and per-variant scores

Files come in as hard links from the stage cache where the file system allows (no space, and they
outlive a cleaned cache), else as copies. The reference is only linked: where it cannot be, the
manifest keeps its file hashes and the reference it was pulled from, and eval pulls it again.
No path of the machine that made a bundle is written into it (a source folder is named by its
name, a side input by its sha256), so a bundle copied elsewhere, or whose cache was cleaned, still
evals, benches and reports. A rerun that changes nothing leaves the manifest byte for byte as it was:
each stage is recorded once, by its cache key, and ``created`` (the only timestamp) is kept.

Manifest, schema version 1 (all paths relative to the bundle, never escaping it)::

    {
      "schema": 1,
      "edgepack_version": "0.1.0",
      "name": "smollm2-135m",
      "created": "2026-11-27T10:00:00Z",
      "source": {"ref", "origin", "revision", "architecture", "files": [File]},   File paths relative to the checkpoint
      "steps": [{"stage", "version", "params", "input_sha256", "output_sha256", "edgepack_version", "wall_s", "cached", "key"}],
      "calibration": [{"name", "sha256", "tokens"}],
      "variants": [{"id", "format", "backend", "path", "files": [File], "bytes", "bits_per_weight", "meta"}],
      "drafts": [{"id", "format", "backend", "path", "files": [File], "bytes", "bits_per_weight", "meta", "targets": [variant id]}],
      "eval": {...}, "bench": {...}
    }
    File = {"path", "bytes", "sha256"}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import BundleError
from .fsutil import link_or_copy, sha256_file, write_json

if TYPE_CHECKING:  # the stage module is the converter's; a runtime that only opens bundles does not need it
    from .stages import Artifact

SCHEMA = 1
MANIFEST = "edgepack.json"
VARIANTS, DRAFTS, CALIBRATION, REFERENCE = "variants", "drafts", "calibration", "reference"


def source_record(ref: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest's "source" for ``ref`` as pulled (``meta`` of the pulled artifact): a local folder or .gguf file
    is named by its name, not by where it lay on this machine."""
    kind, _, where = str(meta.get("origin") or "").partition(":")
    origin = f"{kind}:{Path(where).name}" if kind in ("local", "gguf") else meta.get("origin")
    return {
        "ref": ref,
        "origin": origin,
        "revision": meta.get("revision"),
        "architecture": meta.get("architecture"),
        "files": meta.get("files", []),
    }


@dataclass
class Variant:
    id: str
    format: str  # gguf | gptq | onnx
    backend: str  # llama.cpp | onnx | transformers
    path: str  # relative to the bundle: the file or folder a backend loads
    files: list[dict[str, Any]]
    bits_per_weight: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "format": self.format,
            "backend": self.backend,
            "path": self.path,
            "files": self.files,
            "bytes": self.bytes,
            "bits_per_weight": self.bits_per_weight,
            "meta": self.meta,
        }


@dataclass
class Bundle:
    root: Path
    data: dict[str, Any]

    @classmethod
    def create(cls, root: Path, name: str, source: dict[str, Any]) -> Bundle:
        root.mkdir(parents=True, exist_ok=True)
        data = {
            "schema": SCHEMA,
            "edgepack_version": __version__,
            "name": name,
            "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": source,
            "steps": [],
            "calibration": [],
            "variants": [],
            "eval": {},
            "bench": {},
        }
        return cls(root, data)

    @classmethod
    def open(cls, root: str | Path, *, verify: bool = False) -> Bundle:
        """Open a bundle, checking every variant file's size (and sha256 with ``verify``).

        Raises BundleError when the manifest is missing or malformed, or a file
        is missing, has the wrong size or hash, or its path escapes the bundle.
        """
        root = Path(root)
        mf = root / MANIFEST
        if not mf.is_file():
            raise BundleError(f"{root} is not a bundle (no {MANIFEST}): convert a model first with `edgepack convert`")
        try:
            data = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{mf} is not valid JSON ({e}): re-run the conversion") from e
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise BundleError(
                f"{mf} has schema {data.get('schema') if isinstance(data, dict) else '?'}; this edgepack reads schema {SCHEMA}: "
                "re-run the conversion with this version"
            )
        bundle = cls(root, data)
        bundle.check(verify=verify)
        return bundle

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def variants(self) -> list[Variant]:
        out = []
        for v in self.data["variants"]:
            out.append(
                Variant(v["id"], v["format"], v["backend"], v["path"], v["files"], v.get("bits_per_weight"), v.get("meta", {}))
            )
        return out

    def variant(self, vid: str) -> Variant:
        for v in self.variants:
            if v.id == vid:
                return v
        known = ", ".join(v.id for v in self.variants) or "none"
        raise BundleError(f"bundle {self.root} has no variant {vid!r}; it has: {known}")

    def resolve(self, rel: str) -> Path:
        """Absolute path of a manifest path; refuses paths that leave the bundle."""
        p = (self.root / rel).resolve()
        root = self.root.resolve()
        if p != root and root not in p.parents:
            raise BundleError(f"manifest path {rel!r} escapes the bundle {self.root}: the manifest was tampered with")
        return p

    def file_record(self, path: Path) -> dict[str, Any]:
        return {"path": path.relative_to(self.root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}

    def add_variant(self, variant: Variant) -> None:
        self.data["variants"] = [v for v in self.data["variants"] if v["id"] != variant.id] + [variant.to_json()]

    def place_variant(
        self, vid: str, art: Artifact, *, format: str, backend: str, meta: dict[str, Any], bits_per_weight: float | None
    ) -> Variant:
        """Bring ``art`` (a file or a folder) into ``variants/<vid>/`` and record it, replacing a variant of that id."""
        variant = Variant(vid, format, backend, *self._bring(art, self.root / VARIANTS / vid), bits_per_weight, meta)
        self.add_variant(variant)
        return variant

    def place_draft(self, did: str, art: Artifact, *, targets: list[str], meta: dict[str, Any], bits_per_weight: float | None) -> Variant:
        """Bring a draft GGUF into ``drafts/<did>/`` and record it as the draft of the ``targets`` variants (replacing one of that id).

        Drafts are listed apart from the variants: nothing that picks, scores or exports a variant sees them.
        """
        draft = Variant(did, "gguf", "llama.cpp", *self._bring(art, self.root / DRAFTS / did), bits_per_weight, meta)
        self.data["drafts"] = [d for d in self.data.get("drafts", []) if d["id"] != did] + [{**draft.to_json(), "targets": targets}]
        return draft

    def _bring(self, art: Artifact, dest: Path) -> tuple[str, list[dict[str, Any]]]:
        """Link ``art``'s files into ``dest`` (emptied first): the loadable path, relative, and the file records."""
        if dest.exists():
            shutil.rmtree(dest)
        base = art.path.parent if art.path.is_file() else art.path
        for src in art.files():
            link_or_copy(src, dest / src.relative_to(base))
        loadable = dest / art.path.name if art.path.is_file() else dest
        return loadable.relative_to(self.root).as_posix(), [self.file_record(p) for p in sorted(x for x in dest.rglob("*") if x.is_file())]

    def draft_for(self, vid: str) -> Variant | None:
        """The draft model recorded for variant ``vid``, or None."""
        for d in self.data.get("drafts", []):
            if vid in d.get("targets", []):
                return Variant(d["id"], d["format"], d["backend"], d["path"], d["files"], d.get("bits_per_weight"), d.get("meta", {}))
        return None

    def keep(self, path: Path, folder: str = CALIBRATION) -> Path:
        """Bring a file (an importance matrix, a sensitivity table) into ``folder/`` of the bundle."""
        dest = self.root / folder / path.name
        link_or_copy(path, dest)
        return dest

    def keep_reference(self, model_dir: Path) -> None:
        """Link the float checkpoint eval compares with into ``reference/`` (skipped where links are not possible)."""
        dest = self.root / REFERENCE
        if dest.exists():
            shutil.rmtree(dest)
        try:
            for src in sorted(p for p in model_dir.iterdir() if p.is_file()):
                dest.mkdir(parents=True, exist_ok=True)
                os.link(src, dest / src.name)
        except OSError:  # another file system: the manifest's hashes and ref find it again
            shutil.rmtree(dest, ignore_errors=True)

    def reference(self) -> Path | None:
        """The float checkpoint eval compares with, if the bundle holds it (else eval pulls ``source.ref`` again)."""
        path = self.root / REFERENCE
        return path if (path / "config.json").is_file() else None

    def record_eval(self, vid: str, result: dict[str, Any]) -> None:
        """Store one variant's eval scores in the manifest (``eval/`` holds the full result)."""
        self.data.setdefault("eval", {}).setdefault("variants", {})[vid] = result

    def record_eval_reference(self, meta: dict[str, Any]) -> None:
        """Store what the variants were scored against: the eval text, windows and the reference's own perplexity."""
        self.data.setdefault("eval", {})["reference"] = meta

    def record_bench(self, run: dict[str, Any], machine: dict[str, Any]) -> None:
        """Store one bench run, keyed by variant, device, KV cache type (when not f16), draft and batch invariance, with the machine it ran on."""
        slot = self.data.setdefault("bench", {})
        slot["machine"] = machine
        kv, draft = run.get("kv_type", "f16"), run.get("draft")
        key = f"{run['variant']}@{run['device']}" + ("" if kv == "f16" else f"+kv-{kv}") + (f"+draft-{draft}" if draft else "")
        key += "+batch-invariant" if run.get("batch_invariant") else ""
        slot.setdefault("runs", {})[key] = run

    def add_step(self, step: dict[str, Any]) -> None:
        """Record a stage once: a rerun that reused its cached output leaves the first record as it was."""
        if not any(s.get("key") and s.get("key") == step.get("key") for s in self.data["steps"]):
            self.data["steps"].append(step)

    def add_calibration(self, record: dict[str, Any]) -> None:
        if record not in self.data["calibration"]:
            self.data["calibration"].append(record)

    def check(self, *, verify: bool = False) -> None:
        for v in [*self.data.get("variants", []), *self.data.get("drafts", [])]:
            self.resolve(v["path"])
            for f in v["files"]:
                p = self.resolve(f["path"])
                if not p.is_file():
                    raise BundleError(f"variant {v['id']}: {f['path']} is missing from {self.root}: re-run the conversion")
                if p.stat().st_size != f["bytes"]:
                    raise BundleError(
                        f"variant {v['id']}: {f['path']} has {p.stat().st_size} bytes, the manifest says {f['bytes']}: "
                        "the file is truncated or was replaced; re-run the conversion"
                    )
                if verify and sha256_file(p) != f["sha256"]:
                    raise BundleError(f"variant {v['id']}: {f['path']} does not match its sha256: re-run the conversion")

    def save(self) -> None:
        write_json(self.root / MANIFEST, self.data)
