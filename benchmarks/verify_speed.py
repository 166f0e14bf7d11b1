"""How long `edgepack verify` takes against hashing the bundle's files once.

    nice .venv/bin/python benchmarks/verify_speed.py [--bundle DIR] [--mb 150] [--repeats 5]

Verification parses the manifest, checks one Ed25519 signature, compares sizes and hashes each listed
file once, so it should cost no more than the hashing: the bar (issue 20) is <= 1.2x. The baseline is
sha256 over the same files with the same reader (``fsutil.sha256_file``), nothing else. Both run with
the files in the page cache (one unmeasured round each first), alternating, and the medians are compared.

Without ``--bundle`` the bundle is made up: a GGUF-like file, an ONNX-like folder and a reference of
random bytes, ``--mb`` in all, placed by Bundle's own methods. With ``--bundle`` a real bundle is
hard-linked into a temporary folder (nothing in it changes) and signed there with a throwaway key.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgepack.bundle import Bundle
from edgepack.fsutil import sha256_file
from edgepack.stages import Artifact, Kind
from edgepack.trust import keygen, listed, sign, verify

BAR = 1.2


def made_up(root: Path, mb: int) -> Path:
    """A bundle of ``mb`` MB of random bytes: 70% one .gguf, 25% an ONNX folder, 5% the reference."""
    src = root / "src"
    (src / "onnx").mkdir(parents=True)
    (src / "ref").mkdir()
    total = mb * 1_000_000
    for path, share in ((src / "model-Q4_K_M.gguf", 0.70), (src / "onnx" / "model.onnx", 0.25), (src / "ref" / "model.safetensors", 0.05)):
        with open(path, "wb") as f:
            left = int(total * share)
            while left:
                chunk = os.urandom(min(left, 1 << 24))
                f.write(chunk)
                left -= len(chunk)
    (src / "onnx" / "genai_config.json").write_text('{"model": {}}')
    (src / "ref" / "config.json").write_text('{"model_type": "llama"}')
    files = [{"path": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted((src / "ref").iterdir())]
    b = Bundle.create(root / "bundle", "made-up", {"ref": "made-up", "origin": "local:made-up", "files": files})
    b.keep_reference(src / "ref")
    b.place_variant("gguf-q4_k_m", Artifact(Kind.GGUF, src / "model-Q4_K_M.gguf"), format="gguf", backend="llama.cpp", meta={}, bits_per_weight=None)
    b.place_variant("onnx-int4", Artifact(Kind.ONNX, src / "onnx"), format="onnx", backend="onnx", meta={}, bits_per_weight=None)
    b.save()
    return b.root


def linked(bundle: Path, root: Path) -> Path:
    """``bundle`` hard-linked file by file under ``root`` (no copy, and signing there leaves the original as it was)."""
    dest = root / bundle.name
    for p in sorted(bundle.rglob("*")):
        target = dest / p.relative_to(bundle)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:  # sign writes edgepack.sig by renaming a new file into place: the original's link is untouched
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, target)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="a real bundle to measure (default: a made-up one of --mb MB)")
    ap.add_argument("--mb", type=int, default=150, help="size of the made-up bundle in MB")
    ap.add_argument("--repeats", type=int, default=5, help="measured rounds of each")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="verify-speed-") as tmp:
        tmp = Path(tmp)
        root = linked(args.bundle, tmp) if args.bundle else made_up(tmp, args.mb)
        key = tmp / "bench.key"
        keygen(key, "benchmark")
        sign(root, key)
        trusted = Path(f"{key}.pub")
        data = json.loads((root / "edgepack.json").read_text())
        present = [root / rel for rel, _, _ in listed(data) if (root / rel).is_file()]
        size = sum(p.stat().st_size for p in present)

        def hash_once() -> None:
            for p in present:
                sha256_file(p)

        def verify_once() -> None:
            verify(root, trusted)

        timings: dict[str, list[float]] = {"hash": [], "verify": []}
        for round_ in range(args.repeats + 1):
            for name, fn in (("hash", hash_once), ("verify", verify_once)):
                start = time.perf_counter()
                fn()
                if round_:  # the first round only brings the files into the page cache
                    timings[name].append(time.perf_counter() - start)
    hash_s, verify_s = statistics.median(timings["hash"]), statistics.median(timings["verify"])
    ratio = verify_s / hash_s
    result = {"bundle": str(args.bundle) if args.bundle else f"made up, {args.mb} MB", "files": len(present), "bytes": size,
              "hash_s": round(hash_s, 4), "verify_s": round(verify_s, 4), "ratio": round(ratio, 3), "bar": BAR,
              "hash_s_all": [round(t, 4) for t in timings["hash"]], "verify_s_all": [round(t, 4) for t in timings["verify"]]}
    print(json.dumps(result, indent=2))
    print(f"verify {verify_s:.3f} s / hash {hash_s:.3f} s = {ratio:.2f}x (bar <= {BAR}x) for {size / 1e6:.0f} MB in {len(present)} files")
    return 0 if ratio <= BAR else 1


if __name__ == "__main__":
    sys.exit(main())
