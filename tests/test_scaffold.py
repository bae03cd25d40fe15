"""``clbench new-method``: the generated plugin and test pass as generated, the plugin is discoverable from
its folder, and bad names or existing files give one clear error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clbench import contract
from clbench.cli import app
from clbench.errors import ClbenchError
from clbench.scaffold import new_method


def test_generated_plugin_and_test_pass_as_generated(tmp_path):
    res = CliRunner().invoke(app, ["new-method", "my_pull", "--dir", str(tmp_path / "plugs")])
    assert res.exit_code == 0, res.output
    plugin, test = tmp_path / "plugs" / "my_pull.py", tmp_path / "plugs" / "tests" / "test_my_pull.py"
    assert f"wrote {plugin}" in res.stdout and f"wrote {test}" in res.stdout
    # The generated test file, run by pytest exactly as the contributor would run it.
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 passed" in out.stdout  # contract (with resume), the explicit resume test, the property
    # The plugin folder works as --plugins-dir; the tests/ subfolder is not mistaken for plugins.
    res = CliRunner().invoke(
        app, ["methods", "my_pull", "--params", "--plugins-dir", str(tmp_path / "plugs")]
    )
    assert res.exit_code == 0, res.output
    assert "my_pull" in res.stdout and "rank = 4: LoRA rank r" in res.stdout and "error" not in res.stderr


def test_every_template_generates_a_plugin_whose_tests_pass(tmp_path):
    """lora (also above), plain (NoParams, no adapters), prompt and rehearsal: each generated plugin's tests pass as
    generated, run by pytest as the contributor would (one process for all four: 4 x contract, resume, property)."""
    from clbench.templates import TEMPLATES

    for kind in TEMPLATES:
        res = CliRunner().invoke(app, ["new-method", f"t_{kind}", "--template", kind, "--dir", str(tmp_path / "plugs")])
        assert res.exit_code == 0, res.output
    text = (tmp_path / "plugs" / "t_plain.py").read_text()
    assert "class TPlainParams(NoParams)" in text and "def configure_model" not in text
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=tmp_path / "plugs", capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert f"{3 * len(TEMPLATES)} passed" in out.stdout
    res = CliRunner().invoke(app, ["methods", "--plugins-dir", str(tmp_path / "plugs")])
    assert all(f"t_{kind}" in res.stdout for kind in TEMPLATES) and "error" not in res.stderr
    # the prompt and rehearsal methods have no language form: their templates declare image backbones only
    from clbench.methods.registry import discover

    reg = discover([str(tmp_path / "plugs")], strict=False)
    kinds = {kind: tuple(reg.get(f"t_{kind}").cls.backbones) for kind in TEMPLATES}
    assert kinds == {"lora": ("image", "language"), "plain": ("image", "language"), "prompt": ("image",),
                     "rehearsal": ("image",)}, kinds
    res = CliRunner().invoke(app, ["new-method", "other", "--template", "lorra"])
    assert res.exit_code == 1 and res.stderr.strip() == ("error: new-method: --template lorra: choose one of "
                                                         "lora, plain, prompt, rehearsal")


def test_generated_plugin_leaves_todos_and_cites_nothing_yet(tmp_path):
    plugin, _ = new_method("other_method", tmp_path)
    text = plugin.read_text()
    assert "class OtherMethod(Method)" in text and 'name = "other_method"' in text
    assert text.count("TODO") >= 4  # summary, paper, code, deviations: what review will ask for
    cls = contract.load_plugin_file(plugin).get("other_method").cls
    contract.check_registration(cls)


def test_separate_tests_dir_points_back_to_the_plugin(tmp_path):
    plugin, test = new_method("sep", tmp_path / "src" / "plugs", tests_dir=tmp_path / "tests")
    assert test == tmp_path / "tests" / "test_sep.py"
    assert '"../src/plugs/sep.py"' in test.read_text()
    assert (test.parent / "../src/plugs/sep.py").resolve() == plugin.resolve()


@pytest.mark.parametrize(
    "name, match",
    [
        ("My-Method", "lowercase letters, digits"),
        ("2fast", "lowercase letters, digits"),
        ("my method", "lowercase letters, digits"),
        ("lora", r"a method 'lora' already exists \(entry point 'lora = clbench_plugins\.lora'"),
        ("seqlora", "a method 'lora' already exists"),
    ],
)
def test_bad_names_are_refused(tmp_path, name, match):
    with pytest.raises(ClbenchError, match=match):
        new_method(name, tmp_path)
    assert not list(tmp_path.iterdir())


def test_never_overwrites(tmp_path):
    new_method("mine", tmp_path)
    before = (tmp_path / "mine.py").read_text()
    (tmp_path / "mine.py").write_text(before + "# my edits\n")
    res = CliRunner().invoke(app, ["new-method", "mine", "--dir", str(tmp_path)])
    assert res.exit_code == 1
    assert (
        res.stderr.strip() == f"error: new-method mine: {tmp_path / 'mine.py'} already exists; remove it or "
        "choose another --dir"
    )
    assert (tmp_path / "mine.py").read_text().endswith("# my edits\n")


def test_contributing_tutorial_matches_the_example_package():
    """Every code block of the tutorial (section 2) is copied verbatim from the example plugin."""
    root = Path(__file__).resolve().parents[1]
    guide = (root / "CONTRIBUTING.md").read_text()
    tutorial = guide[guide.index("## 2. Tutorial") : guide.index("## 3. The hooks")]
    blocks = re.findall(r"```python\n(.*?)```", tutorial, flags=re.S)
    example = (root / "examples" / "clbench-lora-l2" / "clbench_lora_l2.py").read_text()
    assert len(blocks) >= 8
    for block in blocks:
        assert block in example, block


def test_generated_plugin_is_two_hooks_and_still_reports_spectra(tmp_path):
    """The simplest method is two hooks plus register_methods; clbench computes its task updates."""
    from clbench.methods.registry import HOOK_NAMES
    from clbench.testing import run_method, tiny_stream

    plugin, test = new_method("two-hooks", tmp_path)  # '-' is allowed in names, not in module names
    assert (plugin.name, test.name) == ("two_hooks.py", "test_two_hooks.py")
    cls = contract.load_plugin_file(plugin).get("two-hooks").cls
    hooks = sorted(h for h in HOOK_NAMES if hasattr(getattr(cls, h, None), "clbench_impl"))
    # the two hooks that train, and the resume pair as stubs (a stateless method keeps them empty)
    assert hooks == ["configure_model", "load_method_state", "loss_terms", "method_state"]
    run = run_method(cls({"rank": 2}), tiny_stream(samples_per_class=8), batch_size=8, max_steps_per_epoch=2)
    for res in run.results:
        assert res.updates and all(u.rank == 4 for u in res.updates.values())  # [B_t, -B_(t-1)] [A_t; A_(t-1)]


def test_run_method_returns_the_model_configure_model_put_in_place():
    """``testing.run_method`` hands back the trained model, also when ``configure_model`` replaced it."""
    import copy

    from clbench import hookimpl
    from clbench.methods.registry import discover
    from clbench.testing import run_method, tiny_stream

    base = discover(strict=False).get("lora").cls

    class Replacing(base):
        name = "replacing"

        @hookimpl
        def configure_model(self, model, ctx):
            self.replacement = copy.copy(model)  # a new wrapper object around the same backbone
            super().configure_model(self.replacement, ctx)
            return self.replacement

    method = Replacing({"rank": 2})
    run = run_method(method, tiny_stream(samples_per_class=8), max_steps_per_epoch=1)
    assert run.model is method.replacement
