"""Pinned quickstart numbers (issue 17, item 6): run the quickstart, or its cheap deterministic slice, and compare
every method's final metrics with tests/golden/quickstart.json. This is what tells us when a refactor silently
changed a result.

Two pinned sets, both from suites/quickstart.yaml, seed 0, all four methods:

- ``slice`` (checked by ``tests/test_golden.py::test_golden_quickstart_slice`` in the default test run, seconds):
  the quickstart with ``SLICE_OVERRIDES``: on the CPU, a randomly initialised backbone instead of the shipped weights
  pretrained on scikit-learn digits, and 1 epoch per task instead of 4. Same
  stream (5 tasks of MNIST), same backbone architecture, same method params, same protocol otherwise.
- ``quickstart``: the full suite on the shipped pretrained weights (clbench/weights, sha256 pinned), on the CPU
  (checked by ``test_golden_quickstart_full``, marked slow).

Each section records ``weights`` (clbench.weights: the sha256 of the backbone's starting weights, or random-init);
the test refuses to compare numbers made on other weights.

Both run through the public CLI entry point (``clbench run SUITE --set ...`` via typer's CliRunner, in this
process) into a temporary MLflow store and are read back with ``mlflow.MlflowClient`` by the MLflow contract of
docs/ARCHITECTURE.md section 4 (child runs tagged ``clbench.method``), so they survive refactors of the runner's internals.

The runs are bit-for-bit deterministic on one machine (same seed, one CPU thread). ``TOLERANCE`` absorbs float
reordering across CPUs and BLAS builds, where a few of the 1,000 final test images may flip: 0.5 points for the
accuracy-type metrics (percent), 0.01 for the top-1 energy shares (fractions). Anything larger is a behaviour
change: if it is intended, regenerate the file in the same commit and say why in the message.

Usage (from the repository root):
    python benchmarks/golden.py            # run the slice and compare with the pinned file (prints a table)
    python benchmarks/golden.py --write    # regenerate the slice's numbers in tests/golden/quickstart.json
    python benchmarks/golden.py --full [--write]   # the same for the full quickstart (minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "suites" / "quickstart.yaml"
GOLDEN = ROOT / "tests" / "golden" / "quickstart.json"
METRICS = ("final/acc", "final/avg_acc", "final/forgetting", "final/bwt", "spectra/top1_share",
           "spectra/mean_top1_share")
TOLERANCE = {"final/acc": 0.5, "final/avg_acc": 0.5, "final/forgetting": 0.5, "final/bwt": 0.5,
             "spectra/top1_share": 0.01, "spectra/mean_top1_share": 0.01}
# the CPU always: `device: auto` would pick a GPU where there is one, and its kernels give other numbers
FULL_OVERRIDES = ("runtime.device=cpu",)
SLICE_OVERRIDES = (*FULL_OVERRIDES, "backbone.pretrained=false", "train.epochs=1")
COMMAND = "python benchmarks/golden.py --write  (add --full for the full quickstart)"


def run_quickstart(overrides: tuple[str, ...] | list[str], workdir: Path) -> dict[str, dict[str, float]]:
    """Run the quickstart with ``overrides`` into a fresh MLflow store under ``workdir`` and return
    ``{method label: {metric: value}}`` for METRICS, read back from the finished child runs."""
    from typer.testing import CliRunner

    from clbench.cli import app

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        args = ["run", str(QUICKSTART), "--checkpoint-dir", str(workdir / "ck")]
        for o in overrides:
            args += ["--set", o]
        result = CliRunner().invoke(app, args)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    if result.exit_code != 0:
        raise RuntimeError(f"clbench run {' '.join(args[1:])} exited {result.exit_code}:\n{result.output}"
                           + (f"\n{result.exception!r}" if result.exception else ""))
    return read_store(uri)


def read_store(uri: str, experiment: str = "quickstart") -> dict[str, dict[str, float]]:
    """``{method label: {metric: value}}`` of the finished child runs of ``experiment`` in the MLflow store at
    ``uri`` (one run per method: the store of one seed-0 quickstart run)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RuntimeError(f"{uri} has no experiment {experiment!r}")
    out: dict[str, dict[str, float]] = {}
    for r in client.search_runs([exp.experiment_id], "tags.`clbench.role` = 'child'"):
        method = r.data.tags["clbench.method"]
        if r.info.status != "FINISHED" or r.data.tags.get("clbench.seed") != "0":
            continue
        if method in out:
            raise RuntimeError(f"{uri}: more than one finished seed-0 run of {method}")
        out[method] = {k: float(r.data.metrics[k]) for k in METRICS if k in r.data.metrics}
    return dict(sorted(out.items()))


def compare(pinned: dict[str, dict[str, float]], new: dict[str, dict[str, float]],
            tolerance: dict[str, float], what: str) -> list[str]:
    """One line per number that moved beyond its tolerance, or appeared, or vanished (empty when all hold)."""
    problems = []
    for method in sorted(set(pinned) | set(new)):
        if method not in new:
            problems.append(f"{what}: method {method} is pinned but did not run")
            continue
        if method not in pinned:
            problems.append(f"{what}: method {method} ran but is not pinned")
            continue
        for key in sorted(set(pinned[method]) | set(new[method])):
            old, now = pinned[method].get(key), new[method].get(key)
            if now is None:
                problems.append(f"{what}: {method} {key}: pinned {old!r}, the run no longer logs it")
            elif old is None:
                problems.append(f"{what}: {method} {key}: not pinned, the run logs {now!r}")
            elif not (math.isfinite(now) and abs(now - old) <= tolerance.get(key, 0.0)):
                problems.append(f"{what}: {method} {key}: pinned {old:.6g}, new {now:.6g} "
                                f"(moved {now - old:+.6g}, tolerance {tolerance.get(key, 0.0):g})")
    return problems


def weights_of(overrides: tuple[str, ...] | list[str]) -> str:
    """The weights identity (clbench.weights) of the quickstart run with ``overrides``."""
    from clbench.suite import load_suite

    return load_suite(QUICKSTART, list(overrides)).weights_identity()


def load(path: Path = GOLDEN) -> dict[str, Any]:
    return json.loads(path.read_text())


def write(section: str, overrides: tuple[str, ...] | list[str], metrics: dict[str, dict[str, float]],
          seconds: float | None, path: Path = GOLDEN) -> None:
    import platform

    import torch

    data = load(path) if path.is_file() else {}
    data.setdefault("about", "Per-method final metrics of suites/quickstart.yaml (seed 0), pinned so that a "
                             "change in any result shows up in tests/test_golden.py. Regenerate only on purpose, "
                             "in the commit that changes the behaviour, saying why.")
    data["command"] = COMMAND
    data["tolerance"] = TOLERANCE
    data[section] = {"overrides": list(overrides), "weights": weights_of(overrides),
                     "seconds": None if seconds is None else round(seconds, 1),
                     "produced_with": {"torch": torch.__version__, "python": platform.python_version(),
                                       "machine": platform.machine()},
                     "metrics": metrics}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the full quickstart (shipped pretrained weights) instead of the slice")
    ap.add_argument("--write", action="store_true", help="write the numbers into the golden file")
    ap.add_argument("--golden", type=Path, default=GOLDEN)
    ap.add_argument("--from-store", metavar="URI", help="read the numbers from this MLflow store (a finished "
                    "quickstart run) instead of running; e.g. to compare another checkout's results")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    section = "quickstart" if args.full else "slice"
    overrides = list(FULL_OVERRIDES if args.full else SLICE_OVERRIDES)
    t0 = time.perf_counter()
    if args.from_store:
        metrics = read_store(args.from_store)
        print(f"{section}: read from {args.from_store}")
    else:
        with tempfile.TemporaryDirectory(prefix="clbench-golden-") as tmp:
            metrics = run_quickstart(overrides, Path(tmp))
        print(f"{section}: {time.perf_counter() - t0:.1f} s wall ({', '.join(overrides)})")
    seconds = time.perf_counter() - t0
    print(f"{'method':<10}" + "".join(f"{k:>26}" for k in METRICS))
    for method, m in metrics.items():
        print(f"{method:<10}" + "".join(f"{m.get(k, float('nan')):>26.6g}" for k in METRICS))
    if args.write:
        # numbers read from a store say so: no run time, and the overrides are those the store's run should have had
        write(section, overrides, metrics, None if args.from_store else seconds, args.golden)
        print(f"wrote {section} into {args.golden}")
        return 0
    pinned = load(args.golden).get(section)
    if pinned is None:
        print(f"{args.golden} has no '{section}' section yet: run with --write", file=sys.stderr)
        return 1
    problems = compare(pinned["metrics"], metrics, load(args.golden)["tolerance"], f"golden {section}")
    print("\n".join(problems) if problems else f"every number within tolerance of {args.golden.name}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
