"""Both install modes put converters/, runtime/, tui/ and models/ under the edgepack package, nowhere else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import edgepack, edgepack.converters.pull, edgepack.runtime.base, edgepack.tui, edgepack.recipes as r; "
    "print(edgepack.__file__); print(edgepack.runtime.base.__file__); print(','.join(sorted(r.all_recipes())))"
)


def test_editable_install_maps_subpackages():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    pkg, runtime, recipes = r.stdout.split()
    assert Path(pkg).parent == ROOT / "edgepack"
    assert Path(runtime).parent == ROOT / "runtime"
    assert "smollm2-135m" in recipes.split(",")


@pytest.mark.slow
def test_wheel_installs_only_the_edgepack_package(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = dist.glob("edgepack-*.whl")
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    top = sorted(p.name for p in target.iterdir() if p.name != "bin")
    assert top == ["edgepack", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"]
    assert (target / "edgepack" / "models" / "smollm2-135m.toml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd="/", env=env)
    assert r.returncode == 0, r.stderr
    pkg, runtime, recipes = r.stdout.split()
    assert Path(pkg).parent == target / "edgepack"
    assert Path(runtime).parent == target / "edgepack" / "runtime"
    assert "gemma3-270m" in recipes.split(",")


def test_import_hides_only_torchaos_enum_notice():
    """torchao's import-time deprecation notice is filtered; other torch pytree warnings still show."""
    pytest.importorskip("torchao")
    code = (
        "import edgepack, logging, torchao\n"
        "logging.getLogger('torch.utils._pytree').warning('another pytree warning')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Enum subclass" not in done.stderr
    assert "another pytree warning" in done.stderr


def test_the_readme_installs_everything_and_the_base_is_the_runtime():
    """The README's two commands install ``.[all]``, which holds convert; the base install holds neither torch nor transformers."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "edgepack[convert,gptq,datasets,ray,s3]" in extras["all"] and "edgepack[convert]" in extras["gptq"]
    base = {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in project["dependencies"]}
    assert not base & {"torch", "transformers", "safetensors", "accelerate", "sentencepiece", "ml_dtypes", "onnx", "gptqmodel"}
    commands = re.findall(r"^```sh\n(.*)$", (ROOT / "README.md").read_text(), flags=re.M)[:2]
    assert [".[all]" in commands[0], ".[all,test]" in commands[1]] == [True, True], commands
