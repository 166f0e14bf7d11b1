"""``report``: render a bundle's manifest (variants, eval, bench, provenance) as Markdown and HTML.

Renderers only render: every number comes from ``edgepack.json`` as ``eval`` and
``bench`` wrote it, and the signature line from ``trust.status``. Output, rebuilt whole on each run::

    <bundle>/report/
        report.md          tables and provenance; links the two plots
        report.html        the same, self-contained (CSS and plots inline as SVG)
        size_vs_kld.svg    file size against mean KLD, the Pareto front marked
        speed.svg          prefill and decode tokens/s per variant and device
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from string import Template
from typing import Any

from . import library
from .bundle import Bundle
from .errors import MissingDependencyError
from .fsutil import atomic_dir
from .runtime import registry

REPORT_DIR = "report"
PARETO_NOTE = (
    "Which variants are worth their size: on a Pareto front no other variant is as small and as close to the reference "
    "(and, on the speed front, decodes as fast) while better on one of these; \"beaten by\" names one that is."
)
_DASH = "—"

# (header, key in a row, format)
COLUMNS = (
    ("variant", "variant", "{}"),
    ("format", "format", "{}"),
    ("size MB", "mb", "{:.1f}"),
    ("bits/weight", "bpw", "{:.2f}"),
    ("KLD mean", "kld", "{:.5f}"),
    ("KLD p99", "kld_p99", "{:.4f}"),
    ("PPL", "ppl", "{:.3f}"),
    ("top-1", "top1", "{:.1%}"),
    ("BLEU", "bleu", "{:.1f}"),
    ("ROUGE-L", "rouge_l", "{:.3f}"),
    ("prefill tok/s", "prefill", "{:.0f}"),
    ("decode tok/s", "decode", "{:.1f}"),
    ("TTFT s", "ttft", "{:.3f}"),
    ("peak MiB", "peak_mib", "{:.0f}"),
)


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant and per quantized KV cache eval measured of it: manifest entry, eval, first bench run (CPU preferred)."""
    evals = data.get("eval", {}).get("variants", {})
    runs = list(data.get("bench", {}).get("runs", {}).values())
    out = []
    for v in data.get("variants", []):
        # the variant, then what eval measured of it with a quantized KV cache (``<id>+kv-<type>``)
        for key in [v["id"], *sorted(k for k in evals if k.startswith(v["id"] + "+kv-"))]:
            out.append(_row(v, key, evals.get(key, {}), runs))
    return out


def _row(v: dict[str, Any], key: str, e: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's row: its eval under ``key``, and its first bench run (CPU first, then the eval's KV cache type, then plain decoding)."""
    kv = e.get("kv_type", "f16")
    mine = sorted((r for r in runs if r.get("variant") == v["id"]),
                  key=lambda r: (r.get("device") != "cpu", r.get("kv_type", "f16") != kv, r.get("draft") is not None,
                                 bool(r.get("batch_invariant"))))  # fmt: skip
    r = mine[0] if mine else {}
    gen = e.get("generation", {})
    peak = r.get("peak_device_bytes") or r.get("peak_rss_bytes")
    return {
        "variant": key,
        "format": v["format"],
        "backend": v["backend"],
        "mb": v["bytes"] / 1e6,
        "bpw": v.get("bits_per_weight"),
        "kld": e.get("kld", {}).get("mean"),
        "kld_p99": e.get("kld", {}).get("p99"),
        "ppl": e.get("ppl"),
        "top1": e.get("top1_agreement"),
        "bleu": gen.get("bleu"),
        "rouge_l": gen.get("rouge_l"),
        "prefill": _median(r, "prefill_tokens_per_s"),
        "decode": _median(r, "decode_tokens_per_s"),
        "ttft": _median(r, "ttft_s"),
        "peak_mib": peak / 2**20 if peak else None,
        "device": r.get("device"),
    }


def variants_table(table: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The header and the formatted cells of ``rows``' table (a dash where nothing was measured)."""
    return [c[0] for c in COLUMNS], [[_cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in table]


def _texts_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """KLD, top-1 and PPL of every variant on each eval text it was scored on (``eval --text``, several); no rows with one text."""
    evals = data.get("eval", {}).get("variants", {})
    body = [
        [key, name, f"{t['kld']['mean']:.5f}", f"{t['kld']['p99']:.4f}", f"{t['top1_agreement']:.1%}", f"{t['ppl']:.3f}"]
        for key, e in evals.items() for name, t in e.get("texts", {}).items()
    ]  # fmt: skip
    return ["variant", "eval text", "KLD", "KLD p99", "top-1", "PPL"], body


def _median(run: dict[str, Any], key: str) -> float | None:
    v = run.get(key)
    return v.get("median") if isinstance(v, dict) else v


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    return _DASH if v is None else fmt.format(v)


def beaten_by(points: dict[str, tuple[float, ...]]) -> dict[str, str | None]:
    """Each point's place on the Pareto front of ``points`` (smaller is better on every axis): None when no other point
    is at least as good on every axis and better on one, else the name of such a point, the best on the second axis.
    Equal points do not beat each other: both stay on the front."""
    verdicts: dict[str, str | None] = {}
    for name, p in points.items():
        better = [o for o, q in points.items() if q != p and all(a <= b for a, b in zip(q, p))]
        verdicts[name] = min(better, key=lambda o: (points[o][1:], points[o][0], o)) if better else None
    return verdicts


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points no other point beats on both size and KLD (smaller is better on both), by size."""
    verdicts = beaten_by({p[2]: (p[0], p[1]) for p in points})
    return sorted((p for p in points if verdicts[p[2]] is None), key=lambda p: (p[0], p[1], p[2]))


def pareto_table(table: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Every scored variant by size, on the size/KLD front and on the size/KLD/decode-speed front, or named with a
    variant that beats it there (a dash on the speed front for a variant bench did not measure)."""
    scored = sorted((r for r in table if r["kld"] is not None), key=lambda r: (r["mb"], r["kld"], r["variant"]))
    two = beaten_by({r["variant"]: (r["mb"], r["kld"]) for r in scored})
    three = beaten_by({r["variant"]: (r["mb"], r["kld"], -r["decode"]) for r in scored if r["decode"] is not None})
    body = []
    for r in scored:
        v = r["variant"]
        speed = _DASH if v not in three else _verdict(three[v])
        body.append([v, f"{r['mb']:.1f}", f"{r['kld']:.5f}", _cell(r, "decode", "{:.1f}"), _verdict(two[v]), speed])
    return ["variant", "size MB", "KLD mean", "decode tok/s", "Pareto (size, KLD)", "Pareto (size, KLD, speed)"], body


def _verdict(by: str | None) -> str:
    return "front" if by is None else f"beaten by {by}"


# -- plots -----------------------------------------------------------------------------------


def _pyplot():
    """matplotlib's pyplot drawing off-screen; raises MissingDependencyError (charts come with the convert extra)."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingDependencyError("matplotlib", extra="convert", purpose="the report's charts") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _svg(fig) -> str:
    """The figure as SVG: no date and fixed element ids, so the same data always renders the same report."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "edgepack"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def size_vs_kld_svg(table: list[dict[str, Any]]) -> str | None:
    pts = [(r["mb"], r["kld"], r["variant"]) for r in table if r["kld"] is not None]
    if not pts:
        return None
    plt = _pyplot()

    front = pareto(pts)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.scatter([p[0] for p in pts], [max(p[1], 1e-6) for p in pts], color="#4c72b0", zorder=3, label="variant")
    ax.step([p[0] for p in front], [max(p[1], 1e-6) for p in front], where="post", color="#dd8452", zorder=2)
    ax.scatter([p[0] for p in front], [max(p[1], 1e-6) for p in front], s=140, facecolors="none", edgecolors="#dd8452",
               linewidths=1.5, zorder=4, label="Pareto front (nothing smaller is closer)")
    for x, y, name in pts:
        ax.annotate(name, (x, max(y, 1e-6)), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_yscale("log")
    ax.margins(x=0.1, y=0.2)  # room for the labels
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("mean KL divergence from reference (nats)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    svg = _svg(fig)
    plt.close(fig)
    return svg


def speed_svg(runs: list[dict[str, Any]]) -> str | None:
    runs = [r for r in runs if _median(r, "decode_tokens_per_s") is not None]
    if not runs:
        return None
    plt = _pyplot()

    labels = [f"{r['variant']} ({r['device']}{_mode(r)}{', draft ' + r['draft'] if r.get('draft') else ''})" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 0.5 * len(runs) + 1.5), sharey=True)
    for ax, key, title, colour in (
        (axes[0], "prefill_tokens_per_s", "prefill tokens/s", "#4c72b0"),
        (axes[1], "decode_tokens_per_s", "decode tokens/s", "#55a868"),
    ):
        med = [_median(r, key) for r in runs]
        lo = [m - r[key]["min"] for m, r in zip(med, runs)]
        hi = [r[key]["max"] - m for m, r in zip(med, runs)]
        ax.barh(labels, med, xerr=[lo, hi], color=colour, capsize=3)
        # One preempted or lucky run on a busy machine can be 100x off; the bars stay readable
        # and the table lists the full min-max range.
        ax.set_xlim(0, max(med) * 1.5 if max(m + h for m, h in zip(med, hi)) > max(med) * 1.5 else None)
        ax.set_title(title)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    svg = _svg(fig)
    plt.close(fig)
    return svg


# -- documents -------------------------------------------------------------------------------


def _runs_table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "device", "threads", "load s", "TTFT s", "prefill tok/s", "decode tok/s", "draft: kept, speed-up", "peak RSS MiB", "peak GPU MiB"]
    body = []
    for r in runs:
        body.append(
            [
                r["variant"],
                f"{r.get('device')}{_mode(r)}",
                str(r.get("threads") or _DASH),
                f"{r['load_s']:.2f}",
                f"{_median(r, 'ttft_s'):.3f}",
                f"{_median(r, 'prefill_tokens_per_s'):.0f} ({r['prefill_tokens_per_s']['min']:.0f}–{r['prefill_tokens_per_s']['max']:.0f})",
                f"{_median(r, 'decode_tokens_per_s'):.1f} ({r['decode_tokens_per_s']['min']:.1f}–{r['decode_tokens_per_s']['max']:.1f})",
                drafting(r),
                f"{r['peak_rss_bytes'] / 2**20:.0f}",
                f"{r['peak_device_bytes'] / 2**20:.0f}" if r.get("peak_device_bytes") else _DASH,
            ]
        )
    return head, body


def drafting(run: dict[str, Any]) -> str:
    """A drafted run's share of guesses kept and its decode speed-up over the same run without drafting."""
    if not run.get("draft"):
        return _DASH
    kept = _median(run, "draft_acceptance")
    speedup = run.get("draft_speedup")
    return f"{run['draft']}: " + (f"{kept:.0%}" if kept is not None else _DASH) + (f", {speedup:.2f}x" if speedup else "")


def _mode(run: dict[str, Any]) -> str:
    """What a run changed from the defaults (a KV cache type other than f16, batch-invariant decoding), as a label suffix."""
    kv = run.get("kv_type", "f16")
    return ("" if kv == "f16" else f", KV {kv}") + (", batch-invariant" if run.get("batch_invariant") else "")


def provenance(data: dict[str, Any], signature: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, text) lines of where the bundle came from: source, signature, calibration, eval text, machine, steps."""
    src = data.get("source", {})
    items = [
        ("model", f"{data.get('name')} ({src.get('architecture')})"),
        ("source", f"{src.get('ref')} from {src.get('origin')}, revision {src.get('revision') or 'none recorded'}"),
        ("created", f"{data.get('created')} by edgepack {data.get('edgepack_version')}"),
        ("signature", _signature(signature)),
    ]
    for c in data.get("calibration", []):
        items.append(("calibration", f"{c.get('name')}: {c.get('tokens')} tokens, sha256 {str(c.get('sha256'))[:16]}…"))
    ref = data.get("eval", {}).get("reference")
    if ref:
        t = ref.get("text", {})
        items.append(
            (
                "eval text",
                f"{t.get('name')} (sha256 {str(t.get('sha256'))[:16]}…): {ref.get('windows')} windows of {ref.get('window_len')} tokens, "
                f"reference top-{ref.get('top_k')}, reference PPL {ref.get('ppl', 0):.3f}",
            )
        )
    m = data.get("bench", {}).get("machine")
    if m:
        items.append(("bench machine", f"{m.get('cpu')}, {m.get('cores_physical')} cores, {m.get('ram_bytes', 0) / 2**30:.0f} GiB RAM, {m.get('os')}"))
    for s in data.get("steps", []):
        params = json.dumps(s.get("params", {}), sort_keys=True)
        reused = f" (reused from the stage cache, entry {s.get('key')})" if s.get("cached") else ""
        items.append(("step", f"{s.get('stage')} v{s.get('version')} {params} in {s.get('wall_s')} s{reused}"))
    return items


def _signature(status: dict[str, Any] | None) -> str:
    if status is None:
        return "not signed (`edgepack sign` signs it)"
    who = f"{status['signer']} (key {status['key_id']})" if status.get("signer") else f"key {status.get('key_id') or 'unreadable'}"
    if status["verified"]:
        return f"signed by {who}; verified: the manifest and every file are what was signed"
    return f"signed by {who}; verification FAILED: {status['problem']}"


def md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


_HTML = Template(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgepack report: $name</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; font-size: 0.9em; }
dt { font-weight: bold; } dd { margin: 0; font-family: ui-monospace, monospace; }
.note { color: #666; }
</style></head><body>
<h1>edgepack report: $name</h1>
<h2>Variants</h2>
$table
<p class="note">KLD: mean KL divergence of next-token distributions from the float reference (top-k buckets, a lower bound);
PPL on the eval text; top-1: same likeliest token as the reference; BLEU/ROUGE-L: greedy answers against the reference's.</p>
$texts
<h2>Size against quality</h2>
$size_plot
$pareto
<h2>Speed</h2>
$runs
$speed_plot
<h2>Provenance</h2>
<dl>$provenance</dl>
</body></html>
"""
)


def render(data: dict[str, Any], signature: dict[str, Any] | None = None) -> dict[str, str]:
    """Every report file's text, from a manifest's data and its signature's status (``trust.status``; None: unsigned)."""
    table = rows(data)
    head, body = variants_table(table)
    front = pareto_table(table)
    runs = list(data.get("bench", {}).get("runs", {}).values())
    rhead, rbody = _runs_table(runs)
    kld_svg, spd_svg = size_vs_kld_svg(table), speed_svg(runs)
    prov = provenance(data, signature)
    no_eval = "<p class='note'>No eval results yet: run <code>edgepack eval</code>.</p>"
    bench_note = _no_bench(data)
    thead, tbody = _texts_table(data)
    per_text = "Each eval text on its own (the table above covers them together):"
    no_bench = f"<p class='note'>{html.escape(bench_note)}</p>"
    files = {
        "report.html": _HTML.substitute(
            name=html.escape(str(data.get("name"))),
            table=_html_table(head, body),
            texts=f"<p class='note'>{per_text}</p>{_html_table(thead, tbody)}" if tbody else "",
            size_plot=f"<figure>{kld_svg}</figure>" if kld_svg else no_eval,
            pareto=f"<p class='note'>{PARETO_NOTE}</p>{_html_table(*front)}" if front[1] else "",
            runs=_html_table(rhead, rbody) if runs else no_bench,
            speed_plot=f"<figure>{spd_svg}</figure>" if spd_svg else "",
            provenance="".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in prov),
        )
    }
    md = [f"# edgepack report: {data.get('name')}", "", "## Variants", "", md_table(head, body), ""]
    md += [per_text, "", md_table(thead, tbody), ""] if tbody else []
    md += ["## Size against quality", "", "![size vs KLD](size_vs_kld.svg)" if kld_svg else "No eval results yet: run `edgepack eval`.", ""]
    md += [PARETO_NOTE, "", md_table(*front), ""] if front[1] else []
    md += ["## Speed", "", md_table(rhead, rbody) if runs else bench_note, ""]
    md += ["![speed](speed.svg)", ""] if spd_svg else []
    md += ["## Provenance", ""] + [f"- **{k}**: {v}" for k, v in prov] + [""]
    files["report.md"] = "\n".join(md)
    if kld_svg:
        files["size_vs_kld.svg"] = kld_svg
    if spd_svg:
        files["speed.svg"] = spd_svg
    return files


def _no_bench(data: dict[str, Any]) -> str:
    """What to do about a missing speed table: run bench, or, when no registered backend runs any variant, say why."""
    variants = data.get("variants", [])
    if any(registry.for_format(v["format"]) for v in variants) or not variants:
        return "No bench results yet: run `edgepack bench`."
    return unbenchable(variants)


def unbenchable(variants: list[dict[str, Any]]) -> str:
    """Why a bundle whose variants no registered backend runs has no speed figures, and what gives it some."""
    ids = ", ".join(f"{v['id']} ({v['backend']})" for v in variants)
    formats = ", ".join(f for b in registry.backends() for f in b.formats)
    return (
        f"No speed figures: bench measures the variants edgepack's runtime backends load ({formats}), and this bundle has only {ids}. "
        "Convert a GGUF or ONNX variant too (e.g. --to gguf:Q4_K_M) to measure speed."
    )


def report(bundle: Bundle | str | Path) -> Path:
    """Write ``report/`` into the bundle (replacing any earlier one) and return the HTML's path.

    A signed bundle is verified first (every file hashed) and the report says by whom and whether it passed.
    Raises BundleError for a bad bundle.
    """
    from .trust import status

    b = bundle if isinstance(bundle, Bundle) else library.open_bundle(bundle)
    files = render(b.data, status(b.root))
    with atomic_dir(b.root / REPORT_DIR) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return b.root / REPORT_DIR / "report.html"
