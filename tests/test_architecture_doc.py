"""docs/ARCHITECTURE.md stays true to the code: its MLflow keys table is the one generated from clbench/keys.py,
every layer folder it lists exists and says what it holds, and no file cites the DESIGN.md the repository does not
have."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import clbench
from clbench import keys

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
LAYERS = ("data", "model", "methods", "run", "store", "analysis")


def _table_module():
    spec = importlib.util.spec_from_file_location("keys_table", ROOT / "docs" / "keys_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_keys_table_is_generated_from_keys_py():
    table = _table_module()
    doc = DOC.read_text()
    assert table.replaced(doc) == doc, "stale keys table: run python docs/keys_table.py --write"
    rows = table.rows()
    written = {key for _, key, _, _ in rows}
    for name, value in vars(keys).items():  # every key constant of clbench.keys has its row
        if name.isupper() and isinstance(value, str):
            assert value in written, name
    assert {"eval/acc/task_{j}", "clbench.runtime.{name}", "claim/{label}/{metric}_diff"} <= written


def test_every_layer_folder_is_listed_and_says_what_it_holds():
    doc = DOC.read_text()
    for layer in LAYERS:
        init = ROOT / "clbench" / layer / "__init__.py"
        assert f"`clbench/{layer}/`" in doc, layer
        text = init.read_text()
        docstring = re.match(r'\s*"""(.+?)"""', text, re.S)
        assert docstring and len(docstring.group(1).split()) > 30, f"{init}: a one-paragraph docstring"
        modules = {p.stem for p in init.parent.glob("*.py")} - {"__init__"}
        named = {m for m in modules if f"``{m}``" in docstring.group(1) or f"`{m}`" in doc}
        assert named == modules, f"{layer}: modules not described: {sorted(modules - named)}"
    assert Path(clbench.__file__).parent == ROOT / "clbench"


def test_no_file_cites_the_missing_design_doc():
    found = subprocess.run(["git", "grep", "-l", "DESIGN" + "[.]md"], cwd=ROOT, capture_output=True, text=True)
    citing = [f for f in found.stdout.split() if f != "tests/test_architecture_doc.py"]
    assert found.returncode in (0, 1) and not citing, citing
