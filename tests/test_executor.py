"""``convert --executor ray`` on a real two-node Ray cluster on loopback (``ray_cluster.py``), against the local executor.

The cluster is started once for the module and stopped at its end; the tests run in file order, the one that kills a
node and the one that adds a blind node last. About three minutes on 2 cores, most of it the three 4-variant converts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from edgepack.convert import convert
from edgepack.converters.gptq import GPTQConfig, GPTQStage
from edgepack.errors import ClusterError, MissingDependencyError, UsageError
from edgepack.executor import Cluster, chosen, session
from edgepack.fsutil import sha256_file
from edgepack.plan import SOURCE, Job
from edgepack.stages import Artifact, Kind

if importlib.util.find_spec("ray") is None:  # found, not imported: Ray reads the cluster's env when first imported
    pytest.skip("needs the ray extra: pip install 'edgepack[ray]'", allow_module_level=True)

from ray_cluster import RayCluster  # noqa: E402

VARIANTS = "gguf:Q8_0,gguf:Q4_0,gguf:Q4_K_M,gguf:Q6_K"
OPTIONS = {"calibration_tokens": "512"}  # one 512-token window: the importance matrix in seconds


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster(cpus=2)
    try:
        c.node2 = c.add_node()
        yield c
    finally:
        c.stop()


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    """The driver side: RAY_ADDRESS set, Ray keeping the loopback address and using the cluster's token (``ray_cluster.py``)."""
    with cluster.driver(monkeypatch):
        yield cluster


@pytest.fixture(scope="module")
def local_hashes(smollm2, tmp_path_factory) -> dict[str, str]:
    """The variant files' sha256 from the local executor."""
    home = tmp_path_factory.mktemp("local")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPACK_HOME", str(home / "edgepack"))
        b = convert(str(smollm2), VARIANTS, home / "b", options=OPTIONS, executor="local")
    return _hashes(b.root)


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted((root / "variants").rglob("*.gguf"))}


def _cache_is_whole(home: Path) -> list[str]:
    """Every stage cache entry is finished and holds what its record says; returns the leftover partial folders."""
    stages = home / "stages"
    for entry in (d for d in stages.iterdir() if not d.name.startswith(".")):
        record = json.loads((entry / ".complete").read_text())
        art = Artifact(Kind(record["kind"]), entry / record["relpath"])
        assert art.digest() == record["step"]["output_sha256"], entry.name
    return [d.name for d in stages.iterdir() if d.name.startswith(".") and ".partial-" in d.name]


def test_executor_choice_and_bad_input(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert chosen(None) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert chosen(None) == "ray"
    assert chosen("local") == "local"
    with pytest.raises(UsageError, match="choose local or ray"):
        chosen("dask")
    with pytest.raises(ClusterError, match=r"no Ray cluster answers at 127\.0\.0\.1:1 .*RAY_ADDRESS"):
        start = time.perf_counter()
        Cluster("127.0.0.1:1")
    assert time.perf_counter() - start < 10
    monkeypatch.setenv("EDGEPACK_HOME", "s3://bucket/edgepack")
    with pytest.raises(UsageError, match=r"EDGEPACK_HOME is a URL: it must be a local folder; .* --cache s3://bucket/prefix \(or EDGEPACK_CACHE\)"):
        Cluster("127.0.0.1:1")
    monkeypatch.delenv("EDGEPACK_HOME")
    clean = "import sys, edgepack.convert, edgepack.executor as e\nwith e.session('local') as c: assert c is None\nassert 'ray' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", clean], env={**os.environ, "RAY_ADDRESS": ""}).returncode == 0  # local imports no Ray
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where it is not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgepack\[ray\]'"):
        Cluster("auto")


def test_cli_unreachable_address_is_one_line(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    r = subprocess.run([sys.executable, "-m", "edgepack", "convert", str(tmp_path / "m"), "--to", "gguf:Q8_0", "--no-report"],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "no Ray cluster answers at 127.0.0.1:1" in r.stderr, r.stderr


_SLOW_STAGE = """
import sys, time
from dataclasses import dataclass
from pathlib import Path
from edgepack.stages import Artifact, Kind, Stage, run_stage

@dataclass(frozen=True)
class Config:
    n: int

class Slow(Stage):
    name, input_kinds, output_kind, Config = "slow", (Kind.FILE,), Kind.FILE, Config

    def run(self, inp, config, out_dir):
        (out_dir / "out").write_text(str(config.n))
        print("running", flush=True)
        time.sleep(float(sys.argv[3]))
        return Artifact(Kind.FILE, out_dir / "out")

run_stage(Slow(), Artifact(Kind.FILE, Path(sys.argv[1])), Config(int(sys.argv[2])))
"""


def test_stale_partials_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    """Two real stage runs: one killed -9 mid-run (its partial goes), one still running (its partial stays);
    partials of another host go only once nothing was written into them for STALE_AFTER_S."""
    from edgepack.stages import STALE_AFTER_S, WRITER, clean_partials

    home = tmp_path / "edgepack"
    monkeypatch.setenv("EDGEPACK_HOME", str(home))
    (tmp_path / "in").write_text("input")
    runs = [subprocess.Popen([sys.executable, "-c", _SLOW_STAGE, str(tmp_path / "in"), str(n), "60"], stdout=subprocess.PIPE, text=True) for n in (1, 2)]
    try:
        assert [r.stdout.readline() for r in runs] == ["running\n"] * 2
        stages = home / "stages"
        owner = {json.loads((p / WRITER).read_text())["pid"]: p for p in stages.glob(".*.partial-*")}
        runs[0].kill()
        runs[0].wait()
        old, fresh = stages / ".elsewhere-old.partial-x", stages / ".elsewhere-new.partial-y"
        for p in (old, fresh):
            p.mkdir()
            (p / WRITER).write_text(json.dumps({"host": "another-node", "pid": runs[1].pid, "started": 0}))
        long_ago = time.time() - STALE_AFTER_S - 60
        for p in (old, old / WRITER):
            os.utime(p, (long_ago, long_ago))
        assert sorted(clean_partials()) == sorted([owner[runs[0].pid], old])
        assert owner[runs[1].pid].is_dir() and fresh.is_dir()  # a live writer's folder, and a recent one of another host
        assert clean_partials() == []
    finally:
        for r in runs:
            r.kill()
            r.wait()
    assert clean_partials() == [owner[runs[1].pid]]
    done = subprocess.run([sys.executable, "-c", _SLOW_STAGE, str(tmp_path / "in"), "1", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert _cache_is_whole(home) == [fresh.name]
    assert len(list(stages.glob("slow-*/.complete"))) == 1 and not list(stages.glob(f"slow-*/{WRITER}"))  # the record goes with the rename


@pytest.mark.slow
@pytest.mark.ray
def test_two_nodes_make_the_local_files(on_cluster, smollm2, local_hashes, tmp_path, logged):
    b = convert(str(smollm2), VARIANTS, tmp_path / "b", options=OPTIONS, executor="ray")
    assert _hashes(b.root) == local_hashes and len(local_hashes) == 4
    assert sum("(ray)" in m for m in logged.messages) == 6  # f16, Q8_0, imatrix and three quantizes, each a task
    assert _cache_is_whole(Path(os.environ["EDGEPACK_HOME"])) == []

    from edgepack.eval import EvalConfig, evaluate

    with session("ray") as cluster:
        assert len(cluster.nodes()) == 2
        scores = evaluate(b, EvalConfig(text="builtin", windows=2, window_len=64, top_k=8, variant_top_k=32, prompts=2, max_new_tokens=8),
                          device="cpu", threads=1, cluster=cluster)  # fmt: skip
    assert sorted(scores["variants"]) == sorted(v.id for v in b.variants)
    kld = {vid: s["kld"]["mean"] for vid, s in scores["variants"].items()}
    assert all(k > 0 for k in kld.values()) and kld["gguf-q8_0"] < kld["gguf-q4_0"], kld  # real scores: more bits, closer

    from edgepack.bench import BenchConfig, bench

    with session("ray") as cluster:
        runs = bench(b, BenchConfig(prompt_tokens=32, decode_tokens=4, repetitions=1, warmup=0, device="cpu"), variants=["gguf-q4_0", "gguf-q8_0"], cluster=cluster)["runs"]
    assert {r["variant"] for r in runs.values()} == {"gguf-q4_0", "gguf-q8_0"}
    assert all(r["decode_tokens_per_s"]["median"] > 0 and r["machine"]["cores_logical"] for r in runs.values())


@pytest.mark.slow
@pytest.mark.ray
def test_a_gpu_stage_needs_a_gpu_node(on_cluster):
    with session("ray") as cluster:
        if any(n["Resources"].get("GPU") for n in cluster.nodes()):
            pytest.skip("this cluster has a GPU")
        with pytest.raises(ClusterError, match="stage gptq needs a GPU and no node of the Ray cluster"):
            cluster.check([Job(GPTQStage(), GPTQConfig(device="cuda"), SOURCE)], [], [])


@pytest.mark.slow
@pytest.mark.ray
def test_a_cpu_only_driver_sends_a_gpu_stage_to_a_gpu_node(on_cluster):
    """The driver needs no GPU: the GPU stage passes the cluster's check and its task runs on the node that has one."""
    gpu = on_cluster.add_node(gpus=1)
    try:
        with session("ray") as cluster:
            cluster.check([Job(GPTQStage(), GPTQConfig(device="cuda"), SOURCE)], [], [])
            where = cluster.submit(lambda: __import__("ray").get_runtime_context().get_node_id(), gpus=1)
            (node,) = [n["NodeID"] for n in cluster.nodes() if n["Resources"].get("GPU")]
            assert cluster._ray.get(where, timeout=120) == node
    finally:
        on_cluster.kill(gpu)
    with session("ray") as cluster:  # the next tests' probes go to live nodes only: wait until Ray sees it gone
        deadline = time.monotonic() + 120
        while any(n["Resources"].get("GPU") for n in cluster.nodes()) and time.monotonic() < deadline:
            time.sleep(1)


@pytest.mark.slow
@pytest.mark.ray
def test_a_node_killed_mid_stage(on_cluster, smollm2, local_hashes, tmp_path):
    """kill -9 of every process of the second node while it runs a stage: Ray runs the task again on the head."""
    killed: list[str] = []

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            busy = [p for p in on_cluster.processes(on_cluster.node2) if _cmdline(p).startswith("ray::_in_env")]
            if busy:
                time.sleep(1.0)  # well inside the stage
                doing = _cmdline(busy[0])
                on_cluster.kill(on_cluster.node2)
                killed.append(doing)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    b = convert(str(smollm2), VARIANTS, tmp_path / "b", options=OPTIONS, executor="ray")
    killer.join(timeout=5)
    assert killed, "the second node never ran a stage, so nothing was killed"
    assert _hashes(b.root) == local_hashes
    assert _cache_is_whole(Path(os.environ["EDGEPACK_HOME"])) == [], f"killed during {killed[0]}"  # the retry removed the dead run's partial


@pytest.mark.slow
@pytest.mark.ray
def test_a_node_that_cannot_see_the_cache(on_cluster, smollm2, tmp_path, monkeypatch):
    """A node whose file system hides the edgepack home (a tmpfs mounted over it in its own mount namespace)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare --mount (root) to give a node its own file system view")
    home = tmp_path / "shared"
    monkeypatch.setenv("EDGEPACK_HOME", str(home / "edgepack"))
    home.mkdir()
    blind = on_cluster.add_node(wrap=["unshare", "--mount", "--propagation", "private", "sh", "-c", f'mount -t tmpfs none {home} && exec "$0" "$@"'])
    try:
        with pytest.raises(ClusterError, match=rf"cannot read {re.escape(str(home))}/edgepack/stages: put EDGEPACK_HOME .* on storage every node mounts"):
            convert(str(smollm2), "gguf:Q8_0", tmp_path / "b", executor="ray")
        assert not (home / "edgepack" / "stages").exists() or not any((home / "edgepack" / "stages").iterdir())
    finally:
        on_cluster.kill(blind)


def _cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # the process ended meanwhile
        return ""
