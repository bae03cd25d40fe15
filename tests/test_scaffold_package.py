"""``clbench new-method NAME --package``: an installable package folder whose pyproject declares the method in
the ``clbench`` entry-point group, so ``pip install -e`` works as generated and its tests (contract, resume,
the entry point) pass; and ``clbench.testing``'s resume helper, which the contract's resume check is built on.

The cheap tests read the generated pyproject and lay the package out as pip installs it (module plus a
dist-info with its entry points, as tests/test_plugins.py does for the lora_l2 example); the slow one really
runs ``pip install -e`` into a throwaway environment and the generated tests in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from clbench_plugins.lora import NaiveLoRA
from typer.testing import CliRunner

from clbench import contract
from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.methods.hookspecs import hookimpl
from clbench.scaffold import new_package
from clbench.testing import assert_resumes, compare_resume


def test_the_package_declares_the_real_entry_point_group(tmp_path):
    res = CliRunner().invoke(app, ["new-method", "my-pull", "--package", "--dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    root = tmp_path / "clbench-my-pull"
    files = ["pyproject.toml", "README.md", "clbench_my_pull.py", "tests/test_my_pull.py"]
    assert res.stdout.split() == [w for f in files for w in ("wrote", str(root / f))]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    # the group clbench itself registers its built-ins in (its own pyproject) is the one the package uses
    ours = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    group = next(iter(ours["project"]["entry-points"]))
    assert meta["project"]["entry-points"] == {group: {"my-pull": "clbench_my_pull"}}
    assert meta["project"]["name"] == "clbench-my-pull" and meta["tool"]["setuptools"]["py-modules"] == [
        "clbench_my_pull"]
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    assert any(d.startswith("clbench>=") for d in meta["project"]["dependencies"])
    assert (root / meta["project"]["readme"]).is_file()  # setuptools refuses a missing readme
    cls = contract.load_plugin_file(root / "clbench_my_pull.py").get("my-pull").cls
    contract.check_registration(cls)
    test = (root / "tests" / "test_my_pull.py").read_text()
    assert "from clbench_my_pull import MyPull as METHOD" in test and "assert_resumes(METHOD" in test


def test_laid_out_as_installed_clbench_finds_it_by_its_entry_point(tmp_path):
    """The generated pyproject's entry point, in a dist-info as pip writes it: `clbench methods NAME` finds the
    method without --plugins-dir (in a subprocess: the registry is per process)."""
    new_package("my-pull", tmp_path)
    root = tmp_path / "clbench-my-pull"
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site"
    dist = site / "clbench_my_pull-0.1.0.dist-info"
    dist.mkdir(parents=True)
    shutil.copy(root / "clbench_my_pull.py", site)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    (dist / "entry_points.txt").write_text("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
                                                   for g, eps in meta["entry-points"].items()))
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-m", "clbench.cli", "methods", "my-pull"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr
    assert "my-pull" in out.stdout and "entry point 'my-pull = clbench_my_pull' (clbench-my-pull 0.1.0)" in out.stdout


def test_package_refusals(tmp_path):
    new_package("mine", tmp_path)
    with pytest.raises(ClbenchError, match="clbench-mine/pyproject.toml already exists"):
        new_package("mine", tmp_path)
    with pytest.raises(ClbenchError, match="a method 'lora' already exists"):
        new_package("lora", tmp_path / "x")
    res = CliRunner().invoke(app, ["new-method", "other", "--package", "--tests-dir", str(tmp_path / "t")])
    assert res.exit_code == 1 and "--tests-dir does not go with --package" in res.stderr


@pytest.mark.slow
def test_pip_install_e_and_the_generated_tests_pass(tmp_path):
    """The real thing: a throwaway environment that sees this one's packages, `pip install -e` of the generated
    folder, then its generated tests (entry point, contract, resume, property) with pytest."""
    new_package("my-pull", tmp_path)
    root = tmp_path / "clbench-my-pull"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    here = sysconfig.get_paths()["purelib"]  # clbench, torch, pip and setuptools come from this environment
    Path(purelib, "zz_parent.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(root)],
                         capture_output=True, text=True, check=False)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    out = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=root, capture_output=True,
                         text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "4 passed" in out.stdout


class Anchored(NaiveLoRA):
    """A pull towards the factors at the end of the previous task, kept as method state."""

    name, aliases = "anchored", ()

    def _live(self):
        return {f"{n}.{k}": p for n, s in self.sites.items() for k, p in s.branches[0].named_parameters()}

    @hookimpl
    def after_task(self, model, ctx):
        self.anchor = {k: p.detach().clone() for k, p in self._live().items()}

    @hookimpl
    def loss_terms(self, model, batch, logits, ctx):
        if not getattr(self, "anchor", None):
            return None
        return {"pull": 10.0 * sum(((p - self.anchor[k]) ** 2).sum() for k, p in self._live().items())}

    @hookimpl
    def method_state(self, ctx):
        return {"anchor": self.anchor}

    @hookimpl
    def load_method_state(self, model, state, ctx):
        self.anchor = dict(state["anchor"])


class Lossy(Anchored):
    name = "lossy"

    @hookimpl
    def load_method_state(self, model, state, ctx):
        pass  # drops the anchor: the resumed task trains without the pull


def test_resume_helper_catches_state_that_is_not_restored():
    """``testing.assert_resumes``: a method whose state does not survive the checkpoint fails it, naming the
    task that trained differently; the same method restoring its state passes."""
    ok = assert_resumes(Anchored, {"rank": 2}, after=1, num_tasks=2)
    assert ok.checkpoint["next_task"] == 1 and ok.checkpoint["method"]["anchor"]  # came back weights_only
    assert ok.mismatch() is None and len(ok.full) == len(ok.resumed) == 1
    with pytest.raises(AssertionError, match=r"resumed after task 0: task 1 trains differently.*pull"):
        assert_resumes(Lossy, {"rank": 2}, after=1, num_tasks=2)
    # a factory works too; params beside a factory are refused rather than silently dropped
    assert compare_resume(lambda: Anchored({"rank": 2}), after=1, num_tasks=2).mismatch() is None
    with pytest.raises(TypeError, match="params go with a method class"):
        compare_resume(lambda: Anchored(), {"rank": 2})
