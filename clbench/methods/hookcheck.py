"""Method hooks as the loop calls them: what a hook raises or returns wrongly becomes a ``MethodHookError``.

A method plugin is someone else's code. When one of its hooks raises, or returns something the loop cannot use
(``loss_terms`` a vector or a string, ``param_groups`` a string, ``configure_model`` 42, ``task_updates``
garbage), the loop would otherwise fail somewhere later with a traceback far from the cause. ``checked_hooks``
gives the loop the same hook caller with each result checked against the contract of ``clbench.methods.hookspecs``
right where it is returned; the error names the method, the hook and what was wrong, so the runner can fail that
run and go on with the suite's other runs. The checks look at types and shapes only (no host synchronisation
in the step loop).

``param_groups`` is also checked against the model, once per task: a parameter that requires grad but is in no
group and no task head (:func:`undeclared_trainable`, the same rule as the plugin contract's) gets gradients the
optimizer never applies, and a pre-trained backbone parameter in the groups of a method that does not declare
``trains_backbone`` fine-tunes the backbone under an adapter method's name; both fail the run (methods that
declare ``trains_backbone`` are exempt, as in the contract).

Before that, right after ``configure_model``, the pre-trained backbone of a method that does not declare
``trains_backbone`` is frozen by the loop (:meth:`CheckedHooks.freeze_backbone`, contract 3): a method that
configures nothing (no ``configure_model``, no ``param_groups``) trains the heads and whatever parameters it
added, never the backbone by accident. When that freezes anything the method had left trainable, the run prints
one notice line naming the contract change and the fix (``CONTRACT_NOTICE``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from clbench.errors import ClbenchError
from clbench.methods.method import CONTRACT_VERSION
from clbench.model.lora import LowRank

# Not a plugin's mistake: the loop's own divergence check (it fails the run itself), memory the machine lacks
# (the user's interrupt is no Exception and passes anyway).
PASS_THROUGH = (FloatingPointError, MemoryError, torch.OutOfMemoryError)


_OS_IMPL = sys.modules[os._exit.__module__]  # posix (nt on Windows): os._exit is its _exit


class ProcessExit(BaseException):  # noqa: N818 - what it is, not an error class of ours
    """``os._exit(code)`` called by plugin code while :func:`no_process_exit` guards it (never an ``Exception``:
    plugin code catching ``Exception`` must not swallow it)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def no_process_exit() -> Iterator[None]:
    """While plugin code runs, ``os._exit`` in this process raises :class:`ProcessExit` instead of ending it
    unseen (no run ended, no exit code that says what happened); a forked child (a data loader worker) still
    exits as asked. ``posix._exit`` (the same function under its module's name) is guarded too. Plugin code
    that took its own reference to the real function before the guard (``from os import _exit`` at an import
    that ran earlier), or a signal, still ends the process: ``clbench check`` holds the guard from before it
    imports any plugin (clbench.cli), and an unfinished run resumes on the next ``clbench run``."""
    real, pid = os._exit, os.getpid()
    if getattr(real, "_clbench_guard", False):  # already guarded (a hook called from a guarded check)
        yield
        return

    def refuse(code: int) -> None:
        if os.getpid() != pid:
            real(code)
        raise ProcessExit(code)

    refuse._clbench_guard = True  # type: ignore[attr-defined]
    os._exit = _OS_IMPL._exit = refuse
    try:
        yield
    finally:
        os._exit = _OS_IMPL._exit = real


def exit_text(exc: BaseException) -> str:
    """What a plugin's ``sys.exit``/``SystemExit`` or ``os._exit`` is called in an error line."""
    if isinstance(exc, ProcessExit):
        return f"os._exit({exc.code!r})"
    return f"SystemExit({getattr(exc, 'code', None)!r}) (sys.exit/exit/quit)"


class MethodHookError(ClbenchError):
    """A method's hook raised or returned something outside the hook contract: that run fails, the suite goes on."""


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _check_module(value: Any) -> str | None:
    if value is None or isinstance(value, torch.nn.Module):
        return None
    return f"returned {_describe(value)}; expected a torch.nn.Module or None"


def _check_groups(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        return f"returned {_describe(value)}; expected a list of optimizer groups (dicts with 'params') or None"
    for i, group in enumerate(value):
        if not isinstance(group, dict) or "params" not in group:
            return f"group {i} is {_describe(group)}; expected a dict with a 'params' list"
        params = group["params"]
        if isinstance(params, (str, bytes, torch.Tensor)) or not isinstance(params, (list, tuple)):
            return f"group {i}'s 'params' is {_describe(params)}; expected a list of parameters"
        bad = [p for p in params if not isinstance(p, torch.Tensor)]
        if bad:
            return f"group {i}'s 'params' holds {_describe(bad[0])}; expected parameters (tensors)"
    return None


def undeclared_trainable(model: torch.nn.Module, groups: list[dict] | None) -> list[str]:
    """Names of the parameters that require grad but are in none of ``groups`` (the method's optimizer groups;
    None: the loop's default, every trainable parameter) and in no task head: the loop would compute their
    gradients and never apply them. Shared by the loop's check and the plugin contract (clbench.contract)."""
    if groups is None:  # the loop trains every requires_grad parameter outside the heads
        return []
    declared = {id(p) for g in groups for p in g["params"]}
    heads = {id(p) for h in getattr(model, "heads", ()) for p in h.parameters()}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in declared | heads]


def _names(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:3])
    return shown + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _trainable_problem(model: torch.nn.Module, groups: list[dict] | None, pretrained: set[int]) -> str | None:
    """What is wrong with what ``groups`` leaves trainable (see the module docstring), or None."""
    stray = undeclared_trainable(model, groups)
    if stray:
        return (f"left {_names(stray)} requiring grad, but they are in no parameter group of the method and in "
                "no head (never trained); declare them in param_groups, freeze them (requires_grad_(False)), or "
                f"set trains_backbone = True (a rule since contract 2; {CHANGELOG})")
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    declared = {id(p) for g in groups for p in g["params"]}
    heads = {id(p) for h in getattr(model, "heads", ()) for p in h.parameters()}
    tuned = [n for n, p in model.named_parameters() if id(p) in declared & pretrained and id(p) not in heads]
    if tuned:
        return (f"trains pre-trained backbone parameters: {_names(tuned)}; freeze them (adapters train their own "
                "parameters) or set trains_backbone = True on a method that fine-tunes the backbone (a rule since "
                f"contract 2; {CHANGELOG})")
    return None


CHANGELOG = "docs/CONTRACT_CHANGELOG.md"
# The one line a run prints when the loop froze backbone parameters a method had left trainable: what changed
# (contract 1 fine-tuned them by default), and the two ways to say what the method means.
CONTRACT_NOTICE = ("method '{method}': contract {version}: the loop froze {count} pre-trained backbone parameters "
                   "the method left trainable ({names}): a method without trains_backbone trains only the "
                   "parameters it adds and the heads (contract 1 fine-tuned the whole backbone by default); set "
                   "trains_backbone = True to fine-tune it, or freeze the backbone in configure_model to silence "
                   "this line ({changelog})")


def _check_terms(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"returned {_describe(value)}; expected a dict of named scalar loss tensors or None"
    for name, term in value.items():
        if not isinstance(term, torch.Tensor) or term.numel() != 1 or not term.is_floating_point():
            return f"term {name!r} is {_describe(term)}; expected a floating-point scalar tensor"
    return None


def _check_updates(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"returned {_describe(value)}; expected a dict of site name -> LowRank or None"
    for site, update in value.items():
        if not isinstance(site, str) or not isinstance(update, LowRank):
            return f"entry {site!r} is {_describe(update)}; expected site name -> clbench.model.lora.LowRank"
    return None


def _check_state(value: Any) -> str | None:
    if value is None or isinstance(value, dict):
        return None
    return f"returned {_describe(value)}; expected a dict or None"


# first-result hooks return one value; loss_terms returns the list of every implementation's result
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "configure_model": _check_module, "param_groups": _check_groups, "task_updates": _check_updates,
    "method_state": _check_state,
}


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {Path(last.filename).name}:{last.lineno})"


# PyTorch's words when a backward reaches a graph whose saved tensors an earlier backward freed
FREED_GRAPH = "backward through the graph a second time"
DETACH_HINT = ("state kept across steps (a Fisher, an anchor, stored features or outputs) must be detached: store "
               "t.detach(), or compute it under torch.no_grad()")


def graph_attached(obj: Any, prefix: str = "self", depth: int = 3) -> list[str]:
    """Where ``obj`` (a method instance) holds tensors with an autograd graph attached (``grad_fn`` set), as
    attribute paths (``self.fisher['blocks.0.attn.q']``); looks into dicts, lists and tuples ``depth`` levels deep.
    Parameters and detached tensors have no ``grad_fn`` and are never listed."""
    if isinstance(obj, torch.Tensor):
        return [prefix] if obj.grad_fn is not None else []
    if depth == 0 or isinstance(obj, torch.nn.Module):  # a module's tensors are parameters and buffers
        return []
    if isinstance(obj, dict):
        items = [(f"{prefix}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__") and prefix == "self":
        items = [(f"self.{k}", v) for k, v in vars(obj).items()]
    else:
        return []
    return [path for where, v in items for path in graph_attached(v, where, depth - 1)]


class CheckedHooks:
    """``pm.hook`` with every method hook's failure turned into a one-line ``MethodHookError``."""

    def __init__(self, pm) -> None:
        self.instance = pm.method  # the run's manager knows its method (clbench.methods.registry.RunManager)
        self.method = pm.method_name
        # a method that fine-tunes the backbone (on the class, or per instance) may leave or train anything
        self.trains_backbone = bool(getattr(self.instance, "trains_backbone", False))
        self.pretrained: set[int] = set()  # the backbone's parameters before configure_model
        self._pretrained_named: list[tuple[str, torch.nn.Parameter]] = []
        for hook in vars(pm.hook):  # every hook of the spec; those in CHECKS also have their results checked
            if not hook.startswith("_"):
                setattr(self, hook, self._wrap(hook, getattr(pm.hook, hook)))

    def _wrap(self, hook: str, caller) -> Callable[..., Any]:
        check = CHECKS.get(hook)

        def call(**kwargs: Any) -> Any:
            if hook == "configure_model" and hasattr(kwargs.get("model"), "backbone"):
                self._pretrained_named = [(f"backbone.{n}", p) for n, p in kwargs["model"].backbone.named_parameters()]
                self.pretrained = {id(p) for _, p in self._pretrained_named}
            try:
                with no_process_exit():
                    result = caller(**kwargs)
            except PASS_THROUGH:
                raise
            except MethodHookError:
                raise
            except (SystemExit, ProcessExit) as exc:  # a hook ending the process is a failure of its run
                raise MethodHookError(f"method '{self.method}': hook {hook} called {exit_text(exc)}{_where(exc)}; "
                                      "a hook must return or raise, never end the process") from None
            except ClbenchError as exc:  # the plugin's own clear message (say, a rank the model cannot hold)
                raise MethodHookError(f"method '{self.method}': hook {hook}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - plugin code may raise anything
                if FREED_GRAPH in str(exc):  # a backward inside the hook (a gradient statistics pass)
                    raise self.freed_graph_error(f"hook {hook} ran a backward that") from None
                msg = " ".join(str(exc).split())[:300]
                raise MethodHookError(f"method '{self.method}': hook {hook} raised {type(exc).__name__}: {msg}"
                                      f"{_where(exc)}") from None
            problems = ([_check_terms(r) for r in result] if hook == "loss_terms"
                        else [check(result)] if check else [])
            problem = next((p for p in problems if p), None)
            if not problem and hook == "param_groups" and not self.trains_backbone:
                problem = _trainable_problem(kwargs["model"], result, self.pretrained)
            if problem:
                raise MethodHookError(f"method '{self.method}': hook {hook} {problem}")
            return result

        return call

    def freeze_backbone(self, say: Callable[[str], None]) -> list[str]:
        """After ``configure_model``: freeze every pre-trained backbone parameter the method left requiring grad,
        unless it declares ``trains_backbone`` (contract 3's default: the heads and the method's own parameters
        train, the backbone does not). When it froze anything, ``say`` gets the one notice line
        (``CONTRACT_NOTICE``); returns the frozen parameters' names."""
        if self.trains_backbone:
            return []
        left = [(n, p) for n, p in self._pretrained_named if p.requires_grad]
        for _, p in left:
            p.requires_grad_(False)
        if left:
            say(CONTRACT_NOTICE.format(method=self.method, version=CONTRACT_VERSION, count=len(left),
                                       names=_names([n for n, _ in left]), changelog=CHANGELOG))
        return [n for n, _ in left]

    def freed_graph_error(self, what: str) -> MethodHookError:
        """The one-line error for PyTorch's "backward through the graph a second time": ``what`` backward reached
        an autograd graph an earlier backward had freed, i.e. a tensor the method kept from an earlier step or task
        with its graph attached. Names the attributes of the method that hold such tensors, when any do."""
        held = graph_attached(self.instance) if self.instance is not None else []
        found = (f"; attached now: {', '.join(held[:3])}" + (f" (+{len(held) - 3} more)" if len(held) > 3 else "")
                 if held else "")
        return MethodHookError(f"method '{self.method}': {what} reached an autograd graph that an earlier backward "
                               f"freed (PyTorch: 'Trying to backward through the graph a second time'); {DETACH_HINT}"
                               f"{found}")

    def backward(self, loss: torch.Tensor, terms: list[str]) -> None:
        """``loss.backward()`` for the loop's step: a graph kept from an earlier step (state not detached) becomes
        a one-line ``MethodHookError`` naming the method instead of PyTorch's message."""
        try:
            loss.backward()
        except RuntimeError as exc:
            if FREED_GRAPH not in str(exc):
                raise
            named = f" (loss terms {', '.join(terms)})" if terms else ""
            raise self.freed_graph_error(f"the training step's backward{named}") from None


def checked_hooks(pm) -> CheckedHooks:
    """The loop's hook caller for the run's plugin manager ``pm`` (``clbench.methods.registry.run_manager``), built once
    per run by the loop."""
    return CheckedHooks(pm)
