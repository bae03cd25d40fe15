"""Run a suite into a temporary MLflow store and write what it measured as a results file under benchmarks/results/.

Every number README.md and docs/ quote from a run comes from such a file (tests/test_results.py checks the quoted
numbers against it at the README's rounding), so each quote can be regenerated with one command:

    python benchmarks/record.py suites/claim.yaml                  # writes benchmarks/results/claim.json
    python benchmarks/record.py suites/quickstart.yaml --set runtime.device=cpu --out benchmarks/results/x.json
    python benchmarks/record.py suites/quickstart-bounds.yaml --method simplecil --method ranpac --out y.json
    python benchmarks/record.py --script benchmarks/spectra_speed.py -- --repeats 3   # a script's name=value lines

The file holds: the command, the commit (and whether the tree had uncommitted changes), the suite hash, the
sha256 of the backbone's weights, the machine (CPU model, cores, torch and its thread count), the date, the load
(1-minute load average before and after, and how many other processes were using a CPU when the run started), the
wall time and the CPU time of the run, the suite parent run's metrics (the claim statistics, the Spearman
correlation, ...) and every finished child run's final metrics by method label and seed, with its
class- and task-incremental accuracy after every task.

With ``--script``, a benchmark script that prints ``name=value`` lines runs instead of a suite (under
``OMP_NUM_THREADS`` as set, or 1 when unset), and the file holds the same provenance with the script's output:
``figures`` (each line holding one ``name=value``), ``rows`` (each line holding several, with the text after a
``#`` as its ``note``) and the raw ``stdout``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CHILD_METRICS = ("final/acc", "final/avg_acc", "final/forgetting", "final/bwt", "final/acc_til",
                 "spectra/top1_share", "spectra/mean_top1_share", "cost/train_seconds")
CHILD_HISTORIES = ("eval/acc", "eval/acc_til")


def git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_processes() -> int:
    """Processes other than this one in state R (running or runnable) now: the other jobs competing for the CPU."""
    n = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "R" and int(stat.parent.name) != os.getpid():
            n += 1
    return n


def machine() -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cuda": torch.cuda.is_available()}


def read_store(uri: str, experiment: str) -> tuple[dict[str, float], dict[str, dict[str, dict[str, Any]]]]:
    """(the newest finished suite parent's metrics, {label: {seed: {metric: value}}} of its finished children, with
    ``eval/acc/by_task`` and ``eval/acc_til/by_task``: the accuracy after every task)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"{uri}: no experiment {experiment!r}; did the run fail?")
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    parents = [r for r in runs if r.data.tags.get("clbench.role") == "parent" and r.info.status == "FINISHED"]
    parent = max(parents, key=lambda r: r.info.start_time).data.metrics if parents else {}
    children: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if r.data.tags.get("clbench.role") != "child" or r.info.status != "FINISHED":
            continue
        label, seed = r.data.tags["clbench.method"], r.data.tags["clbench.seed"]
        row: dict[str, Any] = {k: r.data.metrics[k] for k in CHILD_METRICS if k in r.data.metrics}
        for key in CHILD_HISTORIES:  # after every task, in task order
            row[key + "/by_task"] = [m.value for m in sorted(client.get_metric_history(r.info.run_id, key),
                                                               key=lambda m: m.step)]
        children.setdefault(label, {})[seed] = row
    return dict(sorted(parent.items())), {k: dict(sorted(v.items(), key=lambda kv: int(kv[0])))
                                          for k, v in sorted(children.items())}


def record(suite_path: Path, sets: list[str], out: Path, methods: list[str] | None = None) -> dict[str, Any]:
    from clbench.suite import load_suite

    suite = load_suite(suite_path, sets)
    experiment = suite.tracking.experiment or suite.name
    rel = os.path.relpath(suite_path, ROOT)
    command = ["clbench", "run", rel, *[a for m in methods or [] for a in ("--method", m)],
               *[a for s in sets for a in ("--set", s)]]
    commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    load_before, busy = os.getloadavg()[0], busy_processes()
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="clbench-record-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        # from the temporary folder: MLflow puts a sqlite store's artifacts under ./mlruns of the working directory
        run = ["clbench", "run", str(suite_path), *command[3:], "--checkpoint-dir", str(Path(tmp) / "ck")]
        proc = subprocess.run(run, cwd=tmp, env=env)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command)} exited {proc.returncode}; nothing written")
        parent, children = read_store(uri, experiment)
    data = {
        "command": " ".join(command),
        "regenerate": f"python benchmarks/record.py {rel}" + "".join(f" --method {m}" for m in methods or [])
                      + "".join(f" --set {s}" for s in sets)
                      + ("" if out == RESULTS / f"{suite_path.stem}.json" else f" --out {os.path.relpath(out, ROOT)}"),
        "commit": commit, "dirty": dirty,  # when the run started
        "suite": suite.name, "suite_hash": suite.protocol_hash(), "weights_sha256": suite.weights_identity(),
        "seeds": suite.seeds, "date": started.isoformat(timespec="seconds"), "machine": machine(),
        "load": {"loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
                 "other_running_processes_at_start": busy},
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
        "parent_metrics": parent, "runs": children,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


def parse_figures(stdout: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """({name: value} of the lines holding one name=value, [the lines holding several, as dicts])."""

    def value(v: str) -> Any:
        try:
            return float(v) if any(ch in v for ch in ".en") or not v.lstrip("-").isdigit() else int(v)
        except ValueError:
            return v

    figures: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        text, _, note = line.partition("#")
        pairs = [tok.split("=", 1) for tok in text.split() if "=" in tok]
        if len(pairs) == 1 and len(text.split()) == 1:
            figures[pairs[0][0]] = value(pairs[0][1])
        elif len(pairs) > 1:
            rows.append({**{k: value(v) for k, v in pairs}, **({"note": note.strip()} if note.strip() else {})})
    return figures, rows


def record_script(script: Path, args: list[str], out: Path) -> dict[str, Any]:
    """Run a benchmark script that prints name=value lines and write its figures with the run's provenance."""
    rel = os.path.relpath(script, ROOT)
    command = ["python", rel, *args]
    commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    load_before, busy = os.getloadavg()[0], busy_processes()
    started = datetime.datetime.now(datetime.UTC)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}; nothing written")
    figures, rows = parse_figures(proc.stdout)
    if not figures and not rows:
        raise SystemExit(f"{' '.join(command)} printed no name=value line; nothing written")
    data = {
        "command": " ".join(command),
        "regenerate": f"python benchmarks/record.py --script {rel}"
                      + ("" if out == RESULTS / f"{script.stem}.json" else f" --out {os.path.relpath(out, ROOT)}")
                      + (f" -- {' '.join(args)}" if args else ""),
        "commit": commit, "dirty": dirty, "date": started.isoformat(timespec="seconds"),
        "machine": {**machine(), "omp_num_threads": env["OMP_NUM_THREADS"]},
        "load": {"loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
                 "other_running_processes_at_start": busy},
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
        "figures": figures, "rows": rows, "stdout": proc.stdout.splitlines(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", type=Path, nargs="?")
    ap.add_argument("--method", dest="methods", action="append", default=[], metavar="LABEL",
                    help="run only these method labels of the suite (repeatable)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--script", type=Path, help="a benchmark script printing name=value lines, instead of a suite; "
                    "its own arguments follow `--`")
    ap.add_argument("--out", type=Path, help="results file (default: benchmarks/results/<suite or script name>.json)")
    argv = sys.argv[1:] if argv is None else argv
    script_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if (args.suite is None) == (args.script is None):
        ap.error("give a suite or --script, not both")
    if args.script is not None:
        script = args.script.resolve()
        if not script.is_file():
            raise SystemExit(f"{args.script}: no such script")
        out = args.out or RESULTS / f"{script.stem}.json"
        data = record_script(script, script_args, out.resolve())
        print(f"wrote {out}: {data['wall_seconds']} s wall, {data['cpu_seconds']} s CPU, "
              f"{len(data['figures'])} figures, {len(data['rows'])} rows")
        return 0
    suite_path = args.suite.resolve()
    out = args.out or RESULTS / f"{suite_path.stem}.json"
    data = record(suite_path, args.sets, out.resolve(), args.methods)
    print(f"wrote {out}: {data['wall_seconds']} s wall, {data['cpu_seconds']} s CPU, suite hash "
          f"{data['suite_hash']}, weights {data['weights_sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
