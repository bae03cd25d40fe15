"""What a method declares it runs on (``clbench.Method.backbones``: image, language or both) is what it runs on: a
built-in declaring the language kind trains on a tiny language model and one declaring only the image kind fails
there; a suite pairing a method with a kind it does not declare is refused before any MLflow run (the corpus
cases ``tests/bad_suites/lm_method_*.yaml``), for an outside plugin's declaration too, and a plugin that declares
nothing keeps running on both kinds as before the declaration existed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from clbench.cli import app
from clbench.methods.method import BACKBONE_KINDS, supported_backbones
from clbench.methods.registry import discover
from clbench.testing import builtin_method, tiny_suite, write_plugin

BUILTINS = sorted(discover().methods)


@pytest.mark.parametrize("name", BUILTINS)
def test_a_builtin_runs_on_a_language_model_exactly_when_it_declares_so(name, monkeypatch):
    pytest.importorskip("transformers", reason="the language-model extra is not installed: pip install 'clbench[lm]'")
    from clbench.testing import run_method, tiny_text_case

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cls = builtin_method(name)
    params = {"init_head": "untrained"} if name == "eblora" else None
    declared = "language" in supported_backbones(cls)
    try:  # the loop straight, past the preflight's refusal: does the method's code run on a language model?
        run = run_method(cls(params), stream=tiny_text_case(2), max_steps_per_epoch=1)
    except Exception as exc:  # noqa: BLE001 - any failure: the method cannot run there
        assert not declared, f"{name} declares the language kind but failed on a tiny T5: {exc}"
        assert getattr(cls, "backbones_note", ""), f"{name} refuses language models without saying why"
        return
    assert declared, f"{name} ran on a tiny T5 but declares backbones = {supported_backbones(cls)}"
    assert len(run.results) == 2


PLUGIN = '''
from clbench_plugins.lora import NaiveLoRA

class Kinds(NaiveLoRA):
    name = "kinds_lora"
    aliases = ()
{body}

def register_methods(register):
    register(Kinds)
'''


def plugin(tmp_path, module: str, body: str):
    """A plugins folder of its own holding ``module``, which registers ``kinds_lora`` with ``body`` in its class."""
    folder = tmp_path / module
    write_plugin(folder, module, PLUGIN.format(body=body))
    return folder


def lm_suite(folder) -> str:
    path = folder / "lm.yaml"
    path.write_text("name: lm\nstream: {name: lm_synthetic, num_tasks: 2, samples_per_class: 4}\n"
                    "backbone: {name: t5_tiny_clbench, pretrained: false}\ntrain: {epochs: 1, batch_size: 8}\n"
                    "runtime: {device: cpu}\nmethods:\n  - {name: kinds_lora, params: {rank: 2}}\n")
    return str(path)


def dry_run(suite: str, plugins, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return CliRunner().invoke(app, ["run", suite, "--dry-run", "--plugins-dir", str(plugins)])


def test_an_outside_plugins_declaration_is_honoured_and_no_declaration_means_both(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the language-model extra is not installed: pip install 'clbench[lm]'")
    suite = lm_suite(tmp_path)
    plugins = plugin(tmp_path, "kinds_none", "    pass")  # declares nothing: every kind, as before
    assert supported_backbones(discover([str(plugins)]).get("kinds_lora").cls) == BACKBONE_KINDS
    res = dry_run(suite, plugins, monkeypatch, tmp_path)
    assert res.exit_code == 0, res.output
    plugins = plugin(tmp_path, "kinds_image",
                     '    backbones = ("image",)\n    backbones_note = "it reads the class token"')
    res = dry_run(suite, plugins, monkeypatch, tmp_path)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.stderr.strip() == (
        f"error: {suite}: methods.0.name: method 'kinds_lora' runs on image backbones only, not on a language "
        "backbone: it reads the class token (backbone t5_tiny_clbench); remove the entry or choose a method that "
        "runs on it (clbench methods NAME says which backbones; checked before creating any MLflow run)")


def test_a_language_only_plugin_is_refused_on_a_vit_and_a_bad_declaration_at_registration(tmp_path, monkeypatch):
    path = tiny_suite(tmp_path, "image", one_method=True)
    path.write_text(path.read_text().replace("{name: lora,", "{name: kinds_lora,"))
    suite = str(path)
    plugins = plugin(tmp_path, "kinds_language", '    backbones = ("language",)')
    res = dry_run(suite, plugins, monkeypatch, tmp_path)
    assert res.exit_code == 1, res.output
    assert ("methods.0.name: method 'kinds_lora' runs on language backbones only, not on an image backbone: its "
            "class declares backbones = ('language',)") in res.stderr
    plugins = plugin(tmp_path, "kinds_text", '    backbones = ("text",)')
    res = dry_run(suite, plugins, monkeypatch, tmp_path)
    assert res.exit_code == 1, res.output
    assert ("method 'kinds_lora': backbones must be a non-empty tuple of 'image', 'language'; got ('text',)"
            in res.stderr)
