"""Plugin discovery from the outside: an installed package (entry point), a plugins folder, and every way a
plugin can be broken (import error, unknown or misspelled hook, duplicate name): one clear error naming the
plugin and its source, while ``clbench methods`` still lists the others. Runs record which plugin produced
them (distribution and version, or file path and content hash).

The example package ``examples/clbench-lora-l2`` is laid out as pip would install it (its module and a
dist-info holding the entry points declared in its pyproject) in a temporary site folder put on ``sys.path``:
importlib.metadata then sees the distribution and its entry point exactly as after ``pip install``, in
milliseconds, without a build backend or network, and without touching the shared venv.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.methods.registry import discover
from clbench.testing import lora_plugin, write_plugin

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "clbench-lora-l2"


@pytest.fixture(scope="session")
def lora_l2_site(tmp_path_factory) -> Path:
    """The example package laid out as pip installs it: its module plus a dist-info (METADATA and the
    entry points of its pyproject), in a site folder of its own."""
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    project = meta["project"]
    site = tmp_path_factory.mktemp("lora-l2-site")
    for module in meta["tool"]["setuptools"]["py-modules"]:
        shutil.copy(EXAMPLE / f"{module}.py", site)
    groups = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
                     for group, eps in project["entry-points"].items())
    _dist_info(site, project["name"], project["version"], groups)
    return site


def _forget(prefix: str) -> None:
    for mod in [m for m in sys.modules if m.startswith(prefix)]:
        del sys.modules[mod]


@pytest.fixture
def lora_l2(lora_l2_site, monkeypatch):
    """clbench-lora-l2 'installed' for this test only."""
    monkeypatch.syspath_prepend(str(lora_l2_site))
    yield lora_l2_site
    _forget("clbench_lora_l2")


def _dist_info(site: Path, dist: str, version: str, entry_points: str) -> None:
    """A minimal installed distribution: METADATA plus entry_points.txt."""
    d = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (d / "entry_points.txt").write_text(entry_points)


GOOD = lora_plugin("dirlora")

HEADER = """
    from clbench.methods.hookspecs import hookimpl
    from clbench.methods.method import Method

    class Bad(Method):
        name = "bad"
"""

FOOTER = """
    def register_methods(register):
        register(Bad)
"""


# -- an installed package ---------------------------------------------------------------------------------


def test_entry_point_package_is_discovered_with_its_distribution(lora_l2):
    reg = discover()
    info = reg.get("lora_l2")
    assert info.cls.__module__ == "clbench_lora_l2"
    assert info.provenance["kind"] == "entry_point"
    assert (info.provenance["distribution"], info.provenance["version"]) == ("clbench-lora-l2", "0.1.0")
    assert "clbench-lora-l2 0.1.0" in info.source and "lora" in reg.methods


def test_cli_lists_the_package_and_its_params(lora_l2):
    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    assert "lora_l2" in res.output and "lora" in res.output
    res = CliRunner().invoke(app, ["methods", "lora_l2", "--params"])
    assert res.exit_code == 0, res.output
    assert "strength = 1.0: lambda of the L2 pull" in res.output


def test_example_package_own_tests_pass(lora_l2):
    """The tests the example package ships (contract + lora_l2's properties) pass against this clbench."""
    spec = importlib.util.spec_from_file_location("_lora_l2_tests", EXAMPLE / "tests" / "test_lora_l2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    names = [n for n in dir(mod) if n.startswith("test_")]
    assert {"test_contract", "test_the_pull_keeps_factors_near_the_previous_task"} <= set(names)
    for n in names:
        getattr(mod, n)()


# -- a plugins folder -------------------------------------------------------------------------------------


def test_plugins_dir_is_discovered_with_path_and_hash(tmp_path):
    path = write_plugin(tmp_path / "plugs", "dirlora", GOOD)
    info = discover([tmp_path / "plugs"]).get("dirlora")
    assert info.provenance["kind"] == "file"
    assert info.provenance["path"] == str(path)
    assert info.provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_files_starting_with_underscore_are_not_plugins(tmp_path):
    write_plugin(tmp_path / "plugs", "_helpers", "raise RuntimeError('must not be imported')\n")
    write_plugin(tmp_path / "plugs", "dirlora", GOOD)
    reg = discover([tmp_path / "plugs"])
    assert reg.errors == [] and "dirlora" in reg.methods


# -- broken plugins: one clear error, the others still listed --------------------------------------------


def test_duplicate_name_names_both_sources(tmp_path):
    write_plugin(tmp_path / "plugs", "dup", GOOD.replace('name = "dirlora"', 'name = "lora"'))
    with pytest.raises(ClbenchError) as err:
        discover([tmp_path / "plugs"])
    msg = str(err.value)
    assert "'lora' is registered twice" in msg
    assert (
        "entry point 'lora = clbench_plugins.lora'" in msg and f"file {tmp_path / 'plugs' / 'dup.py'}" in msg
    )


def test_duplicate_alias_is_refused(tmp_path):
    # Subclassing lora inherits its alias 'seqlora': a clash the author may not see.
    write_plugin(tmp_path / "plugs", "alias", GOOD.replace("aliases = ()", ""))
    with pytest.raises(ClbenchError, match="'seqlora' is registered twice"):
        discover([tmp_path / "plugs"])


@pytest.mark.parametrize(
    "hook, expected",
    [
        (
            "    @hookimpl\n    def before_tsak(self, model, ctx):\n        pass\n",
            "unknown hook 'before_tsak'",
        ),
        ("    def after_taks(self, model, ctx):\n        pass\n", "did you mean 'after_task'"),
        ("    def replay_bach(self, ctx):\n        pass\n", "did you mean 'replay_batch'"),
        ("    def training_sets(self, ctx):\n        pass\n", "did you mean 'training_set'"),
        (
            "    def merge_task(self, model, ctx):\n        pass\n",
            "'merge_task' looks like a hook but lacks the @hookimpl",
        ),
        ("    @hookimpl\n    def loss_terms(self, model, logitz):\n        pass\n", "logitz"),
    ],
)
def test_misdeclared_hook_fails_naming_plugin_and_hook(tmp_path, hook, expected):
    path = tmp_path / "plugs" / "bad.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(HEADER) + hook + textwrap.dedent(FOOTER))
    with pytest.raises(ClbenchError) as err:
        discover([path.parent])
    msg = str(err.value)
    assert expected in msg and f"file {path}" in msg and "method 'bad'" in msg
    assert "\n" not in msg


def test_hooks_of_a_base_class_count_as_the_method_s_own():
    """pluggy registers the hook implementations a method inherits (a mixin's, as the built-in methods'
    ``TrainedPart``), so the registry checks inherited hooks as it checks the class's own."""
    from clbench.methods.hookspecs import hookimpl
    from clbench.methods.method import Method
    from clbench.methods.registry import run_manager, validate_hooks

    class Part:
        @hookimpl
        def after_task(self, model, ctx):
            pass

    class Good(Part, Method):
        name = "good"

    validate_hooks(Good, "method 'good'")
    impls = run_manager(Good()).hook.after_task.get_hookimpls()
    assert [i.function.__func__ for i in impls if i.plugin_name == "method:good"] == [Part.after_task]

    class Undecorated:
        def task_updates(self, model, ctx):  # no @hookimpl: pluggy would never call it
            pass

    class Misspelt:
        def replay_bach(self, ctx):  # a misspelt hook, undecorated: pluggy says nothing
            pass

    with pytest.raises(ClbenchError, match="'task_updates' looks like a hook but lacks the @hookimpl"):
        validate_hooks(type("Bad", (Undecorated, Method), {"name": "bad"}), "method 'bad'")
    with pytest.raises(ClbenchError, match="'replay_bach' is not a hook; did you mean 'replay_batch'"):
        validate_hooks(type("Bad", (Misspelt, Method), {"name": "bad"}), "method 'bad'")


def test_broken_import_in_plugins_dir_is_one_line_and_others_still_listed(tmp_path, lora_l2):
    write_plugin(tmp_path / "plugs", "broken", "import no_such_module_xyz\n")
    write_plugin(tmp_path / "plugs", "dirlora", GOOD)
    with pytest.raises(ClbenchError, match=r"broken\.py: cannot be imported: ModuleNotFoundError"):
        discover([tmp_path / "plugs"])
    res = CliRunner().invoke(app, ["methods", "--plugins-dir", str(tmp_path / "plugs")])
    assert res.exit_code == 0, res.output
    listed = res.stdout
    assert all(n in listed for n in ("lora", "lora_l2", "dirlora"))
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and "broken.py: cannot be imported" in errors[0]
        and "no_such_module_xyz" in errors[0]
    )


def test_broken_entry_point_names_its_distribution(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _dist_info(site, "clbench-broken", "0.0.1", "[clbench]\nbroken = clbench_broken_xyz\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ClbenchError) as err:
        discover()
    assert "entry point 'broken = clbench_broken_xyz' (clbench-broken 0.0.1): cannot be imported" in str(
        err.value
    )
    reg = discover(strict=False)
    assert "lora" in reg.methods and len(reg.errors) == 1
    res = CliRunner().invoke(app, ["plugins"])
    assert res.exit_code == 0 and "clbench_plugins.lora" in res.stdout and "clbench-broken" in res.stderr


def test_run_with_a_broken_plugins_dir_fails_with_one_line(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_plugin(tmp_path / "plugs", "broken", "import no_such_module_xyz\n")
    suite = _suite(tmp_path, [{"name": "lora", "params": {"rank": 2}}], plugins_dir="plugs")
    res = CliRunner().invoke(app, ["run", str(suite), "--trust-suite-plugins"])
    assert res.exit_code == 1
    assert res.stderr.strip().count("\n") == 0 and "broken.py: cannot be imported" in res.stderr


MARKER_PLUGIN = """
from pathlib import Path
Path(__file__).with_name("ran.txt").write_text("imported")
""" + lora_plugin("marklora")


def test_suite_plugins_dir_runs_no_code_unless_the_command_line_allows_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_plugin(tmp_path / "plugs", "marker", MARKER_PLUGIN)
    ran = tmp_path / "plugs" / "ran.txt"
    suite = _suite(tmp_path, [{"name": "marklora", "params": {"rank": 2}}], plugins_dir="plugs")
    folder = str((tmp_path / "plugs").resolve())
    for extra in ([], ["--dry-run"]):  # a dry run imported the folder too
        res = CliRunner().invoke(app, ["run", str(suite), *extra])
        assert res.exit_code == 1 and not ran.exists(), res.output
        [line] = res.stderr.strip().splitlines()
        assert line.startswith("error:") and folder in line
        assert f"--plugins-dir {folder}" in line and "--trust-suite-plugins" in line
    # Allowed on the command line: the flag, or the same folder as --plugins-dir (loaded once, not twice).
    for allow in (["--trust-suite-plugins"], ["--plugins-dir", str(tmp_path / "plugs")], ["--plugins-dir", "plugs"]):
        ran.unlink(missing_ok=True)
        res = CliRunner().invoke(app, ["run", str(suite), "--dry-run", *allow])
        assert res.exit_code == 0 and ran.exists(), (allow, res.output)
        assert re.search(r"^  run +marklora ", res.stderr + res.stdout, re.M), res.output


# -- a suite run records its plugin's provenance ----------------------------------------------------------


def _suite(folder: Path, methods: list[dict], plugins_dir: str | None = None) -> Path:
    import yaml

    data = {
        "name": "plugins",
        "seeds": [0],
        "stream": {"name": "synthetic", "num_tasks": 2, "num_classes": 4, "samples_per_class": 8},
        "backbone": {"name": "vit_micro_clbench", "image_size": 16, "pretrained": False},
        "train": {"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 1},
        "runtime": {"device": "cpu"},
        "methods": methods,
        "tracking": {"experiment": "plugins"},
    }
    if plugins_dir:
        data["plugins_dir"] = plugins_dir
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_suite_runs_external_and_folder_plugins_and_records_provenance(
    tmp_path, mlflow_uri, monkeypatch, lora_l2
):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's local artifact root is relative to the working directory
    plugin = write_plugin(tmp_path / "plugs", "dirlora", GOOD)
    suite = _suite(
        tmp_path,
        [
            {"name": "lora_l2", "params": {"rank": 2, "strength": 0.5}},
            {"name": "dirlora", "params": {"rank": 2}},
        ],
        plugins_dir="plugs",
    )
    res = CliRunner().invoke(app, ["run", str(suite), "--trust-suite-plugins"])
    assert res.exit_code == 0, res.output
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("plugins")
    runs = {
        r.data.tags["clbench.method"]: r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("clbench.role") == "child"
    }
    assert set(runs) == {"lora_l2", "dirlora"}
    for r in runs.values():
        assert r.info.status == "FINISHED" and "final/acc" in r.data.metrics

    ep = runs["lora_l2"]
    assert "clbench-lora-l2 0.1.0" in ep.data.tags["clbench.plugin_source"]
    prov = json.loads(
        Path(client.download_artifacts(ep.info.run_id, "provenance.json", str(tmp_path))).read_text()
    )
    assert (prov["method"], prov["distribution"], prov["version"]) == ("lora_l2", "clbench-lora-l2", "0.1.0")
    assert prov["entry_point"] == "lora_l2 = clbench_lora_l2"
    assert ep.data.params["method.params.strength"] == "0.5"
    # the source digest of an installed package (issue 34 item 7): its one module (it builds on clbench's own
    # exports, which clbench's version covers)
    assert prov["code_digest"] == ep.data.tags["clbench.code_digest"] and prov["code_files"] == "1"

    fd = runs["dirlora"]
    assert fd.data.tags["clbench.plugin_source"] == f"file {plugin}"
    out = tmp_path / "dl"
    out.mkdir()
    prov = json.loads(
        Path(client.download_artifacts(fd.info.run_id, "provenance.json", str(out))).read_text()
    )
    assert prov["kind"] == "file" and prov["path"] == str(plugin)
    assert prov["sha256"] == hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert prov["code_digest"] == fd.data.tags["clbench.code_digest"] != ep.data.tags["clbench.code_digest"]


def test_an_editable_install_records_source_digest_git_commit_and_dirty_state(tmp_path, monkeypatch):
    """Issue 34 item 7: a `pip install -e` package is imported from its checkout, so an edit between two runs
    changes the code without changing name or version: provenance holds the digest of its source files and the
    checkout's commit and dirty state (an edit makes it dirty and moves the digest)."""
    import subprocess

    from clbench.methods.registry import code_identity

    repo = tmp_path / "checkout"
    write_plugin(repo / "src" / "edit_pkg", "__init__", "from edit_pkg.helpers import scale\n")
    write_plugin(repo / "src" / "edit_pkg", "helpers", "def scale():\n    return 1.0\n")
    write_plugin(repo / "src" / "edit_pkg", "method", lora_plugin("editlora") +
            "\nfrom edit_pkg.helpers import scale\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git[:5], "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.syspath_prepend(str(repo / "src"))  # what an editable install's .pth file does
    _dist_info(tmp_path / "site", "edit-pkg", "1.0", "[clbench]\neditlora = edit_pkg.method\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        info = discover().get("editlora")
        prov = info.full_provenance()
        assert (prov["distribution"], prov["git_commit"], prov["git_dirty"]) == ("edit-pkg", commit, "false")
        assert prov["code_files"] == "3"  # its module, the helper module it imports, the built-in base class
        (repo / "src" / "edit_pkg" / "helpers.py").write_text("def scale():\n    return 2.0\n")  # edited
        edited = code_identity(info.cls)
        assert edited["git_dirty"] == "true" and edited["code_digest"] != prov["code_digest"]
    finally:
        _forget("edit_pkg")


def test_exact_name_shows_only_that_method(lora_l2):
    # 'lora' is a substring of olora, inflora, eblora and lora_l2; the exact name must win.
    res = CliRunner().invoke(app, ["methods", "lora", "--params"])
    assert res.exit_code == 0, res.output
    headers = [line.split()[0] for line in res.stdout.splitlines() if not line.startswith(" ")]
    assert headers == ["lora"] and "fresh_per_task = False" in res.stdout


def test_an_unreadable_plugin_file_is_one_line(tmp_path, monkeypatch):
    from clbench.errors import ClbenchError
    from clbench.methods.registry import Registry

    path = write_plugin(tmp_path / "plugs", "locked", GOOD)
    real = Path.read_bytes

    def locked(self):
        if self == path:  # chmod 000 does not stop root, so the refusal is simulated
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", locked)
    with pytest.raises(ClbenchError, match=r"locked.py: cannot be read \(Permission denied\)"):
        Registry().load_dir(tmp_path / "plugs")


# --- the plugin API is the only door (issue 33, item 9) ---------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TEST_HELPERS = {"clbench.testing", "clbench.contract"}  # public modules for a plugin's own tests


def _clbench_imports(path: Path) -> list[str]:
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "clbench":
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "clbench"]
    return found


def test_plugins_and_examples_import_only_the_public_clbench_names():
    """Built-ins (plugins/) and the example packages import ``clbench`` only (the names of ``clbench.__all__``);
    their tests may also use the public test helpers. (lint-imports holds the same rule for plugins/.)"""
    files = [*ROOT.glob("plugins/**/*.py"), *ROOT.glob("examples/*/*.py"), *ROOT.glob("examples/*/tests/*.py")]
    assert len(files) > 15
    bad = []
    for path in files:
        allowed = {"clbench"} | (TEST_HELPERS if path.parent.name == "tests" else set())
        bad += [f"{path.relative_to(ROOT)}: {m}" for m in _clbench_imports(path) if m not in allowed]
    assert not bad, "import these through `from clbench import ...`:\n" + "\n".join(bad)


def test_every_type_a_hook_spec_names_is_public():
    """Every clbench type the hook specs' annotations name (imported by clbench.methods.hookspecs) is a public name, and
    so is CLModel, the base class configure_model's replacement must have."""
    import ast
    import inspect

    import clbench
    from clbench.methods import hookspecs

    named = {a.asname or a.name for node in ast.walk(ast.parse(inspect.getsource(hookspecs)))
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clbench") for a in node.names}
    assert {"TaskContext", "LowRank", "Samples", "Replayed"} <= named
    assert named - {"hookimpl"} <= set(clbench.__all__) - {"hookimpl"}
    assert "CLModel" in clbench.__all__
    assert clbench.__all__ == sorted(clbench._PUBLIC)
    for name in clbench.__all__:
        assert getattr(clbench, name) is not None, name
