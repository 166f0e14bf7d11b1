"""llama.cpp's own C++ tools (``llama-bench``, ``llama-perplexity``), built from the sources of the installed llama-cpp-python.

    .venv/bin/python benchmarks/llamacpp_tools.py [--cuda [--cuda-architectures 90]] [--cache DIR] [--sdist FILE]

    from llamacpp_tools import build      # from another script in benchmarks/
    tools = build()                       # the first call builds (minutes), later ones reuse
    subprocess.run([tools.bench, "-m", "model.gguf", "-p", "0", "-n", "128"])

The baseline a user gets by picking llama.cpp is its C++ tools at the same llama.cpp
commit that edgepack runs through llama-cpp-python, so they come from the same place:
the sdist of the installed version (``pip download --no-binary :all:``), whose
``vendor/llama.cpp`` is that commit. The CMake options are the ones that sdist's
CMakeLists.txt sets for pip's build (shared libraries, common on, curl off: a removed
option at this commit, a deprecation warning when given) and llama.cpp's defaults for
the rest, so ``GGML_NATIVE`` stays on as in pip's build; ``CMAKE_ARGS``, which pip's
build reads too, is added. Tools on; tests, examples, server and the unified app off;
only the two targets are built. ``--sdist`` builds from a given sdist instead (a machine
with no network, no llama-cpp-python installed: the GPU kit in ``benchmarks/gpu/``); the
shared libraries in ``build/bin`` are then the ones llama-cpp-python itself loads there.

Cache layout (``--cache``, else ``$EDGEPACK_BENCH_CACHE``, else ``~/.cache/edgepack-bench``;
never inside the edgepack checkout)::

    llama.cpp-0.3.36[-cuda]/
        llama_cpp_python-0.3.36.tar.gz   what pip downloaded
        src/                             it, extracted (renamed into place when complete)
        build/bin/llama-bench            the tools, and the shared libraries they load
        build/bin/llama-perplexity
        build.log                        cmake's output, for when it fails
        complete.json                    written last, with the flags: absent or different
                                         flags means build again
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_ENV = "EDGEPACK_BENCH_CACHE"
REPO = Path(__file__).resolve().parents[1]  # builds and downloads never land in the checkout
TARGETS = ("llama-bench", "llama-perplexity")
# What llama-cpp-python's CMakeLists.txt forces for pip's build, then what we do not need.
FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",  # the tools read local files; no TLS library needed
)


class ToolsError(RuntimeError):
    """The tools could not be built; the message is one line that says what to do."""


@dataclass(frozen=True)
class Tools:
    bench: Path
    perplexity: Path
    version: str  # llama-cpp-python's, whose vendored llama.cpp they were built from
    flags: tuple[str, ...]
    home: Path  # the cache folder of this build: src/ (the sdist), build/bin/ (tools and libllama.so)


def load_llama(path: str | Path, **kwargs: Any):
    """``llama_cpp.Llama`` on ``path``, loaded with the model parameters edgepack's runtime uses.

    ``runtime.llamacpp.model_params`` turns llama.cpp's AMX weight buffers off on CPUs where its AMX matmul crashes;
    ``Llama`` takes no such argument, so a Python baseline would crash there or run other kernels than edgepack.
    """
    from unittest import mock

    import llama_cpp

    from edgepack.runtime.llamacpp import model_params

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", lambda: model_params("cpu")):
        return llama_cpp.Llama(str(path), **kwargs)


def cache_root(cache: str | Path | None = None) -> Path:
    """The folder holding every build (argument, then $EDGEPACK_BENCH_CACHE, then ~/.cache/edgepack-bench)."""
    root = Path(cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgepack-bench").expanduser().resolve()
    if root.is_relative_to(REPO):
        raise ToolsError(f"{root} is inside the edgepack checkout {REPO}: choose a cache folder outside it ({CACHE_ENV} or --cache)")
    return root


def build(
    cache: str | Path | None = None,
    *,
    cuda: bool = False,
    cuda_architectures: str | None = None,
    sdist: Path | None = None,
    jobs: int | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> Tools:
    """Paths of llama-bench and llama-perplexity, built once per version and flags, then reused.

    ``cuda`` adds ``-DGGML_CUDA=on`` (and ``CMAKE_CUDA_ARCHITECTURES`` when given) in a
    separate ``-cuda`` folder. ``sdist`` (``llama_cpp_python-VERSION.tar.gz``) is built instead
    of the installed version's, which pip would download. Raises ToolsError when cmake, pip or
    the build fails.
    """
    version = _sdist_version(sdist) if sdist else _installed_version()
    tools = _planned(cache, version, _flags(cuda, cuda_architectures))
    if _complete(tools):
        return tools
    if shutil.which("cmake") is None:
        raise ToolsError("cmake is not on PATH: install CMake >= 3.21 (apt install cmake, or pip install cmake)")
    home, flags = tools.home, list(tools.flags)
    (home / "complete.json").unlink(missing_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    if sdist and not (home / sdist.name).is_file():
        shutil.copy2(sdist, home / sdist.name)
    src = _sources(home, version, log)
    log(f"building {', '.join(TARGETS)} from llama-cpp-python {version}'s llama.cpp in {home / 'build'} (minutes)")
    jobs = jobs or os.cpu_count() or 1
    configure = ["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(home / "build"), *flags]
    if shutil.which("ninja") and not (home / "build" / "CMakeCache.txt").is_file():
        configure.append("-GNinja")  # a build folder keeps the generator it was made with
    _run(configure, home / "build.log", "configuring llama.cpp")
    _run(["cmake", "--build", str(home / "build"), "--config", "Release", "-j", str(jobs), "--target", *TARGETS], home / "build.log", "building llama.cpp")
    for exe in (tools.bench, tools.perplexity):
        if not exe.is_file():
            raise ToolsError(f"the build finished without {exe}: see {home / 'build.log'}")
    (home / "complete.json").write_text(json.dumps({"version": version, "flags": flags, "targets": list(TARGETS)}, indent=2) + "\n")
    return tools


def cached(cache: str | Path | None = None, *, cuda: bool = False, cuda_architectures: str | None = None) -> Tools | None:
    """The tools ``build`` would return for the installed version, if they are already built; never builds."""
    try:
        tools = _planned(cache, _installed_version(), _flags(cuda, cuda_architectures))
    except ToolsError:
        return None
    return tools if _complete(tools) else None


def _installed_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError as e:
        raise ToolsError("llama-cpp-python is not installed: install edgepack's dependencies first") from e


def _sdist_version(sdist: Path) -> str:
    name = sdist.name.removesuffix(".tar.gz")
    if not sdist.is_file() or not name.startswith("llama_cpp_python-"):
        raise ToolsError(f"{sdist} is not a llama_cpp_python-VERSION.tar.gz sdist: pass the file pip downloaded")
    return name.removeprefix("llama_cpp_python-")


def _flags(cuda: bool, cuda_architectures: str | None) -> list[str]:
    flags = list(FLAGS)
    if cuda:
        flags.append("-DGGML_CUDA=ON")
        if cuda_architectures:
            flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures}")
    return flags + os.environ.get("CMAKE_ARGS", "").split()


def _planned(cache: str | Path | None, version: str, flags: list[str]) -> Tools:
    home = cache_root(cache) / f"llama.cpp-{version}{'-cuda' if '-DGGML_CUDA=ON' in flags else ''}"
    bins = home / "build" / "bin"
    return Tools(bins / TARGETS[0], bins / TARGETS[1], version, tuple(flags), home)


def _complete(tools: Tools) -> bool:
    marker = tools.home / "complete.json"
    return marker.is_file() and json.loads(marker.read_text()).get("flags") == list(tools.flags) and tools.bench.is_file() and tools.perplexity.is_file()


def _sources(home: Path, version: str, log: Callable[[str], None]) -> Path:
    """The extracted sdist, downloaded with pip (the ordinary client) on first use."""
    src = home / "src"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return src
    sdist = next(home.glob("llama_cpp_python-*.tar.gz"), None)
    if sdist is None:
        log(f"downloading the llama-cpp-python {version} sdist with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", str(home)]
        _run(cmd, home / "build.log", f"pip download of llama-cpp-python=={version}")
        sdist = next(home.glob("llama_cpp_python-*.tar.gz"), None)
        if sdist is None:
            raise ToolsError(f"pip downloaded no llama_cpp_python-*.tar.gz into {home}: see {home / 'build.log'}")
    tmp = Path(tempfile.mkdtemp(prefix="src.", dir=home))
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        (top,) = tmp.iterdir()  # an sdist holds one folder, name-version/
        shutil.rmtree(src, ignore_errors=True)
        top.rename(src)
    except (tarfile.TarError, ValueError, OSError) as e:
        raise ToolsError(f"could not extract {sdist} ({e}): delete it and run again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return src


def _run(cmd: list[str], logfile: Path, what: str) -> None:
    with open(logfile, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        lines = [x.strip() for x in logfile.read_text(errors="replace").splitlines() if x.strip()]
        last = next((x for x in reversed(lines) if "error" in x.lower()), lines[-1] if lines else "")
        raise ToolsError(f"{what} failed (exit {rc}): {last[:300]} (full output in {logfile})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, help=f"cache folder (default ${CACHE_ENV} or ~/.cache/edgepack-bench)")
    ap.add_argument("--cuda", action="store_true", help="build with -DGGML_CUDA=ON (into a separate -cuda folder)")
    ap.add_argument("--cuda-architectures", help="CMAKE_CUDA_ARCHITECTURES, e.g. 90 (default: llama.cpp's list)")
    ap.add_argument("--sdist", type=Path, help="build this llama_cpp_python-VERSION.tar.gz (default: the installed version's, downloaded)")
    ap.add_argument("--jobs", type=int, help="parallel compile jobs (default: every core)")
    args = ap.parse_args()
    try:
        tools = build(args.cache, cuda=args.cuda, cuda_architectures=args.cuda_architectures, sdist=args.sdist, jobs=args.jobs)
    except ToolsError as e:
        raise SystemExit(f"error: {e}") from None
    paths = {"llama-bench": str(tools.bench), "llama-perplexity": str(tools.perplexity)}
    print(json.dumps({**paths, "version": tools.version, "flags": list(tools.flags)}, indent=2))


if __name__ == "__main__":
    main()
