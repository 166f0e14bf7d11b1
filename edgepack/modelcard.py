"""The model card (README.md) of a bundle exported for the Hugging Face hub, rendered from its manifest.

Like the report, the card only renders: the numbers are the manifest's eval and bench results
(``report.rows``), provenance is the report's, plots are the report's files. The YAML front matter
follows the hub's model card metadata: ``license`` (when provenance knows it), ``base_model`` and
``base_model_relation``, ``library_name``, ``pipeline_tag`` and ``tags``. Values are written as
JSON strings, which YAML reads as the same strings, so no YAML library is needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from . import __version__, recipes
from .report import PARETO_NOTE, md_table, pareto_table, provenance, rows, variants_table

PLOTS = (("size_vs_kld.svg", "size against mean KLD"), ("speed.svg", "prefill and decode speed"))
# The hub's library for each format (its model pages filter by it); a mixed bundle takes the first present.
LIBRARY = (("gguf", "gguf"), ("gptq", "transformers"), ("onnx", "onnx"))
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def license_of(data: dict[str, Any], reference: Path | None, ggufs: list[Path]) -> str | None:
    """The license provenance records: the source model card's front matter, a GGUF's ``general.license``, the recipe's."""
    card = reference / "README.md" if reference else None
    if card and card.is_file():
        if m := re.search(r"^license:\s*['\"]?([\w.\-]+)", _front_matter(card.read_text(encoding="utf-8", errors="replace")), re.M):
            return m.group(1)
    from .gguf_header import gguf_metadata

    for path in ggufs:
        if lic := gguf_metadata(path, stop_at="tokenizer.ggml.tokens").get("general.license"):
            return str(lic)
    recipe = recipes.find(str(data.get("source", {}).get("ref")))
    return recipe.license if recipe else None


def base_model(data: dict[str, Any]) -> str | None:
    """The hub id the bundle was made from: its hub origin, else its recipe's hub id, else a ref that is one."""
    src = data.get("source", {})
    kind, _, where = str(src.get("origin") or "").partition(":")
    if kind == "hub" and _HUB_ID.match(where):
        return where
    ref = str(src.get("ref") or "")
    if recipe := recipes.find(ref):
        return recipe.hub_id
    ref = ref.split("@")[0]
    return ref if _HUB_ID.match(ref) and not Path(ref).exists() else None


def render(data: dict[str, Any], *, license: str | None, signature: dict[str, Any] | None, plots: list[str], repo_id: str | None) -> str:
    """README.md's text for a bundle's manifest ``data``; ``plots`` are the report files present beside it."""
    formats = [v["format"] for v in data.get("variants", [])]
    steps = {s.get("stage") for s in data.get("steps", [])}
    base = base_model(data)
    meta: dict[str, Any] = {}
    if license:
        meta["license"] = license
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "finetune" if steps & {"prune", "distill"} else "quantized"
    meta["library_name"] = next((lib for fmt, lib in LIBRARY if fmt in formats), "edgepack")
    meta["pipeline_tag"] = "text-generation"
    arch = data.get("source", {}).get("architecture")
    meta["tags"] = list(dict.fromkeys(["edgepack", *formats, *([arch] if arch else []), "quantized"]))
    front = ["---"]
    for key, value in meta.items():
        front += [f"{key}:"] + [f"- {json.dumps(v)}" for v in value] if isinstance(value, list) else [f"{key}: {json.dumps(value)}"]
    front.append("---")

    name = data.get("name")
    repo = repo_id or "ORG/NAME"
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{data.get('source', {}).get('ref')}`"
    table = rows(data)
    head, body = variants_table(table)
    files = {v["id"]: v["path"] for v in data.get("variants", [])}
    head.insert(1, "file")
    for row, r in zip(body, table):
        path = files.get(r["variant"].split("+kv-")[0])
        row.insert(1, f"[{Path(path).name}]({path})" if path else "")
    first = next((v for v in data.get("variants", []) if v["format"] == "gguf"), None)
    md = [*front, "", f"# {name}", "",
          f"{len(formats)} variant{'s' if len(formats) != 1 else ''} of {origin} ({', '.join(sorted(set(formats)))}), "
          f"converted, scored against the float model and benchmarked by edgepack {data.get('edgepack_version') or __version__}. "
          "This repository is an edgepack bundle: `edgepack.json` lists every file with its size and sha256.", "",
          "## Use", "", "```sh", f"hf download {repo} --local-dir {name}", "pip install edgepack", f"edgepack chat {name}", "```", ""]
    if first:
        md += [f"llama.cpp runs the GGUF files directly: `llama-cli -m {name}/{first['path']}`.", ""]
    md += ["## Variants", "", md_table(head, body), "",
           "KLD: mean KL divergence of next-token distributions from the float reference (lower is closer); PPL on the eval "
           "text; top-1: share of positions with the reference's likeliest token; speeds are medians on the bench machine.", ""]
    if (front := pareto_table(table))[1]:
        md += [PARETO_NOTE, "", md_table(*front), ""]
    for file, title in PLOTS:
        if file in plots:
            md += [f"![{title}](report/{file})", ""]
    if not any(r["kld"] is not None for r in table):
        md += ["No eval results: `edgepack eval` scores the variants before export.", ""]
    md += ["## Provenance", ""] + [f"- **{k}**: {v}" for k, v in provenance(data, signature)]
    if signature and signature.get("verified"):
        md += ["", f"Check the files with `edgepack verify {name}` after download (add `--trusted KEY.pub` to require this signer)."]
    md.append("")
    return "\n".join(md)


def _front_matter(text: str) -> str:
    if not text.startswith("---"):
        return ""
    end = text.find("\n---", 3)
    return text[3:end] if end > 0 else ""
