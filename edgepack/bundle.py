"""The bundle: a folder holding a converted model's variants and ``edgepack.json``.

Layout::

    <bundle>/
        edgepack.json                 the manifest (schema below)
        variants/<variant-id>/...     one folder per variant (a .gguf, an ONNX folder, a GPTQ checkpoint)
        calibration/                  importance matrices and other calibration outputs
        eval/                         reference distributions and per-variant scores

Manifest, schema version 1 (all paths relative to the bundle, never escaping it)::

    {
      "schema": 1,
      "edgepack_version": "0.1.0",
      "name": "smollm2-135m",
      "created": "2026-11-27T10:00:00Z",
      "source": {"ref", "origin", "revision", "architecture", "reference_path", "files": [File]},
      "steps": [{"stage", "version", "params", "input_sha256", "output_sha256", "edgepack_version", "wall_s", "cached"}],
      "calibration": [{"name", "sha256", "tokens"}],
      "variants": [{"id", "format", "backend", "path", "files": [File], "bytes", "bits_per_weight", "meta"}],
      "eval": {...}, "bench": {...}
    }
    File = {"path", "bytes", "sha256"}
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BundleError
from .fsutil import sha256_file, write_json

SCHEMA = 1
MANIFEST = "edgepack.json"


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

    def add_step(self, step: dict[str, Any]) -> None:
        self.data["steps"].append(step)

    def add_calibration(self, record: dict[str, Any]) -> None:
        if record not in self.data["calibration"]:
            self.data["calibration"].append(record)

    def check(self, *, verify: bool = False) -> None:
        for v in self.data.get("variants", []):
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
