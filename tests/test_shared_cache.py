"""``convert --executor ray --cache s3://...``: the stage cache on a real S3 server (moto's, on loopback) connecting the
nodes of a real two-node Ray cluster (``ray_cluster.py``) whose nodes, and the driver, each have their own EDGEPACK_HOME.

The cluster and the server are started once for the module; the tests that use the cluster run in file order (the
second reads the bucket the first filled).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.convert import convert
from edgepack.errors import UsageError
from edgepack.fsutil import sha256_file
from edgepack.shared_cache import SharedCache

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("s3fs") is None or importlib.util.find_spec("moto") is None:
    pytest.skip("needs the ray and s3 extras and moto[server] (the test extra): pip install -e '.[all,test]'", allow_module_level=True)

from models import tiny_model  # noqa: E402
from ray_cluster import RayCluster  # noqa: E402

VARIANTS = "gguf:Q8_0,gguf:Q4_0"
OPTIONS = {"calibration_tokens": "512"}
BUCKET = "edgepack-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A real S3 server (moto's) on a free loopback port: its endpoint URL; the bucket BUCKET exists."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    quiet = logging.getLogger("werkzeug")  # a line per request otherwise, hiding a failure's own output
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()
        quiet.setLevel(level)


def _client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes, each with its own edgepack home (``homes``): only the bucket connects them."""
    homes = [tmp_path_factory.mktemp("node") / "edgepack" for _ in range(2)]
    c = RayCluster(cpus=2, node_env={"EDGEPACK_HOME": str(homes[0])})
    try:
        c.add_node(node_env={"EDGEPACK_HOME": str(homes[1])})
        c.homes = homes
        yield c
    finally:
        c.stop()


@pytest.fixture
def on_s3(s3, monkeypatch):
    """The driver's S3 settings, the normal way: credentials and the endpoint in the AWS_* variables."""
    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3}.items():
        monkeypatch.setenv(k, v)
    return s3


@pytest.fixture
def on_cluster(cluster, on_s3, monkeypatch):
    with cluster.driver(monkeypatch):
        yield cluster


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def local_hashes(tiny, tmp_path_factory) -> dict[str, str]:
    """The variant files' sha256 from the local executor."""
    home = tmp_path_factory.mktemp("local")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPACK_HOME", str(home / "edgepack"))
        b = convert(str(tiny), VARIANTS, home / "b", options=OPTIONS, executor="local")
    return _hashes(b.root)


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted((root / "variants").rglob("*.gguf"))}


def _bucket(endpoint: str, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` in the bucket, by its key below the prefix, with its size."""
    pages = _client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return {o["Key"].removeprefix(prefix + "/"): o["Size"] for page in pages for o in page.get("Contents", [])}


def _record(endpoint: str, prefix: str, key: str) -> dict:
    return json.loads(_client(endpoint).get_object(Bucket=BUCKET, Key=f"{prefix}/stages/{key}/.complete")["Body"].read())


def _entries(home: Path) -> set[str]:
    stages = home / "stages"
    return {d.name for d in stages.iterdir() if (d / ".complete").is_file()} if stages.is_dir() else set()


def test_a_cache_url_needs_ray_and_a_url(tiny, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match=r"a stage cache on a URL \(s3://b/p\) connects the nodes of a Ray cluster: add --executor ray"):
        convert(str(tiny), "gguf:Q8_0", tmp_path / "b", cache="s3://b/p", executor="local")
    monkeypatch.setenv("EDGEPACK_CACHE", "s3://b/p")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UsageError, match=r"unset EDGEPACK_CACHE"):
        convert(str(tiny), "gguf:Q8_0", tmp_path / "b")
    with pytest.raises(UsageError, match=r"`cache` '/mnt/shared' is not a URL: .* set EDGEPACK_HOME to it"):
        SharedCache("/mnt/shared")
    with pytest.raises(UsageError, match=r"Protocol not known: nosuch"):
        SharedCache("nosuch://b/p").open()


def test_the_source_sentinel_survives_a_task():
    """A Ray task gets its config by (cloud)pickle: a distillation's ``teacher=SOURCE`` must still be SOURCE there."""
    import cloudpickle

    from edgepack.plan import SOURCE

    assert cloudpickle.loads(cloudpickle.dumps({"teacher": SOURCE}))["teacher"] is SOURCE


def test_without_s3fs_the_cli_names_the_extra(tiny, tmp_path):
    """A driver without s3fs: one line naming the extra, before Ray is even reached."""
    cli = "import sys; sys.modules['s3fs'] = None; from edgepack.cli import main; sys.argv[0] = 'edgepack'; main()"
    args = [str(tiny), "--to", "gguf:Q8_0", "--no-report", "--executor", "ray", "--cache", f"s3://{BUCKET}/x", "-o", str(tmp_path / "b")]
    r = subprocess.run([sys.executable, "-c", cli, "convert", *args], capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "s3fs is needed for a stage cache on s3:// but is not installed: pip install 'edgepack[s3]'" in r.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_the_shared_cache_connects_the_nodes(on_cluster, on_s3, tiny, local_hashes, tmp_path, logged):
    """Different local homes on the driver and each node; the bucket ends up with every entry, each with its record."""
    url = f"s3://{BUCKET}/run"
    b = convert(str(tiny), VARIANTS, tmp_path / "b", options=OPTIONS, executor="ray", cache=url, report=True)
    assert _hashes(b.root) == local_hashes and len(local_hashes) == 2

    keys = {s["key"] for s in b.data["steps"]}
    objects = _bucket(on_s3, "run")
    finished = {name.split("/")[1] for name in objects if name.startswith("stages/") and name.endswith("/.complete")}
    (source,) = [k for k in finished if k.startswith("source-")]
    assert finished == keys | {source}
    for key in finished:  # each record lists the files that are there, at their sizes, and nothing else is
        listed = _record(on_s3, "run", key)["files"]
        assert listed and {f"stages/{key}/{rel}": f["bytes"] for rel, f in listed.items()} == {
            name: size for name, size in objects.items() if name.startswith(f"stages/{key}/") and not name.endswith("/.complete")
        }
    assert not [name for name in objects if ".edgepack-probe-" in name]  # the probe is removed after the check

    driver = Path(os.environ["EDGEPACK_HOME"])
    assert driver not in on_cluster.homes
    made = set().union(*(_entries(h) for h in on_cluster.homes))
    assert keys <= made, "a stage ran somewhere that is not one of the two nodes"
    assert source in made and source not in _entries(driver)  # the nodes pulled the model from the bucket
    f16 = [s["key"] for s in b.data["steps"] if s["params"].get("outtype") == "f16"]
    assert len(f16) == 1 and _entries(driver) == keys - set(f16), "the driver pulls what it places or keeps (not the f16 file)"
    assert sum("(ray)" in m for m in logged.messages) == len(b.data["steps"])
    assert sorted(b.data["eval"]["variants"]) == sorted(v.id for v in b.variants)  # eval ran on the driver, on what it pulled


@pytest.mark.slow
@pytest.mark.ray
def test_a_torn_entry_is_absent_and_made_again(on_cluster, on_s3, tiny, local_hashes, tmp_path):
    """Files without a record, and a record listing a file that is gone: both ignored, both stages run again. A rerun
    that finds everything in the bucket fetches neither the model nor the f16 file the quantize started from."""
    url = f"s3://{BUCKET}/torn"
    first = convert(str(tiny), VARIANTS, tmp_path / "first", options=OPTIONS, executor="ray", cache=url)
    assert _hashes(first.root) == local_hashes
    (no_record,) = [s["key"] for s in first.data["steps"] if s["stage"] == "quantize"]  # Q4_0
    (short,) = [s["key"] for s in first.data["steps"] if s["params"].get("outtype") == "q8_0"]
    (f16,) = [s["key"] for s in first.data["steps"] if s["params"].get("outtype") == "f16"]
    client = _client(on_s3)
    client.delete_object(Bucket=BUCKET, Key=f"torn/stages/{no_record}/.complete")
    (rel,) = _record(on_s3, "torn", short)["files"]
    client.delete_object(Bucket=BUCKET, Key=f"torn/stages/{short}/{rel}")

    again = _rerun(on_cluster, tiny, url, tmp_path / "again")
    ran = {s["key"] for s in again.data["steps"] if not s["cached"]}
    assert ran == {no_record, short}
    for key in (no_record, short):  # whole again
        listed = _record(on_s3, "torn", key)["files"]
        objects = _bucket(on_s3, f"torn/stages/{key}")
        assert {r: f["bytes"] for r, f in listed.items()} == {n: s for n, s in objects.items() if n != ".complete"}

    third = _rerun(on_cluster, tiny, url, tmp_path / "third")
    assert all(s["cached"] for s in third.data["steps"])
    fetched = set().union(*(_entries(h) for h in on_cluster.homes))
    assert f16 not in fetched and not any(k.startswith("source-") for k in fetched), fetched


def _rerun(cluster, tiny: Path, url: str, out: Path):
    """The convert again, with every local cache emptied first (the driver's and the nodes'): only the bucket has the entries."""
    for home in [*cluster.homes, Path(os.environ["EDGEPACK_HOME"])]:
        shutil.rmtree(home / "stages", ignore_errors=True)
    b = convert(str(tiny), VARIANTS, out, options=OPTIONS, executor="ray", cache=url)
    assert _hashes(b.root) == _hashes(out.parent / "first")
    return b


@pytest.mark.slow
@pytest.mark.ray
def test_an_unreachable_store_is_one_line_before_any_stage(on_cluster, tiny, tmp_path):
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    args = [str(tiny), "--to", "gguf:Q8_0", "--no-report", "--executor", "ray", "--cache", f"s3://{BUCKET}/x", "-o", str(tmp_path / "b")]
    r = subprocess.run([sys.executable, "-m", "edgepack", "convert", *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"cannot write to the shared cache s3://{BUCKET}/x (" in r.stderr and "AWS_ENDPOINT_URL" in r.stderr, r.stderr
    args[-3] = "s3://no-such-bucket/x"
    r = subprocess.run([sys.executable, "-m", "edgepack", "convert", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "cannot write to the shared cache s3://no-such-bucket/x (" in r.stderr, r.stderr
    assert not (Path(os.environ["EDGEPACK_HOME"]) / "stages").exists() and not (tmp_path / "b").exists()  # no stage ran, no bundle
