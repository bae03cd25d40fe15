"""Every number README.md and docs/ quote from a run is the number of a recorded run committed under
benchmarks/results/ (written by benchmarks/record.py) or of tests/golden/quickstart.json, at the rounding the text
uses. A rerun that moves a number means regenerating the file and the text together."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from clbench.suite import load_suite

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARMS = {"flat": "flat", "sharpen": "sharpen (p = 2)", "flat-nuclear": "flat-nuclear", "eblora": "eblora",
        "eblora-flat-only": "eblora-flat-only"}
HOW = " (regenerate: python benchmarks/record.py suites/claim.yaml, then update the text from the file)"


def flat(text: str) -> str:
    """Text with every run of whitespace as one space, so a quote may wrap anywhere."""
    return " ".join(text.split())


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s"


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def claim_quotes(data: dict) -> list[str]:
    """What README's claim section says about the recorded claim run, as it says it."""
    p, runs = data["parent_metrics"], data["runs"]

    def diff(label: str, metric: str) -> str:
        key = f"claim/{label}/{metric}_diff"
        return f"{p[key]:+.1f} ± {p[key + '_ci95']:.1f} | {p[key + '_p']:.2f}"

    rows = [f"| {shown} | {diff(label, 'forgetting')} | {diff(label, 'acc')} |" for label, shown in ARMS.items()]
    keep = list(runs["keep"].values())
    share = {label: statistics.mean(r["spectra/mean_top1_share"] for r in runs[label].values())
             for label in ("keep", "sharpen")}
    return [*rows,
            f"final forgetting of `keep` {mean_std([r['final/forgetting'] for r in keep])} (mean ± std over seeds "
            f"{min(data['seeds'])}-{max(data['seeds'])}, points)",
            f"(top1_share {share['keep']:.2f} -> {share['sharpen']:.2f})",
            f"over the same {sum(len(v) for v in runs.values())} runs is "
            f"{p['suite/spearman_imbalance_forgetting']:.2f} (p = {p['suite/spearman_p']:.2f})",
            f"task-incremental accuracy of `keep` is {statistics.mean(r['final/acc_til'] for r in keep):.0f}% while "
            f"its class-incremental accuracy is {statistics.mean(r['final/acc'] for r in keep):.0f}%",
            f"{minutes(data['wall_seconds'])} wall, {minutes(data['cpu_seconds'])} of CPU"]


def test_the_claim_results_file_is_of_the_claim_suite_as_it_is_now():
    data = json.loads((RESULTS / "claim.json").read_text())
    suite = load_suite(ROOT / "suites" / "claim.yaml")
    assert data["suite_hash"] == suite.protocol_hash(), "suites/claim.yaml changed since the recorded run" + HOW
    assert data["weights_sha256"] == suite.weights_identity() and not data["dirty"]
    assert sorted(data["runs"]) == sorted(m.display for m in suite.methods)
    assert all(sorted(map(int, v)) == suite.seeds for v in data["runs"].values())  # every run finished


def test_the_readme_claim_section_quotes_the_recorded_run():
    data = json.loads((RESULTS / "claim.json").read_text())
    readme = flat((ROOT / "README.md").read_text())
    missing = [q for q in claim_quotes(data) if flat(q) not in readme]
    assert not missing, f"README.md does not say (from benchmarks/results/claim.json): {missing}{HOW}"


def test_the_claim_suite_header_states_the_measured_time():
    data = json.loads((RESULTS / "claim.json").read_text())
    header = flat(" ".join(ln.lstrip("# ") for ln in (ROOT / "suites" / "claim.yaml").read_text().splitlines()
                           if ln.startswith("#")))
    assert flat(claim_quotes(data)[-1]) in header and "benchmarks/results/claim.json" in header


def test_performance_quotes_the_golden_quickstart_numbers():
    golden = json.loads((ROOT / "tests" / "golden" / "quickstart.json").read_text())["quickstart"]["metrics"]
    text = flat((ROOT / "docs" / "PERFORMANCE.md").read_text())
    accs = " / ".join(f"{golden[m]['final/acc']:.2f}" for m in ("lora", "inflora", "olora", "eblora"))
    assert f"final accuracies {accs} for lora / inflora / olora / eblora on the shipped weights" in text
