"""Where a convert's jobs run: in this process (``local``, the default), or as tasks on a Ray cluster (``ray``).

Local imports nothing and runs the plan's jobs one after the other (``plan.Runner``). On Ray, every job of the
plan is submitted as a task as soon as the plan is made; a task's arguments are the ObjectRefs of the jobs whose
outputs it reads, so Ray starts it once they are done and runs the independent ones (each quant type, each
variant's eval and bench) side by side, each reserving what its stage declares (``Stage.resources``). Tasks
exchange paths, never model data: every output goes through the stage cache (``stages.py``), which is either on
storage every node mounts (``EDGEPACK_HOME``), or on a URL (``--cache s3://...``: ``shared_cache.py``), where each
node keeps its own local cache and a task pulls the entries it reads and pushes the one it makes; the bundle is
assembled on the driver. A task whose node dies is run again (``MAX_RETRIES``); cache entries appear by rename only
(on a URL: by their record, pushed last), so a killed task leaves no entry that looks finished (its ``.partial-``
folder is never read, and the next cache miss removes it: ``stages.clean_partials``).

What a cluster cannot do is refused before any stage runs (``Cluster.check``): Ray missing, an address that does
not answer, a cache or model folder some node cannot read (each node must read a probe file the driver wrote; on a
URL, a probe object), a GPU stage with no GPU in the cluster (the driver needs none: a laptop can send GPTQ to a GPU
node).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import constants
from .errors import ClusterError, EdgepackError, MissingDependencyError, UsageError
from .plan import SOURCE, Job, Runner, resolve
from .shared_cache import ENV as SHARED_CACHE_ENV
from .shared_cache import Entry, SharedCache
from .stages import Artifact, Step, cache_key, entry, run_stage

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
MAX_RETRIES = 3  # runs of a task whose worker or node died, after the first (Ray's own default for tasks)
CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 120.0  # a worker on every node, started cold
_ENV = ("EDGEPACK_HOME", "HF_HOME", "HF_HUB_OFFLINE", "EDGEPACK_DEBUG")  # what a task must see as the driver does


def chosen(executor: str | None) -> str:
    """``executor`` checked; None means ``ray`` when RAY_ADDRESS is set, else ``local``. Raises UsageError."""
    if executor is None:
        return "ray" if os.environ.get("RAY_ADDRESS") else "local"
    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r}: choose local or ray", option="executor")
    return executor


def check_here(jobs: Iterable[Job]) -> None:
    """Refuse, before any stage runs, a job needing a GPU on this machine when torch sees none (``Cluster.check``
    does the same for a cluster: there the GPU may be on another node than the driver's). Raises UsageError.
    """
    for job in jobs:
        if job.stage.resources(job.config)[1]:
            import torch

            if not torch.cuda.is_available():
                raise UsageError(
                    f"stage {job.stage.name} needs a CUDA device and torch sees none on this machine: leave out "
                    "--gptq-device cuda to run it on the CPU, or send the convert to a Ray cluster with a GPU node (--executor ray)",
                    option="device",
                )


@contextmanager
def session(executor: str | None, cache: SharedCache | None = None) -> Iterator[Cluster | None]:
    """The cluster to run on, or None to run here; disconnects at the end if it connected. ``cache``: the stage cache
    on a URL that connects the nodes, which then need no common folder (only for ``ray``).

    Raises UsageError, MissingDependencyError, ClusterError.
    """
    if chosen(executor) == "local":
        if cache is not None:
            raise UsageError(
                f"a stage cache on a URL ({cache.url}) connects the nodes of a Ray cluster: add --executor ray, "
                "or leave out `cache` (and unset EDGEPACK_CACHE) to convert on this machine",
                option="cache",
            )
        yield None
        return
    cluster = Cluster(os.environ.get("RAY_ADDRESS") or "auto", cache)
    try:
        yield cluster
    finally:
        cluster.close()


class Cluster:
    """A connection to a running Ray cluster (``ray start --head``): ``address`` is host:port, ``ray://host:port``
    or ``auto`` (the cluster this machine belongs to).

    With ``cache`` (a stage cache on a URL) each node keeps its own EDGEPACK_HOME (as set where its ``ray start``
    ran) and the tasks get the driver's AWS_* variables; without, every task uses the driver's EDGEPACK_HOME.

    Raises MissingDependencyError without ``edgepack[ray]`` and ClusterError when nothing answers at ``address``.
    """

    def __init__(self, address: str = "auto", cache: SharedCache | None = None) -> None:
        try:
            import ray
        except ModuleNotFoundError as e:
            raise MissingDependencyError("ray", extra="ray", purpose="--executor ray") from e
        self.address = address
        self.cache = cache
        if "://" in os.environ.get("EDGEPACK_HOME", ""):
            raise UsageError(
                "EDGEPACK_HOME is a URL: it must be a local folder; give the bucket as the stage cache the nodes share "
                "instead: --cache s3://bucket/prefix (or EDGEPACK_CACHE)",
                option="executor",
            )
        if cache is not None:
            cache.open()
        if address != "auto":
            _check_reachable(address)
        env = {k: os.environ[k] for k in _ENV if k in os.environ}
        if cache is None:
            env["EDGEPACK_HOME"] = str(constants.home().resolve())
        else:
            env.pop("EDGEPACK_HOME", None)
            env.update({k: os.environ[k] for k in SHARED_CACHE_ENV if k in os.environ})
        self._env = env
        self._owned = not ray.is_initialized()  # a caller's own ray.init is left connected
        if self._owned:
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
            except ConnectionError as e:  # "auto" with no cluster on this machine, or not Ray at that address
                where = "on this machine and RAY_ADDRESS is not set" if address == "auto" else f"at {address}"
                raise ClusterError(f"no Ray cluster {where}: start one with `ray start --head` or set RAY_ADDRESS to its host:port") from e
        self._ray = ray
        self._task = ray.remote(_in_env)
        self._probe = ray.remote(_probe)

    def close(self) -> None:
        if self._owned:
            self._ray.shutdown()

    def nodes(self) -> list[dict[str, Any]]:
        return [n for n in self._ray.nodes() if n.get("Alive")]

    def check(self, jobs: Iterable[Job], folders: list[Path], reads: list[Path]) -> None:
        """Refuse what would fail mid-run: a job needing a GPU in a cluster without one, or a node that cannot see
        ``folders`` (the driver writes a probe file in each that a task on every node must read) or ``reads``, or
        the stage cache on a URL (the driver writes a probe object there first).

        Raises ClusterError.
        """
        for job in jobs:
            if job.stage.resources(job.config)[1] and not any(n["Resources"].get("GPU") for n in self.nodes()):
                raise ClusterError(f"stage {job.stage.name} needs a GPU and no node of the Ray cluster at {self.address} has one: add a GPU node or run it on the CPU")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = secrets.token_hex(8)
        probes = [f / f".edgepack-probe-{token}" for f in folders]
        if self.cache is not None:
            self.cache.write_probe(token)
        for p in probes:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(token)
        try:
            nodes = [n for n in self.nodes() if n["Resources"].get("CPU")]
            refs = [
                self._probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(self._env, probes, reads, token, self.cache)
                for n in nodes
            ]
            deadline = time.monotonic() + PROBE_TIMEOUT_S
            seen = []
            for ref in refs:
                try:
                    seen.append(self._ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0)))
                except self._ray.exceptions.TaskUnschedulableError:  # the node left since it was listed: it runs nothing
                    seen.append(None)
                except self._ray.exceptions.GetTimeoutError as e:
                    raise ClusterError(f"the Ray cluster at {self.address} ran no task within {PROBE_TIMEOUT_S:.0f} s: check `ray status`") from e
            for node, problem in zip(nodes, seen):
                if problem:
                    raise ClusterError(f"Ray node {node['NodeManagerAddress']} {problem}")
        finally:
            for p in probes:
                p.unlink(missing_ok=True)
            if self.cache is not None:
                self.cache.remove_probe(token)

    def submit(self, fn: Callable[..., Any], *args: Any, cpus: float = 1, gpus: float = 0) -> Any:
        """Run ``fn(*args)`` as a task (ObjectRefs among ``args`` are waited for and passed as their values)."""
        task = self._task.options(num_cpus=cpus, num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=False)
        return task.remote(self._env, fn, *args)

    def get(self, ref: Any) -> Any:
        """A task's result; its EdgepackError is raised as it is, anything else as ClusterError."""
        from ray.exceptions import RayError, RayTaskError

        try:
            return self._ray.get(ref)
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, EdgepackError):
                raise cause from None
            raise ClusterError(f"a task failed on the Ray cluster: {str(cause or e).splitlines()[-1]}: set EDGEPACK_DEBUG=1 for the traceback") from e
        except RayError as e:  # the node died more often than MAX_RETRIES, the cluster went away
            raise ClusterError(f"a task was lost on the Ray cluster after {MAX_RETRIES} retries ({type(e).__name__}): check the cluster and re-run") from e

    def map(self, fn: Callable[..., Any], items: list[tuple[Any, ...]], *, cpus: float = 1) -> list[Any]:
        """``fn(*item)`` for each item as parallel tasks; the results in order."""
        refs = [self.submit(fn, *item, cpus=cpus) for item in items]
        return [self.get(r) for r in refs]

    def node_cpus(self) -> int:
        """CPUs of the smallest node: a task reserving that many has a node to itself."""
        return int(min(n["Resources"]["CPU"] for n in self.nodes() if n["Resources"].get("CPU")))


class RayRunner(Runner):
    """``plan.Runner`` on a cluster: every job is submitted up front; ``run(job)`` waits for that one.

    With the cluster's stage cache on a URL the driver first pushes the source there, and ``run`` pulls a job's
    output into the driver's own cache only where the driver reads it: the jobs in ``wanted`` (the variants'), those
    whose output the bundle keeps and those checked here.
    """

    def __init__(self, source: Artifact, jobs: list[Job], cluster: Cluster, wanted: set[Job] | None = None) -> None:
        super().__init__(source)
        self.cluster = cluster
        self.wanted = set(jobs) if wanted is None else wanted
        self.refs: dict[Job, Any] = {}
        shipped = cluster.cache.push_source(source) if cluster.cache else None
        for job in jobs:
            deps = [j for j in jobs if j in _reads(job)]
            cpus, gpus = job.stage.resources(job.config)
            inp = job.input.index if isinstance(job.input, Job) else None
            args = (job.stage, job.config, source, inp, [d.index for d in deps], *[self.refs[d] for d in deps])
            if cluster.cache:
                args = (job.stage, job.config, cluster.cache, shipped, inp, [d.index for d in deps], *[self.refs[d] for d in deps])
            self.refs[job] = cluster.submit(_run_job if cluster.cache is None else _run_shared, *args, cpus=cpus, gpus=gpus)

    def run(self, job: Job) -> Artifact:
        art, step = self.cluster.get(self.refs[job])
        log.info(f"{job.stage.name}: {'cached' if step.cached else f'done in {step.wall_s:.1f} s'} (ray)")
        if self.cluster.cache is not None and (job in self.wanted or job.keep or job.checks):
            art = self.cluster.cache.artifact(step.key)
        for check in job.checks:
            check(art.path)
        self.outputs[job], self.steps[job] = art, step
        return art


def _reads(job: Job) -> set[Job]:
    """The jobs whose outputs ``job`` reads: its input and the ``Output`` values in its config."""
    found: set[Job] = set()
    resolve(job.config, lambda j: found.add(j), None)
    if isinstance(job.input, Job):
        found.add(job.input)
    return found


def _check_reachable(address: str) -> None:
    """A TCP connect with a short timeout, so an address nothing listens on fails in seconds, not after Ray's retries."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"RAY_ADDRESS {address!r} is not host:port or ray://host:port", option="executor")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterError(f"no Ray cluster answers at {address} ({e.strerror or e}): start it (`ray start --head`) or fix RAY_ADDRESS") from e


# -- what runs on the workers ------------------------------------------------------------------------------


def _in_env(env: dict[str, str], fn: Callable[..., Any], *args: Any) -> Any:
    os.environ.update(env)  # workers are started by the raylet, not by the driver: they get the driver's home (with a URL cache, keep their node's)
    return fn(*args)


def _run_job(stage, config, source: Artifact, input_index: int | None, indices: list[int], *deps: tuple[Artifact, Step]) -> tuple[Artifact, Step]:
    done = {i: art for i, (art, _) in zip(indices, deps)}
    config = resolve(config, lambda j: done[j.index].path, source.path)
    return run_stage(stage, source if input_index is None else done[input_index], config)


def _run_shared(stage, config, cache: SharedCache, source: Entry, input_index: int | None, indices: list[int], *deps: tuple[Artifact, Step]) -> tuple[Artifact, Step]:
    """``_run_job`` through a stage cache on a URL: the entry's record when the URL has it (then neither the entry nor
    the stage's input is fetched here), else the stage run on its input pulled here; what it made is pushed."""
    done = {i: Entry(step.key, step.output_sha256) for i, (_, step) in zip(indices, deps)}
    reads_source = dataclasses.is_dataclass(config) and any(getattr(config, f.name) is SOURCE for f in dataclasses.fields(config))
    # the files a config names go into its key by content (``stages.side_input``): those come here first
    config = resolve(config, lambda j: cache.artifact(done[j.index].key).path, cache.artifact(source.key).path if reads_source else None)
    digest = source.digest if input_index is None else done[input_index].digest
    key = cache_key(stage, config, digest)
    if hit := entry(key):  # made on this node before
        art, step = hit
        cache.push(key)  # unless the URL has it
    elif hit := cache.finished(key):  # made elsewhere: its files stay at the URL until a node reads them
        art, step = hit
    else:
        inp = cache.artifact(source.key if input_index is None else done[input_index].key)
        art, step = run_stage(stage, inp, config, input_digest=digest)
        cache.push(key)
    return art, dataclasses.replace(step, key=key)


def _probe(env: dict[str, str], probes: list[Path], reads: list[Path], token: str, cache: SharedCache | None) -> str | None:
    """What this node cannot read ("cannot read PATH: what to do"), or None."""
    os.environ.update(env)  # the credentials and endpoint of a shared cache, as a task gets them
    hint = "put EDGEPACK_HOME (and the model and bundle) on storage every node mounts at the same path"
    for p in probes:
        try:
            if p.read_text() != token:
                return f"cannot read {p.parent}: {hint}"
        except OSError:
            return f"cannot read {p.parent}: {hint}"
    if missing := next((str(p) for p in reads if not p.exists()), None):
        return f"cannot read {missing}: {hint}"
    if cache is not None and (why := cache.read_probe(token)):
        return f"cannot read the shared cache {cache.url} ({why}): install edgepack[s3] on every node and let it reach the store"
    return None


__all__ = ["EXECUTORS", "Cluster", "RayRunner", "chosen", "session"]
