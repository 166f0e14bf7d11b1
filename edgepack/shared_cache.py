"""The stage cache on an fsspec URL (``s3://bucket/prefix``), shared by the nodes of a Ray cluster that mount no
common folder (``convert --executor ray --cache URL``).

Each node keeps its own stage cache (``stages.py``, under its own EDGEPACK_HOME); the URL holds the finished entries,
and a task copies what it needs between the two: when the URL has its stage's entry it reads only the record;
otherwise it pulls the entries its stage reads, runs it and pushes the entry it made (``executor._run_shared``). The
driver pushes the pulled model once, as the entry ``source-<digest>``, and pulls the outputs it places in the bundle.

Layout under the URL::

    stages/<key>/<files>       an entry's files, as in a local cache
    stages/<key>/.complete     pushed last: the local record, plus ``files``: each file's bytes and sha256
    .edgepack-probe-<token>    written by the driver before any work; a task on every node reads it (``Cluster.check``)

An object store has no rename, so an entry is finished when its ``.complete`` is there and every file it lists is
there at its size: a push killed half way leaves files without a record, which readers take for absent and the next
push of that key overwrites. A pulled file whose sha256 differs from the record (two writers of one key racing) makes
the entry absent too. A pull lands in a partial folder renamed into place (``stages.filling``), under a lock per key
and node, so two tasks of one node that read the same input download it once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import constants
from .errors import ClusterError, EdgepackError, MissingDependencyError, UsageError
from .fsutil import sha256_file, write_json
from .stages import COMPLETE, WRITER, Artifact, Kind, Step, filling, from_record

log = logging.getLogger(__name__)

# What a task must see as the driver does to reach an s3:// cache (the nodes then need no credentials of their own).
ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
)  # fmt: skip
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # botocore's own names, most specific first
_S3 = ("s3", "s3a")
CONNECT_TIMEOUT_S = 5


@dataclass(frozen=True)
class Entry:
    """An entry of the cache and the content hash of the artifact it holds (``Artifact.digest``)."""

    key: str
    digest: str


class SharedCache:
    """The stage cache under ``url``; the file system is opened on first use, on each node with its own libraries.

    Raises UsageError for a value that is not a URL.
    """

    def __init__(self, url: str) -> None:
        if "://" not in url:
            raise UsageError(
                f"`cache` {url!r} is not a URL: give one every node reaches (s3://bucket/prefix); a folder every node "
                "mounts is the stage cache as it is: set EDGEPACK_HOME to it and leave out `cache`",
                option="cache",
            )
        self.url = url.rstrip("/")
        self._fs: Any = None
        self._root = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url}  # a task opens the file system again where it runs

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"])

    def open(self) -> SharedCache:
        """Open the file system now, so that a missing library or an unknown protocol fails before any work."""
        self.fs  # noqa: B018
        return self

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs, self._root = _open(self.url)
        return self._fs

    # -- entries -------------------------------------------------------------------------------------

    def pull(self, key: str) -> bool:
        """Make the local entry ``key`` from the URL's unless the local cache has it; False when neither holds it finished.

        Raises ClusterError when the URL cannot be read.
        """
        with _lock(key):
            if (constants.stages_dir() / key / COMPLETE).is_file():
                return True
            record = self.record(key)
            if record is None:
                return False
            remote = self._path("stages", key)
            try:
                with self._io(f"copy {key} from"), filling(key) as tmp:
                    for rel, listed in record["files"].items():
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        self.fs.get_file(f"{remote}/{rel}", str(tmp / rel))
                        if sha256_file(tmp / rel) != listed["sha256"]:
                            raise _Torn(rel)
                    write_json(tmp / COMPLETE, {k: v for k, v in record.items() if k != "files"})
            except _Torn as e:  # its record goes, so that no one takes the entry for finished any more
                log.warning(f"{self.url}: {key}/{e} differs from its record (written twice at once?): the stage will run again")
                with contextlib.suppress(Exception):
                    self.fs.rm_file(f"{remote}/{COMPLETE}")
                return False
        return True

    def artifact(self, key: str) -> Artifact:
        """The local copy of the entry ``key``, pulled first if need be. Raises ClusterError when the URL lacks it."""
        if not self.pull(key):
            raise ClusterError(f"the shared cache {self.url} has no finished entry {key} (removed meanwhile?): re-run the convert")
        entry = constants.stages_dir() / key
        record = json.loads((entry / COMPLETE).read_text())
        return Artifact(Kind(record["kind"]), entry / record["relpath"], record.get("meta", {}))

    def finished(self, key: str) -> tuple[Artifact, Step] | None:
        """The output and step of the stage entry ``key`` as the URL records them, nothing fetched; the artifact's path
        is where ``pull`` would put it. None when the URL holds no finished entry ``key``. Raises ClusterError."""
        record = self.record(key)
        return from_record(key, record) if record is not None else None

    def push(self, key: str) -> None:
        """Put the local entry ``key`` under the URL unless a finished one is there. Raises ClusterError."""
        if self.record(key) is not None:
            return
        entry = constants.stages_dir() / key
        files = [p for p in sorted(entry.rglob("*")) if p.is_file() and p.relative_to(entry).as_posix() not in (COMPLETE, WRITER)]
        self._upload(key, entry, files, json.loads((entry / COMPLETE).read_text()))

    def push_source(self, source: Artifact) -> Entry:
        """Put the pulled model under the URL once, as ``source-<digest>``; its entry. Raises ClusterError."""
        digest = source.digest()
        entry = Entry(f"source-{digest[:20]}", digest)
        if self.record(entry.key) is None:
            base = source.path if source.path.is_dir() else source.path.parent
            record = {"kind": source.kind.value, "relpath": source.path.relative_to(base).as_posix(), "meta": _jsonable(source.meta)}
            log.info(f"source: copying {source.path.name} to {self.url}")
            self._upload(entry.key, base, source.files(), record)
        return entry

    def record(self, key: str) -> dict[str, Any] | None:
        """The record of the entry ``key`` under the URL when it is finished: there, and each file it lists there at its size."""
        remote = self._path("stages", key)
        with self._io(f"read {key} in"):
            try:
                record = json.loads(self.fs.cat_file(f"{remote}/{COMPLETE}"))
            except FileNotFoundError:
                return None
            except ValueError:  # not JSON: a record cut short
                return None
            sizes = {name: info.get("size") for name, info in self.fs.find(remote, detail=True).items()}
        listed = record.get("files")
        if not isinstance(listed, dict) or any(sizes.get(f"{remote}/{rel}") != f["bytes"] for rel, f in listed.items()):
            return None
        if any(rel.startswith("/") or ".." in rel.split("/") for rel in listed):  # a pull writes only inside the entry
            return None
        return record

    # -- the probe -----------------------------------------------------------------------------------

    def write_probe(self, token: str) -> None:
        """Write the probe object the nodes must read. Raises ClusterError (naming what to check) when it cannot."""
        try:
            self.fs.pipe_file(self._path(_probe_name(token)), token.encode())
        except EdgepackError:
            raise
        except Exception as e:  # the store's own errors: refused connection, no such bucket, credentials refused
            raise ClusterError(f"cannot write to the shared cache {self.url} ({_why(e)}): {self._hint()}") from e

    def read_probe(self, token: str) -> str | None:
        """Why this process cannot read the probe object, or None when it reads it."""
        try:
            if self.fs.cat_file(self._path(_probe_name(token))).decode() == token:
                return None
            return "it holds another probe"
        except Exception as e:  # whatever the store or a missing library raises: the driver reports it for this node
            return _why(e)

    def remove_probe(self, token: str) -> None:
        with contextlib.suppress(Exception):  # the probe is a few bytes: not worth failing a finished check for
            self.fs.rm_file(self._path(_probe_name(token)))

    # -- helpers -------------------------------------------------------------------------------------

    def _upload(self, key: str, base: Path, files: list[Path], record: dict[str, Any]) -> None:
        """The files first, the record listing them last: until it is there, the entry is absent to readers."""
        remote = self._path("stages", key)
        listed = {}
        with self._io(f"copy {key} to"):
            for f in files:
                rel = f.relative_to(base).as_posix()
                listed[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                self.fs.put_file(str(f), f"{remote}/{rel}")
            self.fs.pipe_file(f"{remote}/{COMPLETE}", (json.dumps({**record, "files": listed}, indent=2) + "\n").encode())

    def _path(self, *parts: str) -> str:
        self.fs  # noqa: B018  # opens the file system, which sets the root
        return "/".join([self._root.rstrip("/"), *parts])

    def _hint(self) -> str:
        if self.url.split("://")[0] in _S3:
            return "check the bucket, the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) and the endpoint (AWS_ENDPOINT_URL)"
        return "check the URL and its credentials"

    @contextlib.contextmanager
    def _io(self, action: str) -> Iterator[None]:
        """The store's errors as one ClusterError; FileNotFoundError and edgepack's own pass through."""
        try:
            yield
        except (EdgepackError, FileNotFoundError, _Torn):
            raise
        except Exception as e:
            raise ClusterError(f"could not {action} the shared cache {self.url} ({_why(e)}): {self._hint()}") from e


class _Torn(Exception):
    """A pulled file that is not the one its record lists."""


def _open(url: str) -> tuple[Any, str]:
    """The fsspec file system for ``url`` and the path of the cache's root in it.

    Raises MissingDependencyError (fsspec, or the library for the URL's protocol) and UsageError (a protocol fsspec
    does not know).
    """
    try:
        import fsspec
    except ModuleNotFoundError as e:
        raise MissingDependencyError("fsspec", extra="ray", purpose="a stage cache on a URL") from e
    protocol = url.split("://")[0]
    options: dict[str, Any] = {}
    if protocol in _S3:
        options["use_listings_cache"] = False  # other nodes write meanwhile: ask the store every time
        options["skip_instance_cache"] = True  # fsspec's shared instance would keep the endpoint it was made with
        # an unreachable endpoint fails in seconds, not after botocore's and s3fs's retries with back-off
        options["config_kwargs"] = {"connect_timeout": CONNECT_TIMEOUT_S, "retries": {"max_attempts": 2}}
        if endpoint := next((os.environ[k] for k in _ENDPOINT_ENV if os.environ.get(k)), None):
            options["endpoint_url"] = endpoint  # an S3-compatible store (MinIO, Ceph, R2...); botocore < 1.31 reads neither
    try:
        fs, root = fsspec.url_to_fs(url, **options)
    except ImportError as e:  # fsspec knows the protocol, its library is not installed
        from fsspec.registry import known_implementations

        known = known_implementations.get(protocol, {})
        package = known.get("class", protocol).split(".")[0]
        raise MissingDependencyError(package, extra="s3" if protocol in _S3 else None, purpose=f"a stage cache on {protocol}://") from e
    except ValueError as e:
        raise UsageError(f"`cache` {url!r}: {e}: give an s3:// URL (or another protocol fsspec knows)", option="cache") from e
    return fs, root


@contextlib.contextmanager
def _lock(key: str) -> Iterator[None]:
    """One pull of ``key`` at a time on this node (the lock files stay: a few bytes each)."""
    import fcntl

    folder = constants.stages_dir() / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / key, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _probe_name(token: str) -> str:
    return f".edgepack-probe-{token}"


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1]}" if text else type(e).__name__


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(meta, default=str))


__all__ = ["ENV", "Entry", "SharedCache"]
