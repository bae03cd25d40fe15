"""Pinned quickstart numbers (issue 17, item 6): the quickstart's deterministic slice is run again through the
CLI and every method's final metrics must stay within tests/golden/quickstart.json's tolerance.

When a change of behaviour is intended, regenerate the file with ``python benchmarks/golden.py --write`` (and
``--full --write`` for the full quickstart) in the same commit, saying why in the message.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("clbench_golden", ROOT / "benchmarks" / "golden.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

HOW = "\nIf the change is intended, regenerate with `python benchmarks/golden.py --write` and say why in the commit."


def _check(section: str, overrides: tuple[str, ...], tmp_path: Path) -> None:
    pinned = golden.load()
    assert pinned[section]["overrides"] == list(overrides), (
        f"{golden.GOLDEN.name}: the pinned {section} was produced with {pinned[section]['overrides']}, the test "
        f"runs {list(overrides)}{HOW}")
    assert pinned[section]["weights"] == golden.weights_of(overrides), (
        f"{golden.GOLDEN.name}: the pinned {section} was made on weights {pinned[section]['weights'][:12]}, the "
        f"test runs on {golden.weights_of(overrides)[:12]}{HOW}")
    new = golden.run_quickstart(overrides, tmp_path)
    problems = golden.compare(pinned[section]["metrics"], new, pinned["tolerance"], f"golden {section}")
    assert not problems, "\n".join(problems) + HOW


def test_golden_quickstart_slice(tmp_path):
    """All four methods on the quickstart's stream, 1 epoch, random backbone: a minute of CPU."""
    _check("slice", golden.SLICE_OVERRIDES, tmp_path)


@pytest.mark.slow
def test_golden_quickstart_full(tmp_path):
    """The whole quickstart on the shipped pretrained weights (minutes); the slice above covers the loop and the
    methods. The pinned numbers were made with those weights (their sha256 is in the golden file)."""
    _check("quickstart", golden.FULL_OVERRIDES, tmp_path)


def test_golden_file_pins_every_method_and_metric():
    pinned = golden.load()
    assert set(pinned["tolerance"]) == set(golden.METRICS)
    for section in ("slice", "quickstart"):
        metrics = pinned[section]["metrics"]
        assert set(metrics) == {"lora", "inflora", "olora", "eblora"}, section
        for method, m in metrics.items():
            assert set(m) == set(golden.METRICS), (section, method)


def test_golden_compare_names_method_metric_and_both_values():
    pinned = golden.load()["slice"]["metrics"]
    tol = golden.load()["tolerance"]
    assert golden.compare(pinned, copy.deepcopy(pinned), tol, "golden slice") == []
    # within tolerance passes; just beyond it fails
    nudged = copy.deepcopy(pinned)
    nudged["lora"]["final/acc"] += 0.4
    assert golden.compare(pinned, nudged, tol, "golden slice") == []
    nudged["lora"]["final/acc"] += 0.2
    [line] = golden.compare(pinned, nudged, tol, "golden slice")
    old = pinned["lora"]["final/acc"]
    assert line.startswith("golden slice: lora final/acc: ") and f"pinned {old:.6g}, new {old + 0.6:.6g}" in line
    # every number moved by 5: every (method, metric) is reported
    moved = {m: {k: v + 5 for k, v in d.items()} for m, d in pinned.items()}
    problems = golden.compare(pinned, moved, tol, "golden slice")
    assert len(problems) == sum(len(d) for d in pinned.values())
    # a vanished metric or method, and NaN, are failures too
    broken = copy.deepcopy(pinned)
    del broken["eblora"]["final/bwt"]
    del broken["olora"]
    broken["inflora"]["final/forgetting"] = float("nan")
    text = "\n".join(golden.compare(pinned, broken, tol, "golden slice"))
    assert "eblora final/bwt: pinned" in text and "no longer logs it" in text
    assert "method olora is pinned but did not run" in text and "inflora final/forgetting" in text
