"""Ray's overhead on one machine: the same 4-variant convert with ``--executor local`` and on a one-node Ray cluster.

    flock /tmp/edgepack-cpu.lock .venv/bin/python benchmarks/ray_overhead.py [--model smollm2-135m] [--runs 3]
        [--to gguf:Q8_0,gguf:Q4_0,gguf:Q4_K_M,gguf:Q6_K] [--calibration-tokens 2048] [--node-cpus N] [--out FILE.json]

The model is pulled once; each run is ``edgepack convert FOLDER --no-report`` in a fresh EDGEPACK_HOME (nothing cached),
local and Ray alternating, ``--runs`` times each. The cluster (``ray start --head`` on loopback, ``tests/ray_cluster.py``)
is started before the runs and stopped after: what a run on it pays is connecting, the probe of the cache, starting
its workers and scheduling. With every core offered (the default) independent stages overlap and Ray can win; with
``--node-cpus 1`` they run one at a time, as local does, and the difference is Ray's own cost. Bar: the median Ray run takes at most
1.15 x the median local run. Prints one JSON object (and writes it with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ray_cluster import RayCluster  # noqa: E402

BAR = 1.15


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="recipe, folder or hub id (default: smollm2-135m)")
    ap.add_argument("--to", default="gguf:Q8_0,gguf:Q4_0,gguf:Q4_K_M,gguf:Q6_K")
    ap.add_argument("--calibration-tokens", default="2048", help="importance-matrix text for the K/0 types (default: 2048)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each executor (default: 3)")
    ap.add_argument("--node-cpus", type=int, default=os.cpu_count() or 1,
                    help="CPUs the Ray node offers (default: all cores, so independent stages overlap; 1 runs them one at a time, as local does, leaving only Ray's own cost)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    model = _pulled(args.model, work / "pulled")
    cluster = RayCluster(cpus=args.node_cpus)
    times: dict[str, list[float]] = {"local": [], "ray": []}
    try:
        for i in range(args.runs):
            for executor in ("local", "ray"):
                home = work / f"{executor}-{i}"
                env = {**os.environ, "EDGEPACK_HOME": str(home), "HF_HUB_OFFLINE": "1"}
                if executor == "ray":
                    env.update(cluster.env, RAY_ADDRESS=cluster.address)
                cmd = [sys.executable, "-m", "edgepack", "convert", str(model), "--to", args.to, "--calibration-tokens", args.calibration_tokens,
                       "--no-report", "-o", str(home / "bundle"), "--executor", executor]  # fmt: skip
                start = time.perf_counter()
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if r.returncode != 0:
                    raise SystemExit(f"{executor} run {i} failed: {r.stderr.strip()[-2000:]}")
                times[executor].append(round(wall, 2))
                shutil.rmtree(home)
                print(f"{executor} run {i}: {wall:.1f} s", file=sys.stderr)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    local, ray = statistics.median(times["local"]), statistics.median(times["ray"])
    result = {
        "model": args.model,
        "variants": args.to,
        "calibration_tokens": args.calibration_tokens,
        "runs": times,
        "median_s": {"local": local, "ray": ray},
        "ratio": round(ray / local, 3),
        "bar": BAR,
        "passed": ray / local <= BAR,
        "cores": os.cpu_count(),
        "node_cpus": args.node_cpus,
        "load_average": os.getloadavg()[0],
        "machine": platform.platform(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


def _pulled(ref: str, home: Path) -> Path:
    """The model's folder, pulled once into a home of its own so each run's fresh home still finds it."""
    if Path(ref).is_dir():
        return Path(ref).resolve()
    env = {**os.environ, "EDGEPACK_HOME": str(home)}
    code = "import sys; from edgepack.converters.pull import pull; print(pull(sys.argv[1]).path)"
    r = subprocess.run([sys.executable, "-c", code, ref], env=env, capture_output=True, text=True, check=True)
    return Path(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
