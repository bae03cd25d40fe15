"""Every number README.md, docs/ and the suites' comments quote from a run is the number of a recorded run committed
under benchmarks/results/ (written by benchmarks/record.py: a suite's run, or a benchmark script's name=value lines)
or of tests/golden/quickstart.json, at the rounding the text uses. A rerun that moves a number means regenerating
the file and the text together. A measured figure that no file backs must say so ("not recorded here") with when
and by which command it was measured."""

from __future__ import annotations

import importlib.util
import json
import re
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


# -- every recorded run is of its suite as it is now ---------------------------------------------------------------

def suite_results() -> list[Path]:
    return sorted(p for p in RESULTS.glob("*.json") if json.loads(p.read_text()).get("command", "").startswith(
        "clbench run "))


def script_results() -> list[Path]:
    return sorted(p for p in RESULTS.glob("*.json") if "figures" in json.loads(p.read_text()))


def run_args(command: str) -> tuple[str, list[str], list[str]]:
    """(suite path, --method labels, --set overrides) of a results file's `clbench run` command."""
    words = command.split()
    methods = [words[i + 1] for i, w in enumerate(words) if w == "--method"]
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    return words[2], methods, sets


def test_the_results_files_are_found():
    names = {p.name for p in suite_results()} | {p.name for p in script_results()}
    assert {"claim.json", "quickstart.json", "quickstart-bounds.json", "quickstart-er-current-task.json",
            "overhead.json", "spectra_speed.json", "eblora_step_size.json", "eblora-step-size.json"} <= names


def test_every_recorded_suite_run_is_of_its_suite_as_it_is_now():
    for path in suite_results():
        data = json.loads(path.read_text())
        suite_path, methods, sets = run_args(data["command"])
        suite = load_suite(ROOT / suite_path, sets)
        how = f" ({path.name}; regenerate: {data['regenerate']}, then update the text from the file)"
        assert data["suite_hash"] == suite.protocol_hash(), f"{suite_path} changed since the recorded run" + how
        assert data["weights_sha256"] == suite.weights_identity(), "other backbone weights" + how
        assert not data["dirty"], "recorded from a tree with uncommitted changes" + how
        assert sorted(data["runs"]) == sorted(methods or [m.display for m in suite.methods]), how
        assert all(sorted(map(int, v)) == suite.seeds for v in data["runs"].values()), "unfinished runs" + how


def test_every_recorded_script_run_is_complete():
    for path in script_results():
        data = json.loads(path.read_text())
        assert data["command"].startswith("python benchmarks/") and not data["dirty"], path.name
        assert (ROOT / data["command"].split()[1]).is_file(), f"{path.name}: its script is gone"


# -- the text quotes the files -------------------------------------------------------------------------------------

def result(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def missing_in(doc: str, quotes: list[str]) -> list[str]:
    text = flat((ROOT / doc).read_text())
    return [q for q in quotes if flat(q) not in text]


def test_performance_quotes_the_recorded_overhead_run():
    data = result("overhead.json")
    f = data["figures"]
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    quotes = [f"python benchmarks/record.py --script benchmarks/overhead.py -- {data['command'].split(' ', 2)[2]}",
              f"({data['cpu_seconds']:.0f} s of CPU, {data['wall_seconds']:.0f} s wall;",
              f"load average {data['load']['loadavg_1min_before']:.1f} before, "
              f"{data['load']['loadavg_1min_after']:.1f} after). Setting: the quickstart's",
              f"**{f['overhead_ratio']:.3f}** (repeats {f['overhead_ratio_min']:.3f}-{f['overhead_ratio_max']:.3f}; "
              f"ratio of medians {f['overhead_ratio_of_medians']:.3f})",
              f"**{f['eval_ratio']:.3f}** (ratio of medians {f['eval_ratio_of_medians']:.3f})",
              f"| `eval_ratio_unmerged` (SeqLoRA's live branches on q and v) | {f['eval_ratio_unmerged']:.3f} |",
              f"{f['train_img_per_s_clbench']:,.0f} / {f['train_img_per_s_bare']:,.0f} img/s",
              f"{f['eval_img_per_s_merged']:,.0f} / {f['eval_img_per_s_bare']:,.0f} img/s"]
    for m in ("lora", "inflora", "olora", "eblora"):
        h = lambda k: pct(f[f"hook_share/{m}/{k}"])  # noqa: E731,B023
        quotes.append(f"| {m} | {f[f'step_cost/{m}']:.3f} | {f[f'step_ms/{m}']:.1f} | {pct(f[f'hook_share/{m}'])} % "
                      f"| {h('before_task')} / {h('after_task')} / {h('merge_task')} % | "
                      f"{pct(f[f'spectra_share/{m}'])} % |")
    assert not missing_in("docs/PERFORMANCE.md", quotes), missing_in("docs/PERFORMANCE.md", quotes)


def test_performance_quotes_the_recorded_spectra_run():
    data = result("spectra_speed.json")
    f = data["figures"]
    quotes = [f"`benchmarks/results/spectra_speed.json`; 2026-12-07, load average "
              f"{data['load']['loadavg_1min_before']:.1f};",
              f"| {f['factor_seconds']:.4f} s |", f"| {f['dense_seconds']:.1f} s |", f"| `speedup` | {f['speedup']:.0f}x |",
              f"| {f['max_rel_error']:.1e} |", f"| {f['tracker_seconds']:.4f} s |",
              f"| {100 * f['share_of_epoch']:.3f} % / {100 * f['tracker_share_of_epoch']:.3f} % |"]
    assert data["date"].startswith("2026-12-07")  # the date the text states; change both together
    assert not missing_in("docs/PERFORMANCE.md", quotes), missing_in("docs/PERFORMANCE.md", quotes)


def test_performance_quotes_the_recorded_quickstart_run():
    data = result("quickstart.json")
    accs = " / ".join(f"{data['runs'][m]['0']['final/acc']:.2f}" for m in ("lora", "inflora", "olora", "eblora"))
    wall = f"{data['wall_seconds']:.0f} s" if data["wall_seconds"] < 59.5 else minutes(data["wall_seconds"])
    quotes = [f"**{wall}** wall, {data['cpu_seconds']:.0f} s of CPU",
              f"(load average {data['load']['loadavg_1min_before']:.1f} before, "
              f"{data['load']['loadavg_1min_after']:.1f} after), {data['date'][:10]}; final accuracies {accs} for "
              f"lora / inflora / olora / eblora on the shipped weights"]
    assert not missing_in("docs/PERFORMANCE.md", quotes), missing_in("docs/PERFORMANCE.md", quotes)


def test_the_readme_quotes_the_recorded_reference_and_bounds_runs():
    bounds, quick = result("quickstart-bounds.json")["runs"], result("quickstart.json")["runs"]
    fin = lambda runs, m, k: runs[m]["0"][f"final/{k}"]  # noqa: E731
    quotes = [f"they reach final accuracy {fin(bounds, 'simplecil', 'acc'):.2f} (forgetting "
              f"{fin(bounds, 'simplecil', 'forgetting'):.2f}) and {fin(bounds, 'ranpac', 'acc'):.2f} (forgetting "
              f"{fin(bounds, 'ranpac', 'forgetting'):.2f}), where `lora` reaches {fin(quick, 'lora', 'acc'):.2f} "
              f"(forgetting {fin(quick, 'lora', 'forgetting'):.2f})",
              f"(recorded: {result('quickstart-bounds.json')['cpu_seconds']:.0f} s of CPU for its six methods against "
              f"{result('quickstart.json')['cpu_seconds']:.0f} s for the quickstart's four"]
    assert not missing_in("README.md", quotes), missing_in("README.md", quotes)
    b = lambda m: bounds[m]["0"]["cost/train_seconds"]  # noqa: E731
    header = [f"(recorded: joint {b('joint'):.1f} s and er {b('er'):.1f} s of training against finetune's "
              f"{b('finetune'):.1f} s in the same run, benchmarks/results/quickstart-bounds.json)"]
    suite = " ".join(ln.lstrip("# ") for ln in (ROOT / "suites" / "quickstart-bounds.yaml").read_text().splitlines()
                     if ln.startswith("#"))
    assert flat(header[0]) in flat(suite)


def test_methods_quotes_the_recorded_er_scope_run():
    er = result("quickstart-er-current-task.json")["runs"]["er"]["0"]["eval/acc/by_task"]
    lora = result("quickstart.json")["runs"]["lora"]["0"]["eval/acc/by_task"]
    quote = f"after the second task below sequential LoRA's ({er[1]:.2f} vs {lora[1]:.2f};"
    assert er[1] < lora[1] and not missing_in("docs/METHODS.md", [quote]), quote


def test_reproduction_quotes_the_recorded_step_sizes():
    rows = result("eblora_step_size.json")["rows"]
    assert len(rows) == 11
    text = (ROOT / "docs" / "REPRODUCTION.md").read_text()
    for r in rows:
        # | case | d | r | c | lr | measured | predicted |
        assert any(cells[1:4] == [str(r["d"]), str(r["r"]), str(r["c"])]
                   and float(cells[4]) == r["lr"] and cells[5:7] == [f"{r['rel_change']:.4f}", f"{r['predicted']:.4f}"]
                   for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines()
                                 if ln.startswith("| ") and ln.count("|") == 8)
                   if len(cells) == 7 and cells[1].isdigit()), f"REPRODUCTION.md lacks the row {r}"
    assert "`benchmarks/results/eblora_step_size.json`" in text
    quick = result("quickstart.json")["runs"]["lora"]["0"]
    lora_row = (f"| lora (reference) | - | - | {quick['final/acc']:.2f} | {quick['final/avg_acc']:.2f} | "
                f"{quick['final/forgetting']:.2f} | {quick['final/acc_til']:.2f} |")
    assert lora_row in text


def test_the_conformance_tables_are_generated_from_their_files():
    spec = importlib.util.spec_from_file_location("conformance_tables", ROOT / "benchmarks" / "conformance" /
                                                  "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    text = (ROOT / "docs" / "REPRODUCTION.md").read_text()
    assert tables.section() in text, "regenerate: python benchmarks/conformance/tables.py"


# -- no figure silently looks recorded -----------------------------------------------------------------------------

# What reads as a measured figure: a time with its clock, a throughput, a step time, "measured" with a number.
MEASURED = re.compile(r"\b\d+(\.\d+)? s (wall|of CPU)\b|\b\d+ min \d+ s\b|\d img/s\b|ms/step|\(measured\b|"
                      r"\bmeasured:|\bmeasured \d")
# What backs it: a results file, the golden or conformance files, or the plain statement that nothing does.
BACKED = ("benchmarks/results/", "tests/golden/", "tests/conformance/", "not recorded here", "not yet measured",
          "not measured here")
NOT_RECORDED = "not recorded here"
# Sections other files own (their own tests hold them): cost growth, language models.
AUDITED = {"README.md": ("## Language models",), "docs/PERFORMANCE.md": ("## 6.",),
           "docs/REPRODUCTION.md": ("## Conformance",), "docs/METHODS.md": ("## 11.",)}


def audited_blocks() -> list[tuple[str, str]]:
    """(file, block) of every paragraph of the audited text; a table or code block joins the paragraph before it,
    and a suite file's header comment is one block."""
    out: list[tuple[str, str]] = []
    for doc, skip in AUDITED.items():
        kept, keep = [], True
        for line in (ROOT / doc).read_text().splitlines():
            if line.startswith("## "):
                keep = not line.startswith(skip)
            if keep:
                kept.append(line)
        blocks: list[str] = []
        for block in re.split(r"\n\s*\n", "\n".join(kept)):
            if block.lstrip().startswith(("|", "```")) and blocks:
                blocks[-1] += "\n" + block
            else:
                blocks.append(block)
        out += [(doc, b) for b in blocks]
    for suite in sorted((ROOT / "suites").rglob("*.yaml")):
        if not suite.name.startswith("lm-"):  # the language-model suites are another track's
            header = "\n".join(ln for ln in suite.read_text().splitlines() if ln.startswith("#"))
            out.append((str(suite.relative_to(ROOT)), header))
    return out


def test_every_measured_figure_names_its_results_file_or_says_it_has_none():
    silent = [f"{doc}: {flat(block)[:160]}" for doc, block in audited_blocks()
              if MEASURED.search(block) and not any(k in block for k in BACKED)]
    assert not silent, ("a measured figure with no results file and no 'not recorded here' (record it with "
                        "benchmarks/record.py and cite benchmarks/results/..., or say where, when and by which "
                        "command it was measured and that it is not recorded here):\n" + "\n".join(silent))


def test_every_unrecorded_figure_says_when_and_by_which_command():
    vague = [f"{doc}: {flat(block)[:160]}" for doc, block in audited_blocks()
             if NOT_RECORDED in block and f'"{NOT_RECORDED}"' not in block
             and not (re.search(r"\b20\d\d-\d\d-\d\d\b|\bissue \d+\b", block) and "`" in block)]
    assert not vague, "'not recorded here' without a date (or issue) and a command:\n" + "\n".join(vague)


def test_the_measured_figure_check_finds_a_silent_figure():
    block = "Quickstart: 1 min 13 s wall on 2 cores at load ~1."
    assert MEASURED.search(block) and not any(k in block for k in BACKED)


def test_reproduction_quotes_the_recorded_step_size_suite():
    data = result("eblora-step-size.json")
    runs = data["runs"]
    entries = [("lora (reference)", "lora", "-"), ("eblora, default (official_step)", "eblora", "104.9"),
               *[("eblora", f"eblora-c{c}", str(c)) for c in (64, 768, 4096, 21845)]]
    quotes = [f"`benchmarks/results/eblora-step-size.json`, which `python benchmarks/record.py "
              f"suites/eblora-step-size.yaml` regenerates, {data['cpu_seconds']:.0f} s of CPU, {data['date'][:10]})"]
    for shown, label, c in entries:
        r = runs[label]
        mean = lambda k: statistics.mean(r[s][k] for s in ("0", "1"))  # noqa: E731,B023
        quotes.append(f"| {shown} | {c} | {r['0']['final/acc']:.2f} / {r['1']['final/acc']:.2f} | "
                      f"{mean('final/acc'):.2f} | {mean('final/forgetting'):.2f} | {mean('final/acc_til'):.2f} |")
    acc = lambda label, s: runs[label][s]["final/acc"]  # noqa: E731
    til = lambda label, s: runs[label][s]["final/acc_til"]  # noqa: E731
    # what the text reads from the table
    assert all(acc(c, s) < acc("eblora", s) and til(c, s) < til("eblora", s)
               for c in ("eblora-c4096", "eblora-c21845") for s in ("0", "1"))
    spread = max(abs(acc(c, s) - acc("eblora", s)) for c in ("eblora-c64", "eblora-c768") for s in ("0", "1"))
    seeds = abs(acc("lora", "0") - acc("lora", "1"))
    assert spread < seeds
    quotes.append(f"differ by at most {spread:.1f} points of final accuracy at a seed, less than `lora`'s own "
                  f"difference between the two seeds ({seeds:.1f})")
    assert not missing_in("docs/REPRODUCTION.md", quotes), missing_in("docs/REPRODUCTION.md", quotes)


def test_performance_quotes_the_recorded_eval_reruns():
    e = [result(f"overhead-eval-{i}.json") for i in (1, 2)]
    assert all(d["command"].endswith("--only b --repeats 9") for d in e)
    f = [d["figures"] for d in e]
    quote = (f"N = 1, 2) gave {f[0]['eval_ratio']:.3f} and {f[1]['eval_ratio']:.3f} (ratios of medians "
             f"{f[0]['eval_ratio_of_medians']:.3f} and {f[1]['eval_ratio_of_medians']:.3f})")
    assert not missing_in("docs/PERFORMANCE.md", [quote]), quote


def test_the_recorded_quickstart_is_the_golden_one():
    """A behaviour change regenerates the golden numbers; the recorded quickstart the docs quote must follow."""
    golden = json.loads((ROOT / "tests" / "golden" / "quickstart.json").read_text())
    runs = result("quickstart.json")["runs"]
    assert golden["quickstart"]["weights"] == result("quickstart.json")["weights_sha256"]
    moved = [f"{m} {k}: golden {v}, recorded {runs[m]['0'][k]}" for m, pinned in golden["quickstart"]["metrics"].items()
             for k, v in pinned.items() if abs(runs[m]["0"][k] - v) > golden["tolerance"][k]]
    assert not moved, "re-record: python benchmarks/record.py suites/quickstart.yaml\n" + "\n".join(moved)


def test_the_readme_quotes_the_recorded_language_model_quickstarts():
    """README's language-model section quotes both recorded quickstart runs (each method's final accuracy and
    forgetting, best first, and the CPU time)."""
    def line(name: str) -> str:
        runs = result(f"{name}.json")["runs"]
        order = sorted(runs, key=lambda m: -runs[m]["0"]["final/acc"])
        return ", ".join(f"{m} {runs[m]['0']['final/acc']:.2f} / {runs[m]['0']['final/forgetting']:.2f}"
                         for m in order)

    quotes = [f"on the tiny T5: {line('lm-quickstart')};", f"on the tiny causal LM: {line('lm-quickstart-causal')}.",
              f"one thread, {result('lm-quickstart.json')['cpu_seconds']:.0f} s and "
              f"{result('lm-quickstart-causal.json')['cpu_seconds']:.0f} s of CPU"]
    assert not missing_in("README.md", quotes), missing_in("README.md", quotes)


def test_architecture_quotes_the_recorded_dispatch_measurement():
    """docs/ARCHITECTURE.md's choice of the per-run pluggy manager over a typed base rests on part (e) of
    benchmarks/overhead.py as recorded in benchmarks/results/overhead-dispatch.json."""
    f = result("overhead-dispatch.json")["figures"]
    quotes = [f"recorded {f['dispatch_us/pluggy/one_term']:.1f} us per step through pluggy against "
              f"{f['dispatch_us/typed/one_term']:.1f} us through the typed adapter",
              f"(`dispatch_ratio/one_term={f['dispatch_ratio/one_term']:.2f}`; {f['dispatch_us/pluggy/lora']:.1f} vs "
              f"{f['dispatch_us/typed/lora']:.1f} us, ratio {f['dispatch_ratio/lora']:.2f}, for `lora`",
              f"at {f['step_us_bare'] / 1000:.1f} ms: the dispatch is {100 * f['dispatch_share/pluggy']:.2f} % of a "
              f"step through pluggy, {100 * f['dispatch_share/typed']:.2f} % through the typed adapter",
              "benchmarks/results/overhead-dispatch.json"]
    assert not missing_in("docs/ARCHITECTURE.md", quotes), missing_in("docs/ARCHITECTURE.md", quotes)


def test_performance_quotes_the_recorded_decoding_run():
    """docs/PERFORMANCE.md's table of greedy decoding with kept keys and values against the rerun of every token."""
    data = result("lm-decoding.json")
    f = data["figures"]
    quotes = ["python benchmarks/record.py --script benchmarks/lm_decoding.py -- --repeats 5",
              "`benchmarks/results/lm-decoding.json`; 2026-12-07, load average "
              f"{data['load']['loadavg_1min_before']:.1f};"]
    for name in ("t5_tiny_clbench", "llama_tiny_clbench"):
        for tokens in (4, 16, 32):
            key = f"{name}/tokens{tokens}"
            assert f[f"same_texts/{key}"] == 1, key
            quotes.append(f"| `{name}`, {tokens} | {f[f'decode_ms/{key}/cached']:.1f} ms | "
                          f"{f[f'decode_ms/{key}/rerun']:.1f} ms | {f[f'decode_ratio/{key}']:.2f} |")
    assert data["date"].startswith("2026-12-07")  # the date the text states; change both together
    assert not missing_in("docs/PERFORMANCE.md", quotes), missing_in("docs/PERFORMANCE.md", quotes)
