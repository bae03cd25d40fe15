"""docs/REPRODUCTION.md's conformance tables, generated from tests/conformance/*.json and clbench's effective
protocol (``clbench.run.protocol.effective_protocol``, compared by tests/test_conformance.py's ``differences``).

    python benchmarks/conformance/tables.py            # rewrite the section between the markers
    python benchmarks/conformance/tables.py --check    # exit 1 if the section is stale
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clbench.run.protocol import effective_protocol  # noqa: E402
from clbench.suite import load_suite  # noqa: E402

DOC = ROOT / "docs" / "REPRODUCTION.md"
BEGIN, END = "<!-- conformance tables: begin (benchmarks/conformance/tables.py) -->", "<!-- conformance tables: end -->"
_spec = importlib.util.spec_from_file_location("conformance_test", ROOT / "tests" / "test_conformance.py")
_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_test)


def short(value, n: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return (text[:n] + "...") if len(text) > n else text


def ours_of(key: str, p: dict):
    if key in ("train_augment", "test_output") and p[key] is None:  # a text suite: no image path
        return None
    if key == "train_augment":
        return {k: p["train_augment"][k] for k in ("scale", "ratio", "flip_p")}
    if key == "test_output":
        return {"mean": p["test_output"]["mean"], "std": p["test_output"]["std"]}
    if key == "class_order":
        return {str(s): o[:5] for s, o in (p["class_order"] or {}).items()}
    if key == "trainable_params":
        return "`clbench.run.protocol.trainable_params` (slow test)"
    return p.get(key)


def table(path: Path) -> list[str]:
    fixture = json.loads((ROOT / "tests" / "conformance" / (path.stem + ".json")).read_text())
    suite = load_suite(path)
    p = effective_protocol(suite)
    diff = _test.differences(fixture["items"], p)
    commit = fixture["commit"][:7]
    lines = [f"### `suites/repro/{path.name}` against {fixture['repository']}@{commit} (`{fixture['config']}`)", "",
             "| key | official (where @commit; how) | clbench | same |", "|---|---|---|---|"]
    for key, rec in fixture["items"].items():
        value = rec["value"]
        if key == "class_order" and value:
            value = {s: o[:5] for s, o in value["orders"].items()}
        if key == "test_output" and value:
            value = {"mean": value["mean"], "std": value["std"]}
        same = ("not run" if rec["value"] is None else "statistics only" if key == "train_output" else
                "compared by the slow test" if key == "trainable_params" else
                "no (declared)" if key in diff else "yes")
        where = f"`{rec['where']}` @{commit}; {rec['how'].split(':')[0]}" if rec["where"] else rec["how"].split(":")[0]
        mine = "" if key == "train_output" else short(ours_of(key, p))
        lines.append(f"| {key} | {short(value)} ({where}) | {mine} | {same} |".replace("\n", " "))
    return lines + [""]


def section() -> str:
    out = [BEGIN, "", "Generated from `tests/conformance/*.json` (recorded by `benchmarks/conformance/generate.py` "
           "running the official code; O-LoRA's, which needs DeepSpeed and GPUs, read by hand from the cited "
           "lines) and clbench's effective protocol; `tests/test_conformance.py` fails on a "
           "difference that the suite's reference notes do not declare. Lists show the first entries.", ""]
    for path in sorted((ROOT / "suites" / "repro").glob("*.yaml")):
        out += table(path)
    return "\n".join(out + [END])


def main() -> None:
    text = DOC.read_text()
    new = section()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        updated = head + new + rest.split(END, 1)[1]
    else:
        updated = text.rstrip("\n") + "\n\n## Conformance with the official code (issue 31)\n\n" + new + "\n"
    if "--check" in sys.argv:
        sys.exit(0 if updated == text else 1)
    DOC.write_text(updated)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
