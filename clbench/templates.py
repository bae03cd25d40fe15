"""The method templates of ``clbench new-method NAME --template T``: each a working plugin module and the body of
its test file, as ``str.format`` templates (``{name}``, ``{cls}``; literal braces doubled).

* ``lora``: sequential LoRA in two hooks (adapters in ``configure_model``, a ``loss_terms`` to fill in);
* ``plain``: no adapters, params on ``clbench.NoParams``: the heads train on the frozen backbone (contract 3's
  default), or the whole backbone with ``trains_backbone = True``; one ``loss_terms``;
* ``prompt``: a prompt method: a ``clbench.PromptModel`` with learned tokens after [CLS] (``select`` is where a
  method picks prompts per image), through ``clbench.PromptMethod``;
* ``rehearsal``: LoRA plus a buffer of earlier tasks' samples kept as a stream index, replayed every step
  (``replay_batch``, scope ``"seen"``), earlier heads trained, the buffer in ``method_state``.

Every generated test file runs the contract, a resume comparison and one property test for the contributor to
replace; all pass as generated (tests/test_scaffold.py generates each template and runs its tests).
"""

from __future__ import annotations

from dataclasses import dataclass

# The skeleton every template shares, in ``str.format`` form: the module's docstring, imports, params class,
# method class (name / paper / code) and register_methods; the test file's contract, resume and property tests.
# Each template below passes only its own parts.

_DOCSTRING = """\
\"\"\"{name}: TODO one line saying what the method does and why it should forget less.

Paper: TODO authors, "title", venue year (arXiv id).
Official code: TODO github.com/owner/repo (or "none").

Deviations from the official code (every deliberate difference, or "none"):
- TODO
\"\"\"
"""


@dataclass(frozen=True)
class _Shape:
    """Where a template's module differs from the plain one. ``hooks``: its hooks take ``nn.Module`` and
    ``dict[str, Any]``; ``bases`` of the method class; ``preamble``: comment lines opening that class;
    ``helpers``: classes before it."""

    hooks: bool = True
    bases: str = "Method"
    preamble: str = ""
    helpers: str = ""
    image_only: str = ""  # why the method runs on image backbones only (declared), or "" (both kinds)


@dataclass(frozen=True)
class _TestParts:
    """Where a template's test file differs from the plain one: ``contract_params`` for the contract check,
    ``resume_doc`` (the resume test's docstring lines) and ``todo_tail`` (how the property test's TODO ends)."""

    contract_params: str = ""
    resume_doc: str = ""
    todo_tail: str = "."


def _module(clbench_names: str, params_base: str, params: str, body: str, shape: _Shape = _Shape()) -> str:
    """A plugin module: ``clbench_names`` imported from clbench, ``class {cls}Params(params_base)`` with the field
    lines ``params``, ``shape.helpers`` classes, then ``class {cls}(shape.bases)``: ``shape.preamble``, its
    name / paper / code, then ``body``."""
    hooks, bases, preamble, helpers = shape.hooks, shape.bases, shape.preamble, shape.helpers
    kinds = (f'    backbones = ("image",)  # {shape.image_only}; the kinds it runs on: CONTRIBUTING.md\n'
             if shape.image_only else
             '    # backbones = ("image",)  # the kinds it runs on; default both ("image", "language"): CONTRIBUTING.md\n')
    typing, nn = ("from typing import Any\n", "from torch import nn\n") if hooks else ("", "")
    return (f"{_DOCSTRING}\nfrom __future__ import annotations\n\nfrom collections.abc import Callable\n{typing}\n"
            f"import torch\nfrom pydantic import Field\n{nn}\nfrom clbench import {clbench_names}\n\n\n"
            f"class {{cls}}Params({params_base}):\n{params}\n\n{helpers}"
            f"class {{cls}}({bases}):\n{preamble}"
            '    name = "{name}"\n'
            '    paper = "TODO authors, title, venue year"\n'
            '    code = "TODO github.com/owner/repo"\n'
            f"{kinds}{body}\n\n"
            "def register_methods(register: Callable[[type], None]) -> None:\n"
            "    register({cls})\n")


def _tests(checks: str, resume_params: str, prop: str, prop_body: str, parts: _TestParts = _TestParts()) -> str:
    """A test file's body: the contract (``checks`` in its docstring, ``parts.contract_params`` if any), the
    resume comparison with ``resume_params`` (``parts.resume_doc``: its docstring lines, if any) and
    ``test_{prop}``, the property test for the contributor to replace: a TODO line (ending in ``parts.todo_tail``)
    then ``prop_body``."""
    contract_params, resume_doc, todo_tail = parts.contract_params, parts.resume_doc, parts.todo_tail
    contract_args = f", {contract_params}" if contract_params else ""
    return ("\n\ndef test_contract():\n"
            f'    """Registration, a two-task run on a tiny ViT, {checks}."""\n'
            f"    contract.check_method(METHOD{contract_args})\n\n\n"
            f"def test_resume_matches_an_uninterrupted_run():\n{resume_doc}"
            f"    assert_resumes(METHOD, {resume_params}, after=2, num_tasks=3)\n\n\n"
            f"def test_{prop}():\n"
            "    # TODO replace with the property that makes {name} that method (what its paper proves or claims)"
            f"{todo_tail}\n{prop_body}")


_NO_STATE = """\
    @hookimpl
    def method_state(self, ctx: TaskContext) -> dict[str, Any] | None:
        \"\"\"After each task, for the checkpoint: the method's own state outside the model. TODO if it keeps any.\"\"\"
        return None
"""

LORA = _module("LoRAParams, Method, StepBatch, TaskContext, hookimpl, inject", "LoRAParams", """\
    # rank, alpha, targets, blocks and dropout come from LoRAParams; redeclare one only to change its default.
    # Defaults are the paper's settings; each description is shown by `clbench methods {name} --params`.
    # A suite sets them in methods: [{{name: {name}, params: {{rank: 8}}}}]; on the command line
    # --set methods.0.params.rank=8 overrides them. A typo in a suite's params fails with one line.
    rank: int = Field(4, ge=1, description="LoRA rank r")
    strength: float = Field(0.0, ge=0, description="TODO weight of the method's loss term")
""", """\
    trains_backbone = False  # True only if the method changes pre-trained weights by gradient
    Params = {cls}Params

    # Two hooks are enough: the loop trains every parameter that requires grad (the branches; inject freezes
    # the backbone) and clbench reports each task's update (the change of B A) for spectra. Add before_task,
    # param_groups, after_task, merge_task or task_updates (CONTRIBUTING.md section 3) when the method needs them.

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: TaskContext) -> None:
        \"\"\"Once, before the first task: add adapters (inject freezes the backbone).\"\"\"
        p = self.params
        for site in inject(model.backbone, p.targets, p.blocks).values():
            site.add_branch(p.rank, scale=p.scale, dropout=p.dropout)

    @hookimpl
    def loss_terms(self, model: nn.Module, ctx: TaskContext, step: StepBatch) -> dict[str, torch.Tensor] | None:
        \"\"\"Each step: extra loss terms by name (logged as train/<name>). TODO: the method's regulariser.\"\"\"
        return None

    # Resume after a crash: the model's parameters are checkpointed for you; anything else the method keeps
    # across tasks (a Fisher, an anchor, old subspaces) must go out through method_state and come back through
    # load_method_state, detached, as tensors / numbers / lists / dicts. The contract's resume check fails
    # when method_state returns state that nothing restores, or when a resumed run differs from an
    # uninterrupted one.

""" + _NO_STATE + """
    @hookimpl
    def load_method_state(self, model: nn.Module, state: dict[str, Any], ctx: TaskContext) -> None:
        \"\"\"On resume, after configure_model: restore what method_state returned (``state``; empty when it
        returned None) and rebuild adapters added after configure_model, so the checkpoint's weights load.\"\"\"
""")

LORA_TESTS = _tests("frozen weights, well-formed updates, determinism, resume", '{{"rank": 2}}',
                    "update_rank_is_bounded", """\
    # "the new update is orthogonal to the old ones" or "the penalty equals its formula on known factors".
    rank = 2
    run = run_method(METHOD({{"rank": rank}}), tiny_stream(samples_per_class=8), batch_size=8,
                     max_steps_per_epoch=2)
    for name, update in run.results[1].updates.items():
        r = int(torch.linalg.matrix_rank(update.dense()))
        assert 0 < r <= 2 * rank, (name, r)  # B_t A_t - B_(t-1) A_(t-1) has rank at most 2r
""", _TestParts(resume_doc="""\
    \"\"\"Interrupted after task 2 of 3, checkpointed, reloaded (weights_only) into a fresh instance, continued:
    bit-identical to the uninterrupted run. Use the params that change what method_state keeps.\"\"\"
""", todo_tail=", e.g."))

PLAIN = _module("Method, NoParams, StepBatch, TaskContext, hookimpl", "NoParams", """\
    # NoParams: the params base of a method without adapters (no fields of its own; unknown keys refused).
    # Defaults are the paper's settings; each description is shown by `clbench methods {name} --params`.
    strength: float = Field(0.0, ge=0, description="TODO weight of the method's loss term")
""", """\
    # No configure_model and no param_groups: clbench keeps the pre-trained backbone frozen and trains each
    # task's head. Set trains_backbone = True to fine-tune the whole backbone instead (then every backbone
    # parameter trains); add configure_model / param_groups for anything in between.
    trains_backbone = False
    low_rank_updates = False  # no adapters, so no low-rank update for the spectra (their columns read n/a)
    Params = {cls}Params

    @hookimpl
    def loss_terms(self, model: nn.Module, ctx: TaskContext, step: StepBatch) -> dict[str, torch.Tensor] | None:
        \"\"\"Each step: extra loss terms by name (logged as train/<name>). TODO: the method's regulariser; this one
        is an L2 penalty on the current head's weights.\"\"\"
        if self.params.strength == 0:
            return None
        return {{"l2": self.params.strength * model.heads[ctx.task].weight.pow(2).sum()}}

    # Anything the method keeps across tasks goes out through method_state and back through load_method_state
    # (detached tensors / numbers / lists / dicts); the contract's resume check holds it to that.

""" + _NO_STATE + """
    @hookimpl
    def load_method_state(self, model: nn.Module, state: dict[str, Any], ctx: TaskContext) -> None:
        \"\"\"On resume, after configure_model: restore what method_state returned.\"\"\"
""")

PLAIN_TESTS = _tests("frozen weights, determinism, resume", '{{"strength": 0.1}}',
                     "heads_train_on_the_frozen_backbone_with_the_penalty", """\
    run = run_method(METHOD({{"strength": 0.1}}), tiny_stream(samples_per_class=8), batch_size=8,
                     max_steps_per_epoch=2)
    assert all(not p.requires_grad for p in run.model.backbone.parameters())
    assert run.results[0].trainable_params == sum(p.numel() for p in run.model.heads[0].parameters())
    assert all(r.loss_terms["l2"] > 0 for r in run.results) and torch.isfinite(run.model.heads[1].weight).all()
""", _TestParts(contract_params='{{"strength": 0.1}}'))

PROMPT = _module("CLModel, Method, NoParams, PromptMethod, PromptModel, TaskContext, attach, uniform_prompt",
                 "NoParams", """\
    # Defaults are the paper's settings; each description is shown by `clbench methods {name} --params`.
    length: int = Field(4, ge=1, description="TODO prompt tokens inserted after [CLS]")
""", """\
    Params = {cls}Params

    def build(self, model: CLModel, ctx: TaskContext) -> {cls}Model:
        return {cls}Model(model, self.params.length)
""", _Shape(hooks=False, bases="PromptMethod, Method", image_only="its prompts enter a ViT's own forward",
            preamble="""\
    # PromptMethod: configure_model freezes the backbone and puts build()'s model in place; no low-rank update
    # (spectra n/a); an aux value "key_match" from select is added to the loss times params.key_weight.
""", helpers="""\
class {cls}Model(PromptModel):
    \"\"\"The frozen backbone with learned prompt tokens after [CLS] on every image. ``features`` (from
    PromptModel) runs a prompt-free query pass, asks ``select`` for this batch's prompts, then the prompted pass.\"\"\"

    def __init__(self, base: CLModel, length: int) -> None:
        super().__init__(base, attach(base.backbone, tokens=True))
        self.prompt = uniform_prompt(length, base.backbone.embed_dim)  # trained: it requires grad

    def select(self, q: torch.Tensor):
        \"\"\"(prefixes per block, tokens, aux for loss_terms) for the queries ``q`` (batch x dim). TODO: pick
        prompts per image from its own query (a pool with keys, as L2P / CODA-Prompt); here one shared prompt.\"\"\"
        return {{}}, self.prompt.expand(len(q), -1, -1), {{}}


"""))

PROMPT_TESTS = _tests("frozen weights, batch-independent predictions, resume", '{{"length": 2}}',
                      "the_prompt_trains_and_the_backbone_does_not", """\
    class Snapshot(METHOD):
        def build(self, model, ctx):
            built = super().build(model, ctx)
            self.initial = built.prompt.detach().clone()
            return built

    method = Snapshot({{"length": 2}})
    run = run_method(method, tiny_stream(samples_per_class=8), batch_size=8, max_steps_per_epoch=2)
    assert all(not p.requires_grad for p in run.model.backbone.parameters())
    assert not torch.equal(method.initial, run.model.prompt.detach())
""")

REHEARSAL = _module("LoRAParams, LoRASite, Method, Samples, TaskContext, hookimpl, inject", "LoRAParams", """\
    # rank, alpha, targets, blocks and dropout come from LoRAParams; defaults are the paper's settings.
    rank: int = Field(4, ge=1, description="LoRA rank r")
    per_task: int = Field(20, ge=1, description="TODO samples of each finished task kept in the buffer")
    replay: int = Field(16, ge=1, description="TODO buffer samples added to every training step")
""", """\
    Params = {cls}Params

    def __init__(self, params: {cls}Params | dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.sites: dict[str, LoRASite] = {{}}
        # The buffer is a stream index, (task, row) per sample: the stream is deterministic, so the checkpoint
        # keeps indices and ctx.stream_samples(index) decodes the images when they are needed.
        self.index = torch.zeros(0, 2, dtype=torch.long)
        self._draw: torch.Generator | None = None

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: TaskContext) -> None:
        p = self.params
        self.sites = inject(model.backbone, p.targets, p.blocks)
        for site in self.sites.values():
            site.add_branch(p.rank, scale=p.scale, dropout=p.dropout)

    @hookimpl
    def before_task(self, model: nn.Module, ctx: TaskContext) -> None:
        self._draw = torch.Generator().manual_seed(ctx.seed * 7_919 + ctx.task)  # per task: resumes exactly

    @hookimpl
    def param_groups(self, model: nn.Module, ctx: TaskContext) -> list[dict[str, Any]]:
        # replayed samples score over every seen head (scope "seen"), so the earlier heads train too
        earlier = [q for h in list(model.heads)[:ctx.task] for q in h.parameters()]
        for q in earlier:
            q.requires_grad_(True)
        adapters = [q for s in self.sites.values() for q in s.branches[0].parameters()]
        return [{{"params": adapters, "name": "lora"}}, {{"params": earlier, "name": "seen_heads"}}]

    @hookimpl
    def replay_batch(self, ctx: TaskContext) -> Samples | None:
        \"\"\"Every step: buffer samples added to the batch. TODO the method's draw; the step hooks' ``rows`` say
        which stored rows the step trains on, to insert them during training (examples/clbench-derpp).\"\"\"
        if not len(self.index):
            return None
        pick = torch.randperm(len(self.index), generator=self._draw)[:self.params.replay]
        return ctx.stream_samples(self.index[pick]).with_scope("seen")

    @hookimpl
    def after_task(self, model: nn.Module, ctx: TaskContext) -> None:
        \"\"\"TODO the method's choice of what to keep; here per_task samples of the task, seeded.\"\"\"
        own = ctx.task_samples()
        g = torch.Generator().manual_seed(ctx.seed * 104_729 + ctx.task)
        keep = torch.randperm(len(own), generator=g)[:self.params.per_task]
        self.index = torch.cat([self.index, own.index[keep]])

    @hookimpl
    def replay_buffer(self, ctx: TaskContext) -> Samples | None:
        return ctx.stream_samples(self.index) if len(self.index) else None  # reported as cost/buffer_images

    @hookimpl
    def method_state(self, ctx: TaskContext) -> dict[str, Any] | None:
        return {{"index": self.index.clone()}}  # a resumed run replays the same samples

    @hookimpl
    def load_method_state(self, model: nn.Module, state: dict[str, Any], ctx: TaskContext) -> None:
        self.index = state["index"].clone()
""", _Shape(image_only="replayed rows train image heads"))

REHEARSAL_TESTS = _tests("frozen weights, well-formed updates, determinism, resume",
                         '{{"rank": 2, "per_task": 6, "replay": 4}}',
                         "the_buffer_keeps_per_task_samples_of_every_finished_task", """\
    method = METHOD({{"rank": 2, "per_task": 4, "replay": 4}})
    run = run_method(method, tiny_stream(samples_per_class=8), batch_size=8, max_steps_per_epoch=2)
    assert [r.buffer_images for r in run.results] == [4, 8]
    assert torch.equal(method.index[:, 0], torch.tensor([0] * 4 + [1] * 4))
""", _TestParts(contract_params='{{"rank": 2, "per_task": 6, "replay": 4}}', resume_doc="""\
    \"\"\"The buffer is method state: a resumed run replays the same samples.\"\"\"
"""))


@dataclass(frozen=True)
class Template:
    """One template: the plugin module and the test file's body (after the head clbench.scaffold writes, which
    imports torch, contract, assert_resumes, run_method and tiny_stream and defines METHOD)."""

    plugin: str
    tests: str
    summary: str


TEMPLATES: dict[str, Template] = {
    "lora": Template(LORA, LORA_TESTS, "sequential LoRA: adapters in configure_model, a loss_terms to fill in"),
    "plain": Template(PLAIN, PLAIN_TESTS, "no adapters (NoParams): heads on the frozen backbone, one loss_terms"),
    "prompt": Template(PROMPT, PROMPT_TESTS, "prompt tokens after [CLS] through PromptModel / PromptMethod"),
    "rehearsal": Template(REHEARSAL, REHEARSAL_TESTS, "LoRA plus a replayed buffer kept as a stream index"),
}
