"""``clbench new-method NAME``: write a working method plugin and its test file, ready to be edited.

The generated plugin is a plain sequential LoRA with every hook a method usually needs, each with a comment
saying when it runs; the generated test runs the full contract (``clbench.contract.check_method``) plus one
property test to replace with the property that makes the new method what it is. Both pass as generated, so
a contributor starts from green and changes one thing at a time (CONTRIBUTING.md walks through it).
"""

from __future__ import annotations

import keyword
import os
import re
from pathlib import Path

from clbench.errors import ClbenchError

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

PLUGIN = '''"""{name}: TODO one line saying what the method does and why it should forget less.

Paper: TODO authors, "title", venue year (arXiv id).
Official code: TODO github.com/owner/repo (or "none").

Deviations from the official code (every deliberate difference, or "none"):
- TODO
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from clbench.hookspecs import hookimpl
from clbench.lora import LowRank, inject
from clbench.method import Method


class {cls}Params(BaseModel):
    # Defaults are the paper's settings; each description is shown by `clbench methods {name} --params`.
    # A suite sets them in methods: [{{name: {name}, params: {{rank: 8}}}}]; on the command line
    # --set methods.{name}.params.rank=8 overrides them.
    model_config = ConfigDict(extra="forbid")  # a typo in a suite's params must fail, not be ignored
    rank: int = Field(4, ge=1, description="LoRA rank r")
    targets: list[str] = Field(["q", "v"], min_length=1,
                               description="adapted maps: q, k, v, qkv, proj, fc1, fc2")


class {cls}(Method):
    name = "{name}"
    paper = "TODO authors, title, venue year"
    code = "TODO github.com/owner/repo"
    trains_backbone = False  # True only if the method changes pre-trained weights by gradient
    Params = {cls}Params

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.sites = {{}}  # adapted layer name -> clbench.lora.LoRASite
        self._before: dict[str, LowRank] = {{}}
        self._update: dict[str, LowRank] = {{}}

    @hookimpl
    def configure_model(self, model, ctx):
        """Once, before the first task: add adapters (inject freezes the backbone)."""
        self.sites = inject(model.backbone, self.params.targets)
        for site in self.sites.values():
            site.add_branch(self.params.rank)

    @hookimpl
    def before_task(self, model, ctx):
        """Each task, before the optimizer exists: remember the adapters, to report the task's update."""
        self._before = {{n: s.update() for n, s in self.sites.items()}}

    @hookimpl
    def param_groups(self, model, ctx):
        """What the optimizer trains (the loop adds the current task's head itself)."""
        live = [p for s in self.sites.values() for p in s.branches[-1].parameters()]
        return [{{"params": live, "name": "lora"}}]

    @hookimpl
    def loss_terms(self, model, batch, logits, ctx):
        """Each step: extra loss terms by name (logged as train/<name>). TODO: the method's regulariser."""
        return {{}}

    @hookimpl
    def after_task(self, model, ctx):
        """End of the task, adapters still separate: this task's update is the change of B A."""
        self._update = {{n: s.update() - self._before[n] for n, s in self.sites.items()}}

    @hookimpl
    def task_updates(self, model, ctx):
        """This task's update per adapted layer as factors; clbench measures its spectrum."""
        return self._update


def register_methods(register):
    register({cls})
'''

TEST = '''"""Tests of the {name} method plugin: the clbench contract, then what makes it {name}."""

from __future__ import annotations

from pathlib import Path

import torch

from clbench import contract
from clbench.testing import run_method, tiny_stream

PLUGIN = Path(__file__).resolve().parent / "{relpath}"
METHOD = contract.load_plugin_file(PLUGIN).get("{name}").cls


def test_contract():
    """Registration, a two-task run on a tiny ViT, frozen weights, well-formed updates, determinism."""
    contract.check_method(METHOD)


def test_update_rank_is_bounded():
    # TODO replace with the property that makes {name} that method (what its paper proves or claims), e.g.
    # "the new update is orthogonal to the old ones" or "the penalty equals its formula on known factors".
    rank = 2
    run = run_method(METHOD({{"rank": rank}}), tiny_stream(samples_per_class=8), batch_size=8,
                     max_steps_per_epoch=2)
    for name, update in run.results[1].updates.items():
        r = int(torch.linalg.matrix_rank(update.dense()))
        assert 0 < r <= 2 * rank, (name, r)  # B_t A_t - B_(t-1) A_(t-1) has rank at most 2r
'''


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_") if part) or "Method"


def check_name(name: str) -> None:
    if not NAME_RE.match(name) or keyword.iskeyword(name):
        raise ClbenchError(f"new-method {name}: a method name must be a lowercase Python identifier "
                           "(letters, digits, underscores, starting with a letter), e.g. l2pull or my_lora")


def new_method(name: str, directory: str | Path = ".", tests_dir: str | Path | None = None,
               check_registry: bool = True) -> list[Path]:
    """Write ``DIR/NAME.py`` and ``TESTS/test_NAME.py`` (default TESTS = DIR/tests); return both paths.

    Refuses names that are not identifiers or already registered, and never overwrites a file.
    """
    check_name(name)
    if check_registry:
        from clbench.registry import discover

        reg = discover(strict=False)
        if name in reg.methods or name in reg.aliases:
            owner = reg.get(name)
            raise ClbenchError(f"new-method {name}: a method '{owner.name}' already exists ({owner.source}); "
                               "choose another name")
    directory = Path(directory)
    tests = Path(tests_dir) if tests_dir is not None else directory / "tests"
    plugin, test = directory / f"{name}.py", tests / f"test_{name}.py"
    for path in (plugin, test):
        if path.exists():
            raise ClbenchError(f"new-method {name}: {path} already exists; remove it or choose another --dir")
    if directory.exists() and not directory.is_dir():
        raise ClbenchError(f"new-method {name}: --dir {directory} is not a directory")
    plugin.parent.mkdir(parents=True, exist_ok=True)
    tests.mkdir(parents=True, exist_ok=True)
    relpath = Path(os.path.relpath(plugin.resolve(), tests.resolve())).as_posix()
    plugin.write_text(PLUGIN.format(name=name, cls=_class_name(name)))
    test.write_text(TEST.format(name=name, relpath=relpath))
    return [plugin, test]
