"""The light base class of a method plugin: a name, a pydantic ``Params`` model and hook implementations.

Subclassing is optional (the registry checks the shape, not the type), but it gives the constructor that
validates params and the ``describe_params`` used by ``clbench methods NAME --params``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method:
    """Base for method plugins. Set ``name`` (lowercase), ``Params`` (defaults = the paper's settings),
    optional ``aliases``, ``paper`` and ``code`` (citations), and ``trains_backbone`` if the method
    changes pre-trained weights by gradient (merging adapters does not count)."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""
    code: ClassVar[str] = ""
    trains_backbone: ClassVar[bool] = False
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel | dict[str, Any] | None = None) -> None:
        if params is None or isinstance(params, dict):
            params = self.Params(**(params or {}))
        self.params = params

    @classmethod
    def describe_params(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, description) for every param."""
        rows = []
        for fname, field in cls.Params.model_fields.items():
            ann = getattr(field.annotation, "__name__", str(field.annotation))
            rows.append((fname, ann, field.get_default(call_default_factory=True), field.description or ""))
        return rows
