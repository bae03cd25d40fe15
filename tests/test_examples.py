"""The example method packages under examples/ as pip installs them: each package's module plus a dist-info
holding its pyproject's entry points, in a site folder of its own (as tests/test_plugins.py does for lora_l2).
The cheap test checks that clbench finds each method through its entry point and that it registers cleanly;
the slow one runs each package's own tests (contract, resume, properties) against that layout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from clbench import contract

EXAMPLES = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "examples").glob("*/pyproject.toml"))


def install(package: Path, site: Path) -> dict:
    """Lay ``package`` out in ``site`` as pip installs it; return its [project] table."""
    meta = tomllib.loads((package / "pyproject.toml").read_text())
    project = meta["project"]
    for module in meta["tool"]["setuptools"]["py-modules"]:
        shutil.copy(package / f"{module}.py", site)
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (dist / "entry_points.txt").write_text("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
                                                   for g, eps in project["entry-points"].items()))
    return project


def _python(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, check=False)


def test_examples_are_found_through_their_entry_points(tmp_path):
    assert {p.name for p in EXAMPLES} >= {"clbench-lora-l2", "clbench-lora-ewc"}
    site = tmp_path / "site"
    site.mkdir()
    names = []
    for package in EXAMPLES:
        project = install(package, site)
        names += list(project["entry-points"]["clbench"])
        for module in tomllib.loads((package / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]:
            for info in contract.load_plugin_file(package / f"{module}.py").methods.values():
                contract.check_registration(info.cls)
    out = _python(site, "-m", "clbench.cli", "methods", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in names:
        [line] = [ln for ln in out.stdout.splitlines() if ln.split()[:1] == [name]]
        assert f"entry point '{name} = " in line, line


@pytest.mark.slow
@pytest.mark.parametrize("package", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_each_examples_own_tests_pass_installed(tmp_path, package):
    site = tmp_path / "site"
    site.mkdir()
    install(package, site)
    out = _python(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
