"""``bench``: load time, time to first token, prefill and decode speed, peak memory, per variant.

Each variant runs in its own process (``python -m edgepack.bench``), so its peak
RSS is its own and not what an earlier variant left behind. Every repetition
uses a different prompt window: llama.cpp would otherwise reuse the cached
prefix and report an impossibly fast prefill. Results go into the manifest's
"bench" slot, one run per (variant, device, threads)::

    "bench": {"machine": {...}, "runs": {"gguf-q4_k_m@cpu": {"load_s": ..., "prefill_tokens_per_s":
              {"median", "min", "max", "values"}, ..., "peak_rss_bytes": ..., "settings": {...}}}}
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, library
from .bundle import Bundle, Variant
from .errors import BackendError, BundleError, EdgepackError, UsageError
from .runtime import registry

if TYPE_CHECKING:
    from .executor import Cluster

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    prompt_tokens: int = 512  # prefill is measured on a prompt this long
    decode_tokens: int = 128  # tokens generated per repetition (greedy; fewer if the model ends)
    repetitions: int = 3  # measured runs; the report shows their median and range
    warmup: int = 1  # unmeasured runs first (page faults, kernel selection)
    threads: int | None = None  # CPU threads (default: the physical cores)
    device: str = "auto"  # auto | cpu | cuda | metal
    kv_type: str = "f16"  # KV cache element type (``edgepack.load``'s)
    draft: str | None = None  # "lookup" (from the prompt) or "model" (the bundle's draft model): ``edgepack.load``'s
    batch_invariant: bool = False  # ``edgepack.load``'s: the decoding ``serve --batch-invariant`` pays for (llama.cpp, f16 KV)

    def check(self) -> None:
        if self.prompt_tokens < 1 or self.decode_tokens < 2 or self.repetitions < 1 or self.warmup < 0:
            raise UsageError("bench needs prompt_tokens >= 1, decode_tokens >= 2, repetitions >= 1, warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be at least 1, got {self.threads}")
        if self.batch_invariant and self.kv_type != "f16":
            raise UsageError(f"batch_invariant needs an f16 KV cache, not {self.kv_type}: drop kv_type (--kv-type) or batch_invariant (--batch-invariant)")


def bench(
    bundle: Bundle | str | Path,
    cfg: BenchConfig | None = None,
    *,
    variants: list[str] | None = None,
    cluster: Cluster | None = None,
) -> dict[str, Any]:
    """Benchmark ``variants`` (default: every one a registered backend runs with what is installed); write the manifest's "bench" slot.

    With a ``cluster`` each variant is measured in its own task holding a whole node's CPUs (the smallest node's
    count), so two never share one; each run records the machine it ran on.

    Raises UsageError, BundleError, and BackendError when a variant's process fails.
    """
    cfg = cfg or BenchConfig()
    cfg.check()
    b = bundle if isinstance(bundle, Bundle) else library.open_bundle(bundle)
    chosen = [b.variant(v) for v in variants] if variants else [v for v in b.variants if registry.runs(v.format)]
    for v in chosen:
        if registry.for_format(v.format) is None:
            formats = ", ".join(f for x in registry.backends() for f in x.formats)
            raise UsageError(f"variant {v.id} is {v.format} (on {v.backend}), which edgepack's runtime does not load: bench a variant in {formats}")
    if cfg.batch_invariant:
        chosen = _batch_invariant(chosen, asked=bool(variants))
    if not chosen:
        raise BundleError(f"bundle {b.root} has no variant edgepack's runtime can run here: convert one with --to gguf:Q4_K_M")
    text = _prompt_text(cfg)
    here = machine()
    for v in chosen:
        log.info(f"bench {v.id}: {cfg.warmup} warm-up + {cfg.repetitions} runs of {cfg.prompt_tokens} + {cfg.decode_tokens} tokens")
    jobs = [({"bundle": str(b.root), "variant": v.id, "config": asdict(cfg), "text": text},) for v in chosen]
    if cluster:
        measured = cluster.map(_run_on_node, jobs, cpus=cfg.threads or cluster.node_cpus())
    else:
        measured = (_run_timed(*job) + (here,) for job in jobs)
    for v, (raw, wall_s, measured_on) in zip(chosen, measured):
        run = summarise(raw)
        if cluster:
            run["machine"] = measured_on
        run.update(variant=v.id, format=v.format, backend=v.backend, bytes=v.bytes, settings=asdict(cfg))
        run["wall_s"] = wall_s  # the whole measurement, process start included: what a scheduler plans with
        if cfg.draft:  # the speed-up is against the same variant, device and settings without drafting, measured now
            plain = summarise(_run_worker({"bundle": str(b.root), "variant": v.id, "config": {**asdict(cfg), "draft": None}, "text": text}))
            plain.update(variant=v.id, format=v.format, backend=v.backend, bytes=v.bytes, settings={**asdict(cfg), "draft": None})
            b.record_bench(plain, measured_on)
            run["draft_speedup"] = run["decode_tokens_per_s"]["median"] / plain["decode_tokens_per_s"]["median"]
        b.record_bench(run, measured_on)
        log.info(
            f"bench {v.id} on {run['device']} ({run['prompt_tokens']}-token prompt): prefill {run['prefill_tokens_per_s']['median']:.0f} tok/s, "
            f"decode {run['decode_tokens_per_s']['median']:.1f} tok/s, peak RSS {run['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
    b.save()
    return b.data["bench"]


def _batch_invariant(chosen: list[Variant], *, asked: bool) -> list[Variant]:
    """The variants whose backend decodes batch-invariantly: one asked for by id that cannot is refused, the others are left out (logged)."""
    keep = []
    for v in chosen:
        backend = registry.for_format(v.format)
        if backend is not None and backend.can_batch_invariant:
            keep.append(v)
        elif asked:
            raise UsageError(f"variant {v.id} runs on {v.backend}, which has no batch-invariant decoding: drop --batch-invariant, or bench a GGUF variant (--variant gguf-...)")
        else:
            log.info(f"bench: {v.id} left out: {v.backend} has no batch-invariant decoding")
    if not keep:
        raise UsageError("no variant of this bundle decodes batch-invariantly (llama.cpp's GGUF variants do): drop --batch-invariant, or convert one with --to gguf:Q4_K_M")
    return keep


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Median, min and max of each repeated measure; single measures pass through."""
    out = {k: v for k, v in raw.items() if k != "reps"}
    for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "completion_tokens", "draft_acceptance"):
        vals = [r[key] for r in raw["reps"] if key in r]
        if not vals:
            continue
        out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
    return out


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "edgepack": __version__,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _prompt_text(cfg: BenchConfig) -> str:
    """Plain prose for the prompts: the built-in eval text, enough for every repetition's window."""
    from .converters import calibration

    need_chars = (cfg.warmup + cfg.repetitions + 1) * cfg.prompt_tokens * 8  # generous: ~4 chars per token
    parts, n = [], 0
    for _, body in calibration.load("builtin", split="eval").samples:
        parts.append(body)
        n += len(body)
        if n >= need_chars:
            break
    return "\n\n".join(parts)


def _run_worker(job: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edgepack.bench"]
    proc = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BackendError(f"benchmarking {job['variant']} failed: {tail}; run with EDGEPACK_DEBUG=1 for details")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_timed(job: dict[str, Any]) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    raw = _run_worker(job)
    return raw, round(time.perf_counter() - start, 2)


def _run_on_node(job: dict[str, Any]) -> tuple[dict[str, Any], float, dict[str, Any]]:
    return *_run_timed(job), machine()


# -- the worker process ------------------------------------------------------------------------


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    from . import runtime

    cfg = BenchConfig(**job["config"])
    n_ctx = cfg.prompt_tokens + cfg.decode_tokens + 8
    rss_start = _rss()
    t0 = time.perf_counter()
    session = runtime.load(
        job["bundle"], variant=job["variant"], device=cfg.device, threads=cfg.threads, n_ctx=n_ctx, kv_type=cfg.kv_type, draft=cfg.draft,
        batch_invariant=cfg.batch_invariant,
    )
    load_s = time.perf_counter() - t0
    rss_loaded = _rss()
    gpu = _DeviceMemory() if session.info.device == "cuda" else None
    ids = session.tokenize(job["text"])
    count = cfg.warmup + cfg.repetitions
    # a model trained on a shorter context gets a shorter prompt (the run records what it used)
    prompt_tokens = min(cfg.prompt_tokens, session.n_ctx - cfg.decode_tokens - 1)
    if prompt_tokens < 1:
        raise UsageError(f"{cfg.decode_tokens} decode tokens leave no room for a prompt in a {session.n_ctx}-token context: lower `decode_tokens`", option="decode_tokens")
    if len(ids) < count * prompt_tokens:
        raise UsageError(f"the bench text gives {len(ids)} tokens, {count * prompt_tokens} needed: lower `prompt_tokens`", option="prompt_tokens")
    reps = []
    for i in range(count):
        prompt = ids[i * prompt_tokens : (i + 1) * prompt_tokens]
        c = session.generate(prompt, max_tokens=cfg.decode_tokens if i >= cfg.warmup else 8, temperature=0.0)
        if i >= cfg.warmup:
            reps.append(
                {
                    "ttft_s": c.ttft_s,
                    "prefill_tokens_per_s": c.prefill_tokens_per_s,
                    "decode_tokens_per_s": c.decode_tokens_per_s,
                    "completion_tokens": c.completion_tokens,
                }
            )
            if (drafted := session.draft_stats) and drafted["proposed"]:
                reps[-1]["draft_acceptance"] = drafted["accepted"] / drafted["proposed"]
    info = session.info
    session.close()
    return {
        "device": info.device,
        "threads": info.threads,
        "kv_type": info.kv_type,
        "draft": cfg.draft,
        "batch_invariant": info.batch_invariant,
        "n_ctx": info.n_ctx,
        "prompt_tokens": prompt_tokens,
        "load_s": load_s,
        "rss_start_bytes": rss_start,
        "rss_loaded_bytes": rss_loaded,
        "peak_rss_bytes": _peak_rss(),
        "peak_device_bytes": gpu.stop() if gpu else None,
        "reps": reps,
    }


def _peak_rss() -> int:
    """This process's peak RSS. On Linux from VmHWM: ru_maxrss carries the parent's peak across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _DeviceMemory:
    """Peak GPU memory of this process, polled from nvidia-smi (covers llama.cpp and onnxruntime alike).

    ``stop`` gives None, not 0, when nothing was read: no nvidia-smi, or it never listed this process.
    """

    def __init__(self) -> None:
        self.peak: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        pid = str(os.getpid())
        cmd = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
        while not self._done.wait(0.1):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.splitlines():
                p, _, mib = line.partition(",")
                if p.strip() == pid and mib.strip().isdigit():
                    self.peak = max(self.peak or 0, int(mib) * 2**20)

    def stop(self) -> int | None:
        self._done.set()
        self._thread.join()
        return self.peak


if __name__ == "__main__":
    try:
        print(json.dumps(_worker(json.loads(sys.stdin.read()))))
    except EdgepackError as e:  # one line for the parent's message
        print(e, file=sys.stderr)
        sys.exit(1)
