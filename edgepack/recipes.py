"""Recipes of known models, one TOML file each in ``models/`` (installed as ``edgepack.models``)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources

DEFAULT = "smollm2-135m"


@dataclass(frozen=True)
class Recipe:
    name: str
    display_name: str
    hub_id: str
    architecture: str
    variants: list[str]
    notes: str = ""
    license: str | None = None  # the hub's license id (apache-2.0, gemma): the model card of an exported bundle names it
    fallback_pypi: list[str] = field(default_factory=list)
    fallback_gguf: str | None = None


def _load(text: str) -> Recipe:
    d = tomllib.loads(text)
    fb = d.get("fallback", {})
    return Recipe(
        name=d["name"],
        display_name=d.get("display_name", d["name"]),
        hub_id=d["hub_id"],
        architecture=d["architecture"],
        variants=list(d.get("variants", [])),
        notes=d.get("notes", ""),
        license=d.get("license"),
        fallback_pypi=list(fb.get("pypi", [])),
        fallback_gguf=fb.get("gguf"),
    )


def all_recipes() -> dict[str, Recipe]:
    out = {}
    for entry in resources.files("edgepack.models").iterdir():
        if entry.name.endswith(".toml"):
            r = _load(entry.read_text())
            out[r.name] = r
    return out


def find(name: str) -> Recipe | None:
    return all_recipes().get(name)
