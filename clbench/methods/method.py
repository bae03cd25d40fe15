"""The light base class of a method plugin: a name, a pydantic ``Params`` model and hook implementations.

Subclassing is optional (the registry checks the shape, not the type), but it gives the constructor that
validates params and the ``describe_params`` used by ``clbench methods NAME --params``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from clbench.model.fit import BackboneFacts

# The plugin contract's version (``clbench.CONTRACT_VERSION``): bumped when a rule that a working plugin may rely on
# changes; docs/CONTRACT_CHANGELOG.md says what changed in each version and what a plugin written to an earlier one
# does about it. Additions (a new hook, a new hook argument, a new export) break no plugin and are listed there too.
CONTRACT_VERSION = 3

# The one rule for method names (registry, contract test, `clbench new-method`): what a suite, the CLI and
# MLflow tags can carry without quoting. The scaffold writes the module file with '-' replaced by '_'.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]*")
NAME_RULE = "lowercase letters, digits, '_' and '-', starting with a letter (e.g. lora_l2, my_lora, my-lora)"


# The backbone kinds a method can declare in ``backbones`` (``clbench.model.lm.backbone_kind`` names a suite's):
# "image" a timm ViT (clbench.model.backbones), "language" a T5 or causal LM (clbench.model.lm).
BACKBONE_KINDS = ("image", "language")


def supported_backbones(cls: type) -> tuple[str, ...]:
    """The backbone kinds ``cls`` declares (``backbones``); a class that declares none, subclass of
    :class:`Method` or not, runs on every kind, as every plugin did before the declaration existed."""
    return tuple(getattr(cls, "backbones", BACKBONE_KINDS))


def backbones_declaration_problem(cls: type) -> str | None:
    """None when ``cls.backbones`` (if set) is a non-empty tuple or list of :data:`BACKBONE_KINDS`, else what is
    wrong (the registry refuses the plugin with it)."""
    kinds = getattr(cls, "backbones", BACKBONE_KINDS)
    if (not isinstance(kinds, (tuple, list)) or not kinds
            or not all(isinstance(k, str) and k in BACKBONE_KINDS for k in kinds)):
        return (f"backbones must be a non-empty tuple of {', '.join(map(repr, BACKBONE_KINDS))}; got {kinds!r:.60}")
    note = getattr(cls, "backbones_note", "")
    if not isinstance(note, str):
        return f"backbones_note must be a string; got {type(note).__name__}"
    return None


def backbone_refusal(cls: type, kind: str) -> str | None:
    """None when ``cls`` runs on a backbone of ``kind``, else why not: its ``backbones`` and ``backbones_note``."""
    kinds = supported_backbones(cls)
    if kind in kinds:
        return None
    note = getattr(cls, "backbones_note", "") or "its class declares backbones = " + repr(kinds)
    article = "an" if kind[:1] in "aeiou" else "a"
    return f"runs on {' and '.join(kinds)} backbones only, not on {article} {kind} backbone: {note}"


def valid_method_name(name: object) -> bool:
    """Whether ``name`` follows :data:`NAME_RULE`."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


class NoParams(BaseModel):
    """The params base of a method without adapters (``clbench.NoParams``): no fields of its own and unknown keys
    refused (``extra="forbid"``), so a suite's typo fails; subclass it and add the method's fields, each with a
    ``description``. LoRA methods start from ``clbench.LoRAParams`` instead."""

    model_config = ConfigDict(extra="forbid")

    def check_against(self, backbone: BackboneFacts) -> list[str]:
        """What does not fit ``backbone`` (``clbench.BackboneFacts``), one ``"<field>: <problem>"`` line each; the
        preflight asks it before any run exists. By default: fields named ``blocks`` / ``*_blocks`` must name
        blocks the backbone has, a field named ``rank`` must fit the adapted maps (``clbench.model.fit``);
        override it to check what the params mean (``backbone.blocks_problem``, ``backbone.rank_problem``)."""
        from clbench.model.fit import checks_by_field_name

        return checks_by_field_name(self, backbone)


class Method:
    """Base for method plugins. Set ``name`` (see :data:`NAME_RULE`), ``Params`` (defaults = the paper's settings),
    optional ``aliases``, ``paper`` and ``code`` (citations), and ``trains_backbone`` if the method
    changes pre-trained weights by gradient (merging adapters does not count). Set ``low_rank_updates = False``
    if the method has no low-rank weight update (prompts): ``task_updates`` must then return None.
    Set ``gradient_training = False`` for a method that takes no gradient step (closed-form classifiers,
    prototypes): the loop then builds no optimizer and runs no step loop (``train.epochs`` does not apply,
    ``param_groups`` and the step hooks are not called, no loss is logged, ``cost/trainable_params`` is 0); the
    method sets the heads itself in ``before_task``/``after_task``, and that time is its ``cost/method_seconds``.
    A method deciding per task defines ``gradient_training(self, ctx) -> bool`` instead (``clbench.run.loop.
    takes_gradient_steps``). ``backbones`` names the backbone kinds the method runs on (:data:`BACKBONE_KINDS`:
    ``"image"``, a timm ViT; ``"language"``, a T5 or causal LM of ``clbench.model.lm``), both by default; a method
    that needs one kind (its own image forward, stored images, a linear head) declares it and says why in
    ``backbones_note``, and a suite pairing it with the other kind is refused before any run exists."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""
    code: ClassVar[str] = ""
    trains_backbone: ClassVar[bool] = False
    low_rank_updates: ClassVar[bool] = True
    gradient_training: ClassVar[bool] = True
    backbones: ClassVar[tuple[str, ...]] = ("image", "language")
    backbones_note: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel | dict[str, Any] | None = None) -> None:
        if params is None or isinstance(params, dict):
            params = self.Params(**(params or {}))
        self.params = params

    @classmethod
    def describe_params(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, description) for every param (``clbench methods NAME --params``)."""
        return describe_params(cls.Params)


def describe_params(params: type[BaseModel]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, description) for every field of a params model; works for any registered
    method, whether or not it subclasses :class:`Method`."""
    rows = []
    for fname, field in params.model_fields.items():
        ann = getattr(field.annotation, "__name__", str(field.annotation))
        rows.append((fname, ann, field.get_default(call_default_factory=True), field.description or ""))
    return rows


def training_summary(cls: type) -> str:
    """What a method trains, as ``clbench methods NAME`` states it (contract 3's rule, ``clbench.methods.hookspecs``): the
    backbone only when the method declares ``trains_backbone`` (read from an instance with default params, since
    some methods set it per instance); otherwise the parameters its ``configure_model`` / ``param_groups`` add,
    or, for a method with neither hook, the heads alone on the frozen backbone."""
    try:
        trains_backbone = bool(getattr(cls(), "trains_backbone", False))
    except Exception:  # noqa: BLE001 - a constructor that needs more than defaults: the class's declaration
        trains_backbone = bool(getattr(cls, "trains_backbone", False))
    if trains_backbone:
        return "the pre-trained backbone (trains_backbone, with default params) and each task's head"
    per_task = callable(getattr(cls, "gradient_training", None))
    if getattr(cls, "gradient_training", True) is False or (per_task and not _first_tasks_train(cls)):
        return ("nothing by gradient" + (" with default params (gradient_training(ctx) decides per task)" if per_task
                                         else " (gradient_training = False)")
                + ": no optimizer, no step; the method sets each task's head itself")
    if per_task:
        return ("by gradient only on the tasks its gradient_training(ctx) chooses; the method sets the heads of the "
                "other tasks itself")
    own = [h for h in ("configure_model", "param_groups") if callable(getattr(cls, h, None))]
    if own:
        return (f"what its {' / '.join(own)} add (the pre-trained backbone stays frozen) and each task's head")
    return ("each task's head on the frozen pre-trained backbone (no configure_model or param_groups: clbench's "
            "default; set trains_backbone = True to fine-tune the backbone)")


def _first_tasks_train(cls: type) -> bool:
    """Whether an instance with default params takes gradient steps on task 0 or 1 (``gradient_training(ctx)``;
    a method that cannot be built or asked that way counts as training)."""
    from types import SimpleNamespace

    try:
        method = cls()
        return any(bool(method.gradient_training(SimpleNamespace(task=t))) for t in (0, 1))
    except Exception:  # noqa: BLE001 - the summary must not fail on a method that needs more than defaults
        return True
