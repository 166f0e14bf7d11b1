"""The contract every converter stage follows, and the cache that makes reruns resume.

A stage takes a typed artifact (a path on disk), a config dataclass whose
fields document its parameters, and an output directory; it returns the
artifact it wrote. Stages exchange paths, never objects in memory, so each
one's output can be cached under a key of (input hash, stage, version,
config) and an interrupted ``convert`` resumes at the first stage whose key
has no finished output.

A config field that names a file or folder the stage reads besides its input
(an importance matrix, a calibration text file, a teacher checkpoint) is
declared with ``side_input()``: the key and the manifest then hold that file's
content hash, not its path, so editing the file in place misses the cache and
moving it does not.

Cache layout (under the edgepack home)::

    stages/<key>/            the output directory handed to Stage.run
    stages/<key>/.complete   JSON record written last: its presence means done
    stages/.<key>.partial-*/ a run in progress (``fsutil.atomic_dir``); its ``.writer`` names the process

A run killed before its rename leaves its partial folder behind. Every cache miss first removes the partial folders
that can no longer finish (``clean_partials``): those whose writer, on this host, is gone, and, whatever the host
(a shared cache on a cluster), those nothing was written into for ``STALE_AFTER_S``. A live writer's folder is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from . import __version__, constants
from .fsutil import atomic_dir, sha256_file, write_json

STALE_AFTER_S = 24 * 3600  # a partial folder of another host untouched this long belongs to a writer that died
WRITER = ".writer"  # in a partial folder: the host, pid and start time of the process filling it
COMPLETE = ".complete"  # in an entry: its record, written last


class Kind(str, Enum):
    """What an artifact path holds; the value is written into manifests."""

    HF = "hf"  # a transformers checkpoint folder (config.json + safetensors)
    GGUF = "gguf"  # one .gguf file
    ONNX = "onnx"  # an onnxruntime-genai folder (genai_config.json + model.onnx)
    GPTQ = "gptq"  # a GPTQ checkpoint folder (quantize_config.json + packed weights)
    FILE = "file"  # any other single file (an importance matrix, ...)


@dataclass(frozen=True)
class Artifact:
    kind: Kind
    path: Path
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))

    def digest(self) -> str:
        """Content hash: sha256 over (relative name, file sha256) of every file."""
        h = hashlib.sha256(self.kind.value.encode())
        base = self.path if self.path.is_dir() else self.path.parent
        for f in self.files():
            h.update(f.relative_to(base).as_posix().encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()


@dataclass
class Step:
    """One applied stage as the manifest records it."""

    stage: str
    version: int
    params: dict[str, Any]
    input_sha256: str
    output_sha256: str
    edgepack_version: str
    wall_s: float
    cached: bool = False
    key: str = ""  # the stage cache entry holding the output

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def side_input(default: Any = None) -> Any:
    """A config field naming a file or folder the stage reads; its content, not its path, goes into the cache key.

    Values that name no existing path (``"builtin"``, ``"hf:..."``, None) are kept as they are.
    """
    return field(default=default, metadata={"side_input": True})


class Planned(NamedTuple):
    """A file a stage will write, and its size where it can be told in advance (None: not known before it runs)."""

    name: str
    bytes: int | None = None


class Stage:
    """Base of every converter stage.

    Subclasses set ``name``, ``version`` (bump it when the output for the same
    input and config changes), the artifact kinds they take and make, and
    ``Config`` (a frozen dataclass whose fields document the parameters), and
    implement ``plan`` and ``run``. ``run`` writes only inside ``out_dir``; the
    cache renames that directory into place when ``run`` returns.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    input_kinds: ClassVar[tuple[Kind, ...]] = (Kind.HF,)
    output_kind: ClassVar[Kind]
    Config: ClassVar[type]

    def plan(self, inp: Artifact | None, config: Any) -> list[Planned]:
        """The files ``run`` will write, for ``convert --dry-run``; ``inp`` is None when it does not exist yet."""
        raise NotImplementedError

    def run(self, inp: Artifact, config: Any, out_dir: Path) -> Artifact:
        raise NotImplementedError

    def resources(self, config: Any) -> tuple[int, int]:
        """(CPUs, GPUs) a run with ``config`` occupies: what the Ray executor reserves for it (``executor.py``)."""
        return 1, 0


def cache_key(stage: Stage, config: Any, input_digest: str) -> str:
    payload = json.dumps(
        {
            "stage": stage.name,
            "version": stage.version,
            "config": params(config),
            "input": input_digest,
        },
        sort_keys=True,
    )
    return f"{stage.name}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


def run_stage(stage: Stage, inp: Artifact, config: Any, *, input_digest: str | None = None) -> tuple[Artifact, Step]:
    """Run ``stage`` on ``inp`` through the cache; reuse a finished output with the same key.

    Raises TypeError when ``inp`` or the output is not of the kinds the stage declares (a planning bug).
    """
    if inp.kind not in stage.input_kinds:
        raise TypeError(f"stage {stage.name} takes {', '.join(k.value for k in stage.input_kinds)}, not {inp.kind.value}")
    digest = input_digest or inp.digest()
    if hit := cached(stage, config, digest):
        return hit
    key = cache_key(stage, config, digest)
    out_dir = constants.stages_dir() / key
    start = time.perf_counter()
    with filling(key) as tmp:
        produced = stage.run(inp, config, tmp)
        if produced.kind != stage.output_kind:
            raise TypeError(f"stage {stage.name} declares {stage.output_kind.value} output but made {produced.kind.value}")
        rel = produced.path.relative_to(tmp)
        wall = time.perf_counter() - start
        out_digest = Artifact(produced.kind, produced.path).digest()
        step = Step(
            stage=stage.name,
            version=stage.version,
            params=params(config),
            input_sha256=digest,
            output_sha256=out_digest,
            edgepack_version=__version__,
            wall_s=round(wall, 3),
            key=key,
        )
        write_json(
            tmp / COMPLETE,
            {"kind": produced.kind.value, "relpath": rel.as_posix(), "meta": produced.meta, "step": step.to_json()},
        )
    return Artifact(produced.kind, out_dir / rel, produced.meta), step


@contextmanager
def filling(key: str) -> Iterator[Path]:
    """The partial folder that becomes the entry ``key`` when the block succeeds (a stage's run, or a copy of an entry
    from a shared cache: ``shared_cache.py``); its ``.writer`` names this process while it is filled."""
    clean_partials()
    with atomic_dir(constants.stages_dir() / key) as tmp:
        write_json(tmp / WRITER, _writer())
        yield tmp
        (tmp / WRITER).unlink()


def cached(stage: Stage, config: Any, input_digest: str) -> tuple[Artifact, Step] | None:
    """The finished output of ``stage`` for this config and input, if the cache holds one."""
    return entry(cache_key(stage, config, input_digest))


def entry(key: str) -> tuple[Artifact, Step] | None:
    """The finished entry ``key`` of the stage cache, if there is one."""
    marker = constants.stages_dir() / key / COMPLETE
    return from_record(key, json.loads(marker.read_text())) if marker.is_file() else None


def from_record(key: str, record: dict[str, Any]) -> tuple[Artifact, Step]:
    """The output and step an entry's ``.complete`` record describes; the artifact's path is in this cache."""
    out_dir = constants.stages_dir() / key
    art = Artifact(Kind(record["kind"]), out_dir / record["relpath"], record.get("meta", {}))
    known = {f.name for f in dataclasses.fields(Step)}  # a newer edgepack may record more: read what this one knows
    return art, Step(**{**{k: v for k, v in record["step"].items() if k in known}, "cached": True})


def clean_partials() -> list[Path]:
    """Remove the partial folders in the stage cache whose run can no longer finish; returns them."""
    removed = []
    for tmp in constants.stages_dir().glob(".*.partial-*"):
        if tmp.is_dir() and _stale(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _writer() -> dict[str, Any]:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _stale(tmp: Path) -> bool:
    """Its writer on this host is gone (or its pid now names another process), or nothing in it changed for STALE_AFTER_S."""
    import psutil

    try:
        w = json.loads((tmp / WRITER).read_text())
        if w["host"] == socket.gethostname():
            try:
                return psutil.Process(w["pid"]).create_time() != w["started"]
            except psutil.NoSuchProcess:
                return True
    except (OSError, ValueError, KeyError):  # not written yet, or a writer that died writing it: judge by age
        pass
    try:
        newest = max(p.lstat().st_mtime for p in [tmp, *tmp.rglob("*")])
    except FileNotFoundError:  # its writer renamed or removed it meanwhile
        return False
    return time.time() - newest > STALE_AFTER_S


def params(config: Any) -> Any:
    """``config`` as JSON for keys and manifests: side inputs become ``{"name", "sha256"}`` of what they name."""
    out = _jsonable(config)
    if dataclasses.is_dataclass(config):
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if f.metadata.get("side_input") and isinstance(value, (str, os.PathLike)) and str(value):
                path = Path(value).expanduser()
                if path.exists():
                    digest = sha256_file(path) if path.is_file() else Artifact(Kind.HF, path).digest()
                    out[f.name] = {"name": path.name, "sha256": digest}
    return out


def _jsonable(config: Any) -> Any:
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config, default=str))
