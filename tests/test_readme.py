"""The README's commands work as a new user types them, after the README's own set-up.

The set-up lines must leave the virtual environment active (so that the bare ``clbench`` of every later
command is on PATH). After them, every command of the README's ``bash`` blocks is classified:

* run as typed, in a shell whose PATH starts with this environment's ``bin`` (what ``. .venv/bin/activate``
  does), in a working folder holding the README's default store ``mlflow.db`` and a link to ``suites/``:
  ``clbench leaderboard ...``, ``clbench methods``, ``clbench plugins``, ``clbench new-method ...``,
  ``clbench check ...`` and every
  ``clbench run ... --dry-run``;
* run with ``--dry-run`` appended: the training commands (``clbench run SUITE ...``), which validate the suite,
  the overrides and the plugins and print the plan instead of training for hours;
* parsed only (options and arguments checked by the CLI's own parser): ``clbench ui`` (a server),
  ``clbench run --executor ray`` (needs a cluster) and ``torchrun ... -m clbench.cli ...``.

A command of another kind fails the test, so that a new README command gets classified here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CONTRIBUTING = REPO / "CONTRIBUTING.md"
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
VENV_SETUP = "python3 -m venv .venv"
ACTIVATE = ([".", ".venv/bin/activate"], ["source", ".venv/bin/activate"])


def bash_blocks(guide: Path = README) -> list[str]:
    return BLOCK.findall(guide.read_text())


def setup_lines() -> list[str]:
    return [ln for b in bash_blocks() for ln in b.splitlines() if ln.startswith(VENV_SETUP)]


def later_commands() -> list[list[str]]:
    """Every command after the set-up, as argv (comments dropped)."""
    out = []
    for block in bash_blocks():
        for line in block.splitlines():
            if line.startswith(VENV_SETUP) or not line.strip():
                continue
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(argv)
    return out


def test_setup_lines_activate_the_environment_before_using_it():
    lines = setup_lines()
    assert len(lines) >= 2, lines  # the quickstart and the tests (and the CPU-wheels variant)
    for line in lines:
        steps = [shlex.split(step) for step in line.split("&&")]
        assert steps[0] == shlex.split(VENV_SETUP), line
        assert steps[1] in ACTIVATE, f"the set-up must activate .venv right after creating it: {line}"
        for step in steps[2:]:
            assert step[0] in ("pip", "clbench", "python"), f"{step[0]} after the activation: {line}"
    assert ".venv/bin/" not in README.read_text().replace(".venv/bin/activate", ""), \
        "the README mixes .venv/bin/X with bare commands; after activation use the bare ones"


def classify(argv: list[str]) -> tuple[str, list[str]]:
    """('run' | 'dry-run' | 'parse' | 'env', the clbench arguments)."""
    if argv[0] == "export":
        return "env", argv[1:]
    if argv[0] == "torchrun":
        i = argv.index("-m")
        assert argv[i + 1] == "clbench.cli", argv
        return "parse", argv[i + 2:]
    assert argv[0] == "clbench", f"unclassified README command: {shlex.join(argv)}"
    args = argv[1:]
    if args[0] in ("leaderboard", "methods", "plugins", "new-method", "check"):
        return "run", args
    if args[0] in ("run", "sweep"):  # a sweep trains like a run: its --dry-run validates and prints the points
        if "--executor" in args and args[args.index("--executor") + 1] == "ray":
            return "parse", args
        return ("run", args) if "--dry-run" in args else ("dry-run", args)
    if args[0] == "ui":
        return "parse", args
    raise AssertionError(f"unclassified README command: {shlex.join(argv)}")


def test_every_later_command_is_classified():
    kinds = [classify(argv)[0] for argv in later_commands()]
    assert kinds.count("run") >= 5 and "dry-run" in kinds and "parse" in kinds, kinds


def _store(folder: Path) -> None:
    """The README's default store (./mlflow.db) with a finished run of the suites its commands name."""
    from clbench.store.tracking import MlflowTracker
    from clbench.suite import load_suite

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    # each suite's own method labels (the claim suite's arms share none with the quickstart, as in a real store)
    for suite_file, accs, labels in (("quickstart.yaml", (61.0, 70.5), ("lora", "inflora")),
                                     ("vit.yaml", (80.0, 85.0), ("lora", "inflora")),
                                     ("claim.yaml", (40.0, 41.0), ("keep", "flat"))):
        suite = load_suite(REPO / "suites" / suite_file)
        tracker = MlflowTracker(suite.tracking.experiment or suite.name, uri)
        tags = {"clbench.suite": suite.name, "clbench.suite_hash": suite.protocol_hash()}
        parent = tracker.start_run(suite.name, {**tags, "clbench.role": "parent"}, {})
        for method, acc in zip(labels, accs):
            child = tracker.start_run(f"{method}-s0", {**tags, "clbench.role": "child", "clbench.method": method,
                                                       "clbench.method_name": method, "clbench.seed": "0"},
                                      {"seed": 0}, parent=parent)
            tracker.log_metrics(child, {"final/acc": acc, "final/avg_acc": acc + 5, "final/forgetting": 100 - acc,
                                        "eval/acc": acc}, step=1)
            tracker.end_run(child)
        tracker.end_run(parent)


@pytest.mark.slow  # ~50 s of CPU (a dozen `clbench` processes); the parse test below is the cheap cover
def test_readme_commands_run_as_typed_after_setup(tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "suites").symlink_to(REPO / "suites")
    _store(work)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the README's default store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # what activation does
    env["HOME"] = str(tmp_path / "home")  # the README's ~/myplugins lands here
    script = []
    for argv in later_commands():
        kind, args = classify(argv)
        argv = [a.replace("/tmp/clbench/", f"{tmp_path}/tmp/clbench/") for a in argv]  # the README's report folder
        if kind == "run":
            script.append(shlex.join(argv))
        elif kind == "dry-run":
            script.append(shlex.join([*argv, "--dry-run"]))
    # a user's shell expands the README's ~: unquote the ~/PATH words shlex.join quoted (both quotes)
    script = [re.sub(r"'~/([^' ]*)'", r"~/\1", c) for c in script]
    # one shell, the commands one after the other, stopping at the first failure (as a user would)
    echoed = "\n".join(f"echo {shlex.quote('$ ' + c)} >&2\n{c}" for c in script)  # c may hold quotes
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", echoed], cwd=work, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"{res.stderr[-3000:]}\n{res.stdout[-2000:]}"
    assert "Traceback" not in res.stderr
    assert "inflora" in res.stdout and "80.00" in res.stdout  # leaderboards read the store
    assert "\n|" in res.stdout  # the --format markdown one
    assert (tmp_path / "tmp" / "clbench" / "quickstart.html").read_text().count("<img") >= 1
    assert "no ranks across these 2 suites" in (tmp_path / "tmp" / "clbench" / "ranks.html").read_text()
    assert (tmp_path / "home" / "myplugins" / "mymethod.py").is_file()
    assert len(re.findall(r"^  run ", res.stderr, re.M)) >= 3  # the dry runs printed their plans
    left = {p.name for p in work.iterdir()}
    assert left <= {"mlflow.db", "mlruns", "suites"}, left  # no report or plugin folder left in the checkout


@pytest.mark.parametrize("argv", [a for a in later_commands() if classify(a)[0] == "parse"], ids=shlex.join)
def test_heavy_readme_commands_parse(argv):
    import click
    import typer

    from clbench.cli import app

    _, args = classify(argv)
    command = typer.main.get_command(app)
    try:
        with command.make_context("clbench", list(args), resilient_parsing=False) as ctx:
            sub = command.get_command(ctx, args[0])
            assert sub is not None, args[0]
            sub.make_context(args[0], list(args[1:]), parent=ctx)
    except click.UsageError as exc:
        pytest.fail(f"{shlex.join(argv)}: {exc}")


def guide_commands(guide: Path) -> list[list[str]]:
    """Every command of a guide's ``bash`` blocks, split at ``&&`` and subshell parentheses, as argv."""
    out = []
    for block in bash_blocks(guide):
        for line in block.replace("\\\n", " ").splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            argv: list[str] = []
            for token in [*lex, "&&"]:
                if token in ("&&", "||", ";", "(", ")", "|"):
                    if argv:
                        out.append(argv)
                    argv = []
                else:
                    argv.append(token)
    return out


WRITES = ("--dir", "--tests-dir", "--output", "-o")  # options naming a folder or file a command writes
OUTSIDE = ("~/", "~", "/tmp/")


def _outside(path: str) -> bool:
    return path == "~" or path.startswith(("~/", "/tmp/"))


@pytest.mark.parametrize("guide", [README, CONTRIBUTING], ids=lambda p: p.name)
def test_guide_commands_write_nothing_into_the_checkout(guide):
    """A reader runs the guides' commands in the checkout: whatever they write (new-method's folders, reports,
    editable installs of a generated package) goes to ~ or /tmp; the plugins folders they load are the same
    ones; the paths pytest reads are the checkout's own files or those folders."""
    checked = 0
    for argv in guide_commands(guide):
        tool = argv[0]
        for opt, value in zip(argv, argv[1:]):
            if opt in WRITES:
                assert _outside(value), f"{guide.name}: {shlex.join(argv)} writes {value} into the checkout"
                checked += 1
            if opt == "--plugins-dir":  # your own plugins live outside; the checkout's example is read in place
                assert _outside(value) or (REPO / value).is_dir(), f"{guide.name}: {shlex.join(argv)}"
                checked += 1
        if tool == "pip" and "-e" in argv:
            target = argv[argv.index("-e") + 1]
            # the checkout's own packages (clbench, the example) install in place; a generated one lives outside
            assert _outside(target) or (REPO / target.split("[")[0]).is_dir(), shlex.join(argv)
            checked += 1
        if tool == "pytest":
            for arg in (a for a in argv[1:] if not a.startswith("-") and "/" in a):
                assert _outside(arg) or (REPO / arg.split("::")[0]).exists(), f"{guide.name}: {shlex.join(argv)}"
                checked += 1
    assert checked >= (3 if guide is CONTRIBUTING else 4), checked


def _checkout_mirror(folder: Path) -> set[str]:
    """A working folder that looks like the checkout (links to its top-level entries): pytest finds the same
    configuration there. Returns the names it starts with."""
    folder.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".git", ".venv") and not entry.name.startswith("."):
            (folder / entry.name).symlink_to(entry)
    return {p.name for p in folder.iterdir()}


@pytest.mark.slow  # ~40 s of CPU: the generated plugin's own tests and the contract; the static check above is the
#                    cheap cover
def test_contributing_scaffold_commands_run_as_typed(tmp_path):
    """CONTRIBUTING's section 1 (a plugin in ~/myplugins, its generated test, its params), the package scaffold
    and the contract check on the plugin, typed in the checkout: each works, and the checkout is left as it was."""
    work = tmp_path / "checkout"
    before = _checkout_mirror(work)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # what activation does
    env["HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    section1 = bash_blocks(CONTRIBUTING)[1]  # after the set-up block
    assert "new-method mymethod" in section1, section1
    script = [ln.split(" #", 1)[0].strip() for ln in section1.splitlines() if ln.strip() and not ln.startswith("#")]
    package = next(ln for b in bash_blocks(CONTRIBUTING) for ln in b.splitlines() if "--package" in ln)
    script.append(package.split(" #", 1)[0].strip())
    check = next(ln for b in bash_blocks(CONTRIBUTING) for ln in b.splitlines()
                 if ln.startswith("clbench check mymethod --plugins-dir"))
    script.append(check.split(" #", 1)[0].strip())
    echoed = "\n".join(f"echo {shlex.quote('$ ' + c)} >&2\n{c}" for c in script)
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", echoed], cwd=work, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, f"{res.stderr[-3000:]}\n{res.stdout[-2000:]}"
    assert "Traceback" not in res.stderr and " passed" in res.stdout and "FAIL" not in res.stdout
    home = tmp_path / "home"
    assert (home / "myplugins" / "mymethod.py").is_file() and (home / "clbench-mypackage" / "pyproject.toml").is_file()
    left = {p.name for p in work.iterdir()} - before
    assert not left, left  # nothing written into the checkout
