"""The ``clbench`` command line: thin typer wrappers over importable functions.

Every user error is a :class:`ClbenchError`; it prints one line on stderr and exits with code 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from clbench import keys
from clbench.errors import ClbenchError

# rich_markup_mode=None: plain click help, which keeps brackets ('clbench[ray]') that rich markup would eat
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="clbench: continual low-rank adaptation benchmark")


def _fail(msg: str) -> None:
    """One line on stderr and exit code 1. Under torchrun every rank meets the same error: rank 0 says it once,
    the other ranks exit 1 silently (torchrun then prints its own summary of the failed ranks: ChildFailedError
    with a traceback of torchrun itself, which no child process can suppress)."""
    _say_error(msg)
    raise typer.Exit(1)


def _say_error(msg: str) -> None:
    """The line of :func:`_fail` without ending the command (a suite group runs its other suites)."""
    from clbench.run import distributed

    if not distributed.is_follower():
        typer.echo(f"error: {msg}", err=True)
    if distributed.active() and distributed.rank() == 0:
        typer.echo("(torchrun: the ChildFailedError report torchrun prints next is its own account of this exit "
                   "code; the error is the line above)", err=True)


def _progress(msg: str) -> None:
    """Render one progress event (clbench.run.progress) on stderr: the overall counter across runs as a rule."""
    from clbench.run.progress import RunStarted

    if isinstance(msg, RunStarted):
        from rich.console import Console

        Console(stderr=True, highlight=False).rule(msg, style="cyan")
    else:
        typer.echo(msg, err=True)


@app.command()
def run(
    suite: Path = typer.Argument(..., metavar="SUITE", help="suite YAML file"),
    method: list[str] = typer.Option([], "--method", "-m", metavar="NAME",
                                     help="run only these methods (label or name)"),
    seed: list[int] = typer.Option([], "--seed", "-s", metavar="N", help="run only these seeds"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a suite key: key.path=value"),
    add_method: list[str] = typer.Option([], "--add-method", metavar="YAML",
                                         help="append a method entry (flow YAML) to the suite's methods, e.g. "
                                              "'{name: lora, label: lora-r8, params: {rank: 8}}'"),
    plugins_dir: list[str] = typer.Option([], "--plugins-dir", metavar="DIR",
                                          help="load method plugins from this folder"),
    trust_suite_plugins: bool = typer.Option(False, "--trust-suite-plugins",
                                             help="load the suite file's plugins_dir (runs the Python code in it)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the plan, train nothing"),
    restart: bool = typer.Option(False, "--restart", help="ignore checkpoints and finished runs: start fresh runs"),
    checkpoint_dir: str | None = typer.Option(None, "--checkpoint-dir", metavar="DIR",
                                                 help="where run checkpoints live (default: <cache>/runs)"),
    executor: str = typer.Option("local", "--executor", metavar="local|ray",
                                 help="local (one run after the other, here) or ray (each (method, seed) a Ray "
                                      "task; pip install 'clbench[ray]')"),
    address: str | None = typer.Option(None, "--address", metavar="ADDRESS",
                                       help="Ray cluster address (default: start a local one); with --executor ray"),
    ray_gpus_per_run: float | None = typer.Option(None, "--ray-gpus-per-run", metavar="GPUS",
                                                     help="GPUs per Ray task (default: 1 if the cluster has GPUs)"),
    ray_cpus_per_run: float = typer.Option(1.0, "--ray-cpus-per-run", metavar="CPUS", help="CPUs per Ray task"),
    ray_max_retries: int = typer.Option(3, "--ray-max-retries", metavar="N",
                                        help="times Ray retries a run whose worker died (it resumes from its "
                                             "checkpoint; the checkpoint dir must be shared by the nodes)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", metavar="URI",
                                               help="the MLflow store results go to (wins over "
                                                    "MLFLOW_TRACKING_URI, which wins over the suite's tracking.uri)"),
) -> None:
    """Train every method of SUITE through its stream and log everything to MLflow.

    After every task a checkpoint is written; running the same command again after a crash or Ctrl-C
    continues each unfinished (method, seed) in its MLflow run and skips finished ones.

    SUITE may be a suite group file ({group: NAME, suites: [files]}): every member suite runs in order with the
    same options; the exit code is 1 if any of them failed, after the others ran."""
    from clbench.suite import SEED_MAX, load_suite, suite_files

    try:
        bad_seeds = [x for x in seed if not 0 <= x <= SEED_MAX]
        if bad_seeds:
            raise ClbenchError(f"--seed {bad_seeds[0]}: a seed must be in 0..{SEED_MAX}")
        members = suite_files(suite)
        if len(members) > 1 or members[0] != suite:  # a group: every member valid before any of them runs
            for member in members:
                load_suite(member, set_, add_method)
    except ClbenchError as exc:
        _fail(str(exc))
    args = _RunArgs(method=method, seed=seed, set_=set_, add_method=add_method, plugins_dir=plugins_dir,
                    trust_suite_plugins=trust_suite_plugins, dry_run=dry_run, restart=restart,
                    checkpoint_dir=checkpoint_dir, executor=executor, address=address,
                    ray_gpus_per_run=ray_gpus_per_run, ray_cpus_per_run=ray_cpus_per_run,
                    ray_max_retries=ray_max_retries, tracking_uri=tracking_uri)
    if members == [suite]:
        if not _run_one(suite, args):
            raise typer.Exit(1)
        return
    failed = []
    for i, member in enumerate(members, 1):
        _progress(f"suite {i}/{len(members)} of group {suite}: {member}")
        if not _run_one(member, args):
            failed.append(str(member))
    if failed:
        _fail(f"{suite}: {len(failed)} of {len(members)} suites failed ({', '.join(failed)}); see their lines above")


@dataclass(frozen=True, kw_only=True)
class _RunArgs:
    """The options of one ``clbench run`` command, as its typer signature names them (each member of a suite
    group runs with the same)."""

    method: list[str]
    seed: list[int]
    set_: list[str]
    add_method: list[str]
    plugins_dir: list[str]
    trust_suite_plugins: bool
    dry_run: bool
    restart: bool
    checkpoint_dir: str | None
    executor: str
    address: str | None
    ray_gpus_per_run: float | None
    ray_cpus_per_run: float
    ray_max_retries: int
    tracking_uri: str | None


def _run_one(suite: Path, args: _RunArgs) -> bool:
    """``clbench run`` of one suite file: False when it failed (its error line printed) or a run did not finish."""
    from clbench.run.executors import make_executor
    from clbench.run.preflight import preflight
    from clbench.run.runner import RunOptions, run_suite
    from clbench.store.tracking import results_store
    from clbench.suite import load_suite

    try:
        s = load_suite(suite, args.set_, args.add_method)
        ex = make_executor(args.executor, args.address, args.ray_gpus_per_run, args.ray_cpus_per_run,
                           args.ray_max_retries)
        if not args.dry_run:
            preflight(s)  # before any MLflow run exists: missing data or weights leave nothing behind
        store = results_store(s, args.tracking_uri)  # before the tracker sets MLFLOW_TRACKING_URI (MLflow does)
        opts = RunOptions(methods=args.method or None, seeds=args.seed or None, plugins_dirs=args.plugins_dir,
                          progress=_explaining_progress(), dry_run=args.dry_run, restart=args.restart,
                          checkpoint_dir=args.checkpoint_dir, executor=ex,
                          trust_suite_plugins=args.trust_suite_plugins, tracking_uri=args.tracking_uri)
        records = run_suite(s, str(suite), opts)
    except ClbenchError as exc:
        _say_error(str(exc))
        return False
    except KeyboardInterrupt:
        _fail("interrupted; runs marked KILLED; run the same command again to resume from the last finished task")
    except SystemExit as exc:  # plugin code outside a hook (hooks' exits fail their run: clbench.hookcheck)
        _say_error(f"plugin code ended the process with SystemExit({exc.code!r}); the runs it left are marked "
                   "FAILED")
        return False
    if records:
        typer.echo(f"{'method':<24} {'seed':>4} {'status':<9} {keys.FINAL_ACC:>9} {'forgetting':>10}")
        for r in records:
            acc = r.metrics.get(keys.FINAL_ACC, float("nan"))
            fgt = r.metrics.get(keys.FINAL_FORGETTING, float("nan"))
            typer.echo(f"{r.method:<24} {r.seed:>4} {r.status:<9} {acc:>9.2f} {fgt:>10.2f}")
        for line in next_steps(s, suite, *store):
            typer.echo(line)
    return all(r.status == "FINISHED" for r in records)


@app.command()
def sweep(
    suite: Path = typer.Argument(..., metavar="SUITE", help="suite YAML file"),
    method: str = typer.Option(..., "--method", "-m", metavar="LABEL", help="the method entry to tune (label or "
                                                                            "name)"),
    grid: list[str] = typer.Option([], "--grid", metavar="KEY=[v1,v2]",
                                   help="a search dimension: methods.LABEL.params.NAME, methods.LABEL.train.NAME or "
                                        "train.NAME (the --set syntax) with a list of values; with --random also "
                                        "uniform(a,b), loguniform(a,b) or int(a,b); repeatable (cartesian product)"),
    random_n: int | None = typer.Option(None, "--random", metavar="N",
                                        help="sample N points of the search space (seeded by --seed) instead of "
                                             "the whole grid"),
    metric: str = typer.Option("val/acc", "--metric", metavar="KEY", help="the validation metric that picks the "
                                                                          "best point (val/acc, val/forgetting, ...)"),
    seed: int | None = typer.Option(None, "--seed", "-s", metavar="N",
                                    help="the trials' run seed and the sampler's seed (default: the suite's first)"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a suite key: key.path=value"),
    then_test_: bool = typer.Option(False, "--then-test", help="then run the best point on the test protocol "
                                                                "with the suite's seeds, as LABEL-tuned"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the points, train nothing"),
    restart: bool = typer.Option(False, "--restart", help="forget this sweep's finished and unfinished points: "
                                                          "run them all afresh"),
    plugins_dir: list[str] = typer.Option([], "--plugins-dir", metavar="DIR",
                                          help="load method plugins from this folder"),
    trust_suite_plugins: bool = typer.Option(False, "--trust-suite-plugins",
                                             help="load the suite file's plugins_dir (runs the Python code in it)"),
    checkpoint_dir: str | None = typer.Option(None, "--checkpoint-dir", metavar="DIR",
                                                 help="where run checkpoints live (default: <cache>/runs)"),
    executor: str = typer.Option("local", "--executor", metavar="local|ray",
                                 help="local (one trial after the other, here) or ray (each trial a Ray task)"),
    address: str | None = typer.Option(None, "--address", metavar="ADDRESS",
                                       help="Ray cluster address (default: start a local one); with --executor ray"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", metavar="URI",
                                               help="the MLflow store results go to (wins over "
                                                    "MLFLOW_TRACKING_URI, which wins over the suite's tracking.uri)"),
) -> None:
    """Choose METHOD's hyperparameters on the validation split of SUITE (held-out training data, never a test
    image): every point is a child run of one sweep parent in MLflow, metrics under val/. Prints a table of the
    points and, last, `best: KEY=VALUE ... val/acc=X`. Running the same command again skips finished points."""
    from clbench.run.executors import make_executor
    from clbench.run.preflight import preflight
    from clbench.run.sweep import SweepOptions, best_line, plan_lines, run_sweep, table_lines
    from clbench.suite import SEED_MAX

    try:
        if seed is not None and not 0 <= seed <= SEED_MAX:
            raise ClbenchError(f"--seed {seed}: a seed must be in 0..{SEED_MAX}")
        opts = SweepOptions(random_n=random_n, metric=metric, seed=seed, plugins_dirs=plugins_dir,
                            trust_suite_plugins=trust_suite_plugins)
        plan = _plan_sweep(suite, set_, method, grid, opts, download=not dry_run)
        ex = make_executor(executor, address)
        if dry_run:
            for line in plan_lines(plan):
                typer.echo(line)
            return
        preflight(plan.suite)  # before any MLflow run exists
        result = run_sweep(plan, executor=ex, checkpoint_dir=checkpoint_dir, progress=_explaining_progress(),
                           restart=restart, tracking_uri=tracking_uri)
        for line in table_lines(result):
            typer.echo(line)
        if result.best is None:
            raise ClbenchError(f"sweep {plan.sweep_id}: no point finished with {plan.metric}; see the FAILED "
                               "trials above, fix them and run the same command again")
        tested = _then_test(result, ex, checkpoint_dir, tracking_uri) if then_test_ else []
        typer.echo(best_line(result))
    except ClbenchError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; trials marked KILLED; run the same command again to continue the sweep")
    except SystemExit as exc:  # plugin code outside a hook (hooks' exits fail their run: clbench.hookcheck)
        _fail(f"plugin code ended the process with SystemExit({exc.code!r}); the trials it left are marked FAILED")
    if any(r.status != "FINISHED" for r in [*result.records, *tested]):
        raise typer.Exit(1)


def _plan_sweep(suite: Path, set_: list[str], method: str, grid: list[str], opts, download: bool):
    """The sweep's plan. Its id hashes the suite, which covers the checksum of the weights its runs load: with
    ``download``, planned again once they are downloaded, so the first and every later call name the same sweep."""
    from clbench.model.backbones import fetch_hub_weights
    from clbench.run.sweep import plan_sweep
    from clbench.suite import load_suite

    s = load_suite(suite, set_)
    plan = plan_sweep(s, str(suite), method, grid, opts)
    if download and fetch_hub_weights(s.backbone.name, s.backbone.pretrained, s.backbone.checkpoint):
        plan = plan_sweep(s, str(suite), method, grid, opts)
    return plan


def _then_test(result, executor, checkpoint_dir: str | None, tracking_uri: str | None) -> list:
    """``--then-test``: the best point on the test protocol with the suite's seeds; one line per run."""
    from clbench.run.sweep import then_test

    tested = then_test(result, executor=executor, checkpoint_dir=checkpoint_dir, progress=_explaining_progress(),
                       tracking_uri=tracking_uri)
    for r in tested:
        typer.echo(f"tuned {r.method} seed {r.seed}: {r.status} {keys.FINAL_ACC} "
                   f"{r.metrics.get(keys.FINAL_ACC, float('nan')):.2f}")
    return tested


ACC_LEGEND = ("acc: class-incremental accuracy (every task's head competes); til: task-incremental accuracy "
              "(each test image scored by its own task's head only); forgetting: mean drop of each earlier task "
              "from its best accuracy to its final one (points)")


def _explaining_progress() -> Callable[[str], None]:
    """Progress on stderr that explains acc / til / forgetting right before the first line showing them."""
    shown = False

    from clbench.run.progress import TaskDone

    def say(msg: str) -> None:
        nonlocal shown
        if not shown and isinstance(msg, TaskDone):
            shown = True
            _progress(ACC_LEGEND)
        _progress(msg)

    return say


def next_steps(suite, source: Path, uri: str, origin: str) -> list[str]:
    """Where a finished ``clbench run`` wrote (``uri``, from ``origin``: clbench.tracking.results_store), and the
    two commands that show it."""
    experiment = suite.experiment
    lines = [f"results: MLflow experiment '{experiment}' in {uri}"]
    named = origin in ("--tracking-uri", "tracking.uri of the suite file")  # the environment names it already
    lines.append(f"  clbench leaderboard {source}{f' --tracking-uri {uri}' if named else ''}   # methods compared, "
                 "seeds aggregated")
    if uri.startswith(("http://", "https://")):
        lines.append(f"  open {uri} in a browser                 # MLflow UI, runs table sorted by final/acc")
    else:
        ui_store = f" --backend-store-uri {uri}" if named else ""
        lines.append(f"  clbench ui{ui_store}   # MLflow UI: the experiment's runs table sorted by final/acc")
    return lines


@app.command()
def methods(
    pattern: str | None = typer.Argument(None, help="substring or exact method name"),
    params: bool = typer.Option(False, "--params", help="show every param with its default and description"),
    plugins_dir: list[str] = typer.Option([], "--plugins-dir"),
) -> None:
    """List the registered methods (and their params)."""
    from clbench.methods.method import describe_params, supported_backbones, training_summary
    from clbench.methods.registry import discover

    try:
        reg = discover(plugins_dir, strict=False)
    except ClbenchError as exc:
        _fail(str(exc))
    names = sorted(reg.methods)
    if pattern in reg.methods or pattern in reg.aliases:  # an exact name wins over substrings (lora vs olora)
        names = [reg.get(pattern).name]
    elif pattern:
        names = [n for n in names if pattern in n]
    for n in names:
        info = reg.methods[n]
        aliases = getattr(info.cls, "aliases", ())
        typer.echo(f"{n}{' (' + ', '.join(aliases) + ')' if aliases else ''}  [{info.source}]")
        if getattr(info.cls, "paper", ""):
            typer.echo(f"    paper: {info.cls.paper}")
        if pattern and len(names) == 1:
            typer.echo(f"    trains: {training_summary(info.cls)}")
            note = getattr(info.cls, "backbones_note", "")
            typer.echo(f"    backbones: {', '.join(supported_backbones(info.cls))}{f' ({note})' if note else ''}")
        if params or (pattern and len(names) == 1):
            for fname, _, default, description in describe_params(info.cls.Params):
                typer.echo(f"    {fname} = {default!r}: {description}")
    for err in reg.errors:
        typer.echo(f"error: {err}", err=True)
    if not names and pattern:
        from clbench.methods.registry import plugins_dir_hint

        _fail(f"no method matches '{pattern}'{plugins_dir_hint(pattern, plugins_dir)}")


@app.command()
def plugins(plugins_dir: list[str] = typer.Option([], "--plugins-dir")) -> None:
    """List the plugin sources (built-in, entry points, plugin folders) and what each registered."""
    from clbench.methods.registry import discover

    reg = discover(plugins_dir, strict=False)
    for source, prov in reg.sources:
        names = [n for n, i in reg.methods.items() if i.source == source]
        typer.echo(f"{source}: {', '.join(names) or '(no methods)'}  {prov.get('kind', '')}")
    for err in reg.errors:
        typer.echo(f"error: {err}", err=True)


@app.command()
def check(
    name: str = typer.Argument(..., help="a registered method (built-in, installed package or --plugins-dir)"),
    plugins_dir: list[str] = typer.Option([], "--plugins-dir", metavar="DIR",
                                          help="also load method plugins from this folder"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                   help="a method param (value parsed as YAML), e.g. --set rank=2; repeatable"),
    lm: list[str] = typer.Option([], "--lm", metavar="BACKBONE",
                                 help="also run the contract on a tiny language model: t5_tiny_clbench or "
                                      "llama_tiny_clbench (needs clbench[lm]); repeatable"),
) -> None:
    """Run the plugin contract on one method (CPU, tiny ViT; with --lm also a tiny language model): one line per
    check, with what runs shown on stderr as it goes, stop at the first failure (exit 1). The same checks as
    tests/test_contract.py (and tests/test_contract_lm.py), without a source checkout of clbench."""
    from clbench.methods.hookcheck import no_process_exit

    # guarded from before the plugins are imported: a plugin that takes its own reference at import
    # (`from os import _exit`) takes the guard's, so it cannot end `clbench check` with a silent exit 0
    with no_process_exit():
        _check_method(name, plugins_dir, set_, lm)


def _check_method(name: str, plugins_dir: list[str], set_: list[str], lm: list[str]) -> None:
    import time

    from clbench.contract import ContractError, method_checks, method_params
    from clbench.methods.hookcheck import ProcessExit, exit_text
    from clbench.methods.registry import discover, plugins_dir_hint

    try:
        reg = discover(plugins_dir, strict=False)
    except ClbenchError as exc:
        _fail(str(exc))
    try:
        info = reg.get(name)
    except ClbenchError as exc:  # a plugin that failed to load says why here; one in a folder needs --plugins-dir
        errors = "".join(f"; {e}" for e in reg.errors)
        _fail(f"{exc}{errors}{plugins_dir_hint(name, plugins_dir) if not errors else ''}")
    clash = [e for e in reg.errors if f"'{info.name}'" in e or f"'{name}'" in e]
    if clash:  # a plugins folder registering the name again: checking the built-in would pass what run refuses
        _fail(f"{clash[0]} (clbench run refuses this plugins folder too)")
    try:
        params = method_params(info.cls, set_) if set_ else None
    except ClbenchError as exc:
        _fail(str(exc))
    steps = method_checks(info.cls, params, progress=lambda msg: typer.echo(f"      {msg}", err=True))
    for backbone in lm:
        from clbench.contract import language_checks
        from clbench.methods.method import backbone_refusal
        from clbench.model.lm import LM_TINY, require_transformers

        if backbone not in LM_TINY:
            _fail(f"--lm {backbone}: choose a tiny language backbone: {', '.join(sorted(LM_TINY))}")
        refusal = backbone_refusal(info.cls, "language")
        if refusal:  # what clbench run refuses too (Method.backbones): no contract to check on a language model
            _fail(f"--lm {backbone}: method '{info.name}' {refusal}")
        try:
            require_transformers(backbone)
        except ClbenchError as exc:
            _fail(f"--lm {backbone}: {exc}")
        steps += language_checks(info.cls, params, backbone=backbone)
    shown = f" with {', '.join(set_)}" if set_ else ""
    typer.echo(f"contract of method '{info.name}' [{info.source}]{shown}")
    for label, step in steps:
        typer.echo(f"..    {label}", err=True)
        tic = time.perf_counter()
        try:
            with _ticking(tic):
                step()
        except (ContractError, ClbenchError) as exc:
            typer.echo(f"FAIL  {label}")
            _fail(f"{label}: {exc}")
        except (SystemExit, ProcessExit) as exc:  # never a silent exit 0 that a CI reads as a pass
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            typer.echo(f"FAIL  {label}")
            _fail(f"{label}: the method's code called {exit_text(exc)} (at {frame.filename}:{frame.lineno}); a "
                  "method must never end the process")
        except Exception as exc:  # noqa: BLE001 - the plugin crashed: where, in one line
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            typer.echo(f"FAIL  {label}")
            _fail(f"{label}: {type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno})")
        typer.echo(f"ok    {label} ({time.perf_counter() - tic:.1f}s)")


@contextlib.contextmanager
def _ticking(since: float, every: float = 30.0):
    """While the block runs, a line on stderr every ``every`` seconds (a slow hook prints nothing of its own)."""
    import threading
    import time

    done = threading.Event()

    def tick() -> None:
        while not done.wait(every):
            typer.echo(f"      still running ({time.perf_counter() - since:.0f}s)", err=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@app.command("new-method")
def new_method(
    name: str = typer.Argument(..., help="the method's registry name (a lowercase identifier)"),
    dir_: Path = typer.Option(Path("."), "--dir", help="folder of the plugin module (use it as --plugins-dir)"),
    tests_dir: Path | None = typer.Option(None, "--tests-dir",
                                             help="folder of the test file (default DIR/tests)"),
    package: bool = typer.Option(False, "--package",
                                 help="write an installable package folder DIR/clbench-NAME (pyproject.toml with "
                                      "the clbench entry point, README, module, tests): pip install -e it"),
    template: str = typer.Option("lora", "--template", metavar="lora|plain|prompt|rehearsal",
                                 help="the starting point: lora (adapters), plain (no adapters: heads on the frozen "
                                      "backbone), prompt (prompt tokens), rehearsal (LoRA plus a replay buffer)"),
) -> None:
    """Scaffold a method plugin DIR/NAME.py and its test file; both pass as generated (see CONTRIBUTING.md).
    With --package, the same as a package folder that `pip install -e` installs as generated."""
    from clbench.scaffold import new_method as scaffold
    from clbench.scaffold import new_package

    if package and tests_dir is not None:
        _fail("new-method: --tests-dir does not go with --package (the package keeps its tests in tests/)")
    try:
        written = new_package(name, dir_, kind=template) if package else scaffold(name, dir_, tests_dir, kind=template)
    except ClbenchError as exc:
        _fail(str(exc))
    typer.echo("\n".join(f"wrote {path}" for path in written))
    if package:
        root = written[0].parent
        typer.echo(f"next: fill in the TODOs, `pip install -e {root}`, `pytest {root}`, then `clbench methods {name}`",
                   err=True)
    else:
        typer.echo(f"next: fill in the TODOs, run `pytest {written[1]}`, then `clbench methods {name} --plugins-dir "
                   f"{dir_}`", err=True)


@app.command()
def protocol(
    suite_file: Path = typer.Argument(..., help="suite YAML file"),
    overrides: list[str] = typer.Option([], "--set", help="override a suite key, e.g. train.epochs=5"),
    method: int = typer.Option(0, "--method-index", help="which method entry's train overrides to apply"),
    tasks: int = typer.Option(2, "--tasks", help="tasks of each seed's class order to print"),
    as_json: bool = typer.Option(False, "--json", help="the whole protocol as JSON (full class orders)"),
) -> None:
    """Print the effective protocol (lr per epoch and group, class order per seed, transforms, optimizer,
    precision, normalisation, batch), computed by the functions the training loop uses: compare it with a paper."""
    import json

    from clbench.run.protocol import effective_protocol, protocol_lines
    from clbench.suite import load_suite

    try:
        suite = load_suite(suite_file, overrides)
        if not 0 <= method < len(suite.methods):
            raise ClbenchError(f"--method-index {method}: the suite has {len(suite.methods)} method entries "
                               f"(0..{len(suite.methods) - 1})")
        p = effective_protocol(suite, method)
        typer.echo(json.dumps(p, indent=1) if as_json else "\n".join(protocol_lines(p, tasks)))
    except ClbenchError as exc:
        _fail(str(exc))


@app.command()
def leaderboard(
    suites: list[str] | None = typer.Argument(None, help="suite files, experiment or suite names (several: ranks "
                                                         "across them); default: every clbench experiment"),
    all_: bool = typer.Option(False, "--all", help="every clbench experiment (the default without SUITE), ranked "
                                                   "across suites"),
    sort: str = typer.Option(keys.FINAL_ACC, "--sort", help="metric key or short name (acc, forgetting, train_s, "
                                                         "...) or method; best first"),
    baseline: str | None = typer.Option(None, "--baseline", help="method every other method is compared with, "
                                                                 "paired by seed (difference, ci95, paired t-test)"),
    format_: str = typer.Option("table", "--format", "-f", help="table, markdown, csv, json or html"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write to this file instead of stdout"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri",
                                               help="default: MLFLOW_TRACKING_URI, else the suite's tracking.uri, "
                                                    "else MLflow's default (./mlflow.db)"),
) -> None:
    """Compare methods: aggregate the finished seeds of every method per suite hash (reads MLflow only)."""
    from clbench.analysis.leaderboard import FORMATS, build
    from clbench.analysis.report import render

    try:
        if format_ not in FORMATS:
            raise ClbenchError(f"--format {format_}: choose from {', '.join(FORMATS)}")
        if all_ and suites:
            raise ClbenchError(f"--all selects every experiment: drop the SUITE arguments ({' '.join(suites)}) "
                               "or --all")
        groups = build(list(suites or []), tracking_uri, sort, baseline)
        title = f"clbench leaderboard: {', '.join(suites)}" if suites else "clbench leaderboard"
        text = render(groups, format_, title=title)
        if output:
            try:
                output.parent.mkdir(parents=True, exist_ok=True)  # a named folder for reports, made on first use
                output.write_text(text)
            except OSError as exc:
                raise ClbenchError(f"--output {output}: cannot write ({exc.strerror})") from None
            typer.echo(f"wrote {output}", err=True)
        else:
            typer.echo(text)
    except ClbenchError as exc:
        _fail(str(exc))


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    port: int = typer.Option(5000),
    backend_store_uri: str | None = typer.Option(None, help="default: MLFLOW_TRACKING_URI or MLflow's default "
                                                            "(./mlflow.db)"),
) -> None:
    """Open MLflow's UI on the same store `clbench run` writes to."""
    from clbench.store.storecheck import check_port
    from clbench.store.tracking import store_uri
    from clbench.store.uiview import view_url

    uri = store_uri(backend_store_uri)
    if uri.startswith("http"):
        _fail(f"tracking: {uri} is already a server; open it in a browser")
    try:
        check_port(host, port)  # before the server starts: its own bind error ends up in its log
        views = _ui_views(uri)
    except ClbenchError as exc:
        _fail(str(exc))
    base = f"http://{host}:{port}"
    typer.echo(f"MLflow UI for {uri} on {base}", err=True)
    for name, exp_id in views:
        typer.echo(f"  {name}: {view_url(base, exp_id)}   (leaderboard: runs sorted by final/acc)", err=True)
    typer.echo(f"  every page opens in MLflow's model-training mode: {base} on the runs table of the suite that ran "
               "last, and each clbench experiment's runs table as its leaderboard view", err=True)
    from clbench.store.uiserver import command

    argv = command(uri, host, port)  # MLflow's own server, opening in model-training mode (clbench.store.uiserver)
    os.execvp(argv[0], argv)


def _ui_views(uri: str) -> list[tuple[str, str]]:
    """Tag the store's clbench experiments for the UI (see clbench.store.uiview); nothing for a store not yet created
    or one this user cannot write. Refuses a file that is not an MLflow store (``clbench.store.tracking.ui_store``)."""
    from clbench.store.tracking import ensure_ui_views, ui_store

    state = ui_store(uri)
    if state == "new":
        typer.echo(f"  no store at {uri} yet: run `clbench run SUITE` here first", err=True)
        return []
    if state == "read-only":
        typer.echo(f"  {uri} is read-only: the UI shows it, without clbench's saved leaderboard view", err=True)
        return []
    return ensure_ui_views(uri)


def main() -> None:
    try:
        app()
    except ClbenchError as exc:  # safety net: commands map their own errors
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's message is printed: no traceback
        typer.echo("error: interrupted", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
