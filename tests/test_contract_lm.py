"""The plugin contract (clbench.contract) on a tiny language model: every built-in adapter method runs unchanged on
the attention projections of a T5 (and a LLaMA-style causal LM): finite losses, well-formed accuracy matrices and
task updates, frozen base weights, determinism, a bit-exact resume. The methods with no language form (CL-LoRA,
the prompt methods, rehearsal, the linear-head references) declare it and are refused on a language backbone
(tests/test_backbone_kinds.py, docs/METHODS.md section 11)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the language-model extra is not installed: pip install 'clbench[lm]'")

from clbench.contract import language_checks  # noqa: E402
from clbench.testing import builtin_method  # noqa: E402

ADAPTERS = ["lora", "olora", "inflora", "eblora", "sdlora"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_method_keeps_the_contract_on_tiny_t5(name):
    params = {"init_head": "untrained"} if name == "eblora" else None  # its linear probe: covered on the ViT
    for _, check in language_checks(builtin_method(name), params):
        check()


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_method_keeps_the_contract_on_tiny_causal_lm(name):
    params = {"init_head": "untrained"} if name == "eblora" else None
    for _, check in language_checks(builtin_method(name), params, backbone="llama_tiny_clbench"):
        check()


def test_clbench_check_runs_the_contract_on_a_language_model_too():
    from typer.testing import CliRunner

    from clbench.cli import app

    result = CliRunner().invoke(app, ["check", "lora", "--set", "rank=2", "--lm", "llama_tiny_clbench"])
    assert result.exit_code == 0, result.output
    assert "ok    two tasks on llama_tiny_clbench" in result.output and "ok    two tasks on the tiny ViT" in result.output
    bad = CliRunner().invoke(app, ["check", "lora", "--lm", "gpt9"])
    assert bad.exit_code == 1 and "--lm gpt9: choose a tiny language backbone" in bad.output
    # a method declaring image backbones only (Method.backbones): refused with its reason, before any check runs
    image_only = CliRunner().invoke(app, ["check", "er", "--lm", "llama_tiny_clbench"])
    assert image_only.exit_code == 1 and image_only.stderr.strip() == (
        "error: --lm llama_tiny_clbench: method 'er' runs on image backbones only, not on a language backbone: "
        f"{builtin_method('er').backbones_note}")
    shown = CliRunner().invoke(app, ["methods", "er"])
    assert f"    backbones: image ({builtin_method('er').backbones_note})" in shown.output
    assert "    backbones: image, language" in CliRunner().invoke(app, ["methods", "olora"]).output
