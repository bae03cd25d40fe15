"""Plugin discovery (built-ins, the ``clbench`` entry-point group, plugin directories) and per-run managers.

Discovery runs once, explicitly (nothing happens at import). Each plugin module implements
``register_methods(register)``; the registry validates every registered class (a lowercase ``name``, a
pydantic ``Params``, hook implementations that match ``hookspecs.MethodSpec``) and refuses a name that two
sources register, naming both. The built-in methods in ``plugins/`` are found through the same entry-point
group as third-party packages; they are simply loaded first.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy
from pydantic import BaseModel

from clbench.errors import ClbenchError
from clbench.methods import hookspecs
from clbench.methods.method import NAME_RULE, backbones_declaration_problem, valid_method_name

BUILTIN_PACKAGE = "clbench_plugins"
HOOK_NAMES = {n for n in dir(hookspecs.MethodSpec) if not n.startswith("_")}
# A method named with one of these hook-name prefixes and close to a hook name is a misspelt hook (helpers such as
# ``loss_weight`` or ``task_head`` are too far from every hook name to be caught).
HOOK_PREFIXES = tuple(sorted({n.split("_", 1)[0] + "_" for n in HOOK_NAMES}))


class _DiscoveryManager(pluggy.PluginManager):
    """Accepts a plain ``register_methods`` function (no decorator needed in plugin modules)."""

    def parse_hookimpl_opts(self, plugin, name):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name == "register_methods" and callable(getattr(plugin, name, None)):
            opts = {}
        return opts


@dataclass
class MethodInfo:
    name: str
    cls: type
    source: str  # human readable: where it came from
    provenance: dict[str, str] = field(default_factory=dict)
    _code: dict[str, str] | None = field(default=None, repr=False, compare=False)

    def code(self) -> dict[str, str]:
        """The method's code identity (:func:`code_identity`), computed once per registry."""
        if self._code is None:
            self._code = code_identity(self.cls)
        return self._code

    def code_digest(self) -> str:
        """The digest of the method's source files: part of a run's identity (a checkpoint or finished run of
        other code is never continued, clbench.checkpoint.RunStore) and of its provenance."""
        return self.code()["code_digest"]

    def full_provenance(self) -> dict[str, str]:
        """Where the method came from and exactly which code it is: source digest, and the git commit and
        dirty state of the checkout holding it (an editable install or a plugins folder in a repository)."""
        return {**self.provenance, **self.code()}


class Registry:
    def __init__(self) -> None:
        self.methods: dict[str, MethodInfo] = {}
        self.aliases: dict[str, str] = {}
        self.errors: list[str] = []
        self.sources: list[tuple[str, dict[str, str]]] = []
        self._pm = _DiscoveryManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs.DiscoverySpec)

    # -- loading ---------------------------------------------------------------------------------
    def add_module(self, module: Any, source: str, provenance: dict[str, str]) -> None:
        """Call the module's ``register_methods`` and validate every class it registers."""
        if not hasattr(module, "register_methods"):
            raise ClbenchError(f"plugin {source}: defines no register_methods(register) function")
        registered: list[type] = []
        self._pm.register(module, name=f"{source}:{id(module)}")
        try:
            self._pm.check_pending()
            self._pm.hook.register_methods(register=registered.append)
        except ClbenchError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - plugin code may raise anything, exit included
            raise ClbenchError(f"plugin {source}: register_methods failed: {type(exc).__name__}: {exc}") from None
        finally:
            self._pm.unregister(module)
        for cls in registered:
            self._add_class(cls, source, provenance)
        self.sources.append((source, provenance))

    def _add_class(self, cls: type, source: str, provenance: dict[str, str]) -> None:
        if not inspect.isclass(cls):
            raise ClbenchError(f"plugin {source}: register_methods registered {type(cls).__name__} {cls!r:.60}; "
                               "register(...) takes a method class")
        name = getattr(cls, "name", None)
        if not valid_method_name(name):
            raise ClbenchError(f"plugin {source}: {cls.__qualname__}.name must be {NAME_RULE}; got {name!r}")
        params = getattr(cls, "Params", None)
        if not (inspect.isclass(params) and issubclass(params, BaseModel)):
            raise ClbenchError(f"plugin {source}: method '{name}' needs a pydantic Params model")
        problem = backbones_declaration_problem(cls)
        if problem:
            raise ClbenchError(f"plugin {source}: method '{name}': {problem}")
        validate_hooks(cls, f"plugin {source}: method '{name}'")
        for key in (name, *getattr(cls, "aliases", ())):
            owner = self.methods.get(key) or self.methods.get(self.aliases.get(key, ""))
            if owner is not None:
                raise ClbenchError(f"method name '{key}' is registered twice: by {owner.source} and by {source}; "
                                   "rename one of them")
        self.methods[name] = MethodInfo(name, cls, source, {**provenance, "class": cls.__qualname__})
        for alias in getattr(cls, "aliases", ()):
            self.aliases[alias] = name

    def load_entry_points(self, strict: bool = True) -> None:
        eps = list(entry_points(group=hookspecs.PROJECT))
        eps.sort(key=lambda ep: (not ep.value.startswith(BUILTIN_PACKAGE), ep.name))  # built-ins first
        for ep in eps:
            dist = getattr(ep, "dist", None)
            prov = {"kind": "builtin" if ep.value.startswith(BUILTIN_PACKAGE) else "entry_point",
                    "entry_point": f"{ep.name} = {ep.value}",
                    "distribution": dist.name if dist else "", "version": dist.version if dist else ""}
            source = f"entry point '{ep.name} = {ep.value}'" + (f" ({dist.name} {dist.version})" if dist else "")
            self._guard(strict, lambda e=ep, s=source, pv=prov: self.add_module(_import_entry_point(e, s), s, pv))

    def load_dir(self, directory: str | Path, strict: bool = True) -> None:
        d = Path(directory)
        if not d.is_dir():
            raise ClbenchError(f"plugins_dir: {d} is not a directory")
        for path in sorted(d.glob("*.py")):
            if not path.name.startswith("_"):
                self._guard(strict, lambda p=path: self.add_file(p))

    def add_file(self, path: Path) -> None:
        """Import one plugin file and register its methods, with its path and content hash as provenance."""
        source = f"file {path}"
        if not path.is_file():  # a folder named *.py, or a link to nothing
            what = "a folder" if path.is_dir() else "a dangling link" if path.is_symlink() else "not a file"
            raise ClbenchError(f"plugin {source}: is {what}; remove it from the plugins folder or rename it")
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ClbenchError(f"plugin {source}: cannot be read ({exc.strerror}); fix its permissions or remove "
                               "it from the plugins folder") from None
        prov = {"kind": "file", "path": str(path), "sha256": hashlib.sha256(text).hexdigest()}
        self.add_module(_import_file(path, source), source, prov)

    def _guard(self, strict: bool, action) -> None:
        try:
            action()
        except ClbenchError as exc:
            if strict:
                raise
            self.errors.append(str(exc))

    # -- lookup ----------------------------------------------------------------------------------
    def get(self, name: str) -> MethodInfo:
        key = self.aliases.get(name, name)
        if key in self.methods:
            return self.methods[key]
        known = sorted(self.methods) + sorted(self.aliases)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known methods: {', '.join(sorted(self.methods))}"
        raise ClbenchError(f"unknown method '{name}'{hint}")


def _top(module_name: str) -> str:
    return module_name.split(".", 1)[0]


def _code_modules(cls: type) -> list[Any]:
    """The modules holding the method's code: those of its class and base classes that belong to a plugin
    (its own package or the built-in plugins; clbench itself is covered by its version), and every module of
    those packages they reference, transitively (helpers imported from a sibling module)."""
    tops = {_top(cls.__module__), BUILTIN_PACKAGE}
    todo = [sys.modules.get(k.__module__) for k in cls.__mro__ if _top(k.__module__) in tops]
    seen: dict[str, Any] = {}
    while todo:
        module = todo.pop()
        if module is None or module.__name__ in seen or not getattr(module, "__file__", None):
            continue
        seen[module.__name__] = module
        for value in vars(module).values():
            name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if isinstance(name, str) and _top(name) in tops and name not in seen:
                todo.append(sys.modules.get(name))
    return [seen[k] for k in sorted(seen)]


def code_identity(cls: type) -> dict[str, str]:
    """``code_digest``: sha256 (16 hex) over the source files of the method's code (``_code_modules``), whatever
    installed it (a plugins folder, a package, ``pip install -e``); ``code_files``: how many; where the class's
    file lies in a git checkout, ``git_commit`` and ``git_dirty`` ("true" when those files differ from it)."""
    h = hashlib.sha256()
    files = []
    for module in _code_modules(cls):
        path = Path(module.__file__)
        try:
            data = path.read_bytes()
        except OSError:
            data = b"<unreadable>"
        h.update(f"{module.__name__}\0{len(data)}\0".encode() + data)
        files.append(path)
    out = {"code_digest": h.hexdigest()[:16], "code_files": str(len(files))}
    if files:
        out.update(_git_state(Path(inspect.getsourcefile(cls) or files[0]), files))
    return out


def _git_state(main: Path, files: list[Path]) -> dict[str, str]:
    """The git commit of the checkout holding ``main`` and whether those of ``files`` in it differ from it
    (nothing outside git)."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=main.parent, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top, commit = (git("rev-parse", "--show-toplevel", "HEAD") or "\n").split("\n", 1)
    if not commit:
        return {}
    inside = [str(f) for f in files if f.resolve().is_relative_to(Path(top).resolve())]
    status = git("status", "--porcelain", "--", *inside)
    return {"git_commit": commit, "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def _import_entry_point(ep, source: str):
    try:
        return ep.load()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - an exit at import is no success
        raise ClbenchError(f"plugin {source}: cannot be imported: {type(exc).__name__}: {exc}") from None


def _import_file(path: Path, source: str):
    mod_name = f"clbench_dir_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - SystemExit(0) at import must not look like success
        sys.modules.pop(mod_name, None)
        raise ClbenchError(f"plugin {source}: cannot be imported: {type(exc).__name__}: {exc}") from None
    return module


class MethodManager(pluggy.PluginManager):
    """A pluggy manager of the method hooks (``hookspecs.MethodSpec``) that also takes a ``loss_terms``
    implementation naming the step's parts one by one (``batch``, ``logits``, ``replayed``, ``aux``, ``rows``: the
    hook's arguments up to contract 3, now the fields of ``clbench.StepBatch``): it registers, in its place and
    right after its plugin, an adapter that calls it with those parts taken from ``step``. Plugins written either
    way run unchanged."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs.MethodSpec)
        self._by_part: list[tuple[Any, tuple[str, ...], dict]] = []

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None or (opts.get("specname") or name) != "loss_terms":
            return opts
        fn = getattr(plugin, name)
        names = tuple(p for p in inspect.signature(fn).parameters if p != "self")
        if set(names) & set(hookspecs.STEP_PARTS) and set(names) <= {"model", "ctx", *hookspecs.STEP_PARTS}:
            self._by_part.append((fn, names, opts))
            return None  # called through the adapter registered below
        return opts  # the new form, or argument names pluggy refuses with its own message

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        self._by_part = []
        registered = super().register(plugin, name)
        found, self._by_part = self._by_part, []
        for fn, names, opts in found:
            super().register(_step_parts_adapter(fn, names, opts), name=f"{registered}:loss_terms")
        return registered


def _step_parts_adapter(fn: Any, names: tuple[str, ...], opts: dict) -> Any:
    """A plugin whose ``loss_terms(model, ctx, step)`` calls ``fn`` with the arguments ``names``."""

    def loss_terms(self: Any, model: Any, ctx: Any, step: hookspecs.StepBatch) -> Any:
        given = {"model": model, "ctx": ctx, "batch": step.batch, "logits": step.logits, "replayed": step.replayed,
                 "aux": step.aux, "rows": step.rows}
        return fn(**{n: given[n] for n in names})

    marked = hookspecs.hookimpl(tryfirst=bool(opts.get("tryfirst")), trylast=bool(opts.get("trylast")))(loss_terms)
    return type("LossTermsByPart", (), {"loss_terms": marked, "__module__": getattr(fn, "__module__", None)})()


def validate_hooks(cls: type, where: str) -> None:
    """Fail loudly on misspelled or mis-declared hooks: every ``@hookimpl`` must name a hook of the spec with
    known arguments, and a method named like a hook must carry ``@hookimpl``."""
    pm = MethodManager()
    try:
        pm.register(cls, name="validate")
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        # pluggy's message spans several lines; the CLI promises one line per error.
        one_line = "; ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())
        raise ClbenchError(f"{where}: {one_line}") from None
    for attr, value in _class_attributes(cls).items():
        if attr in HOOK_NAMES and callable(value) and not hasattr(value, f"{hookspecs.PROJECT}_impl"):
            raise ClbenchError(f"{where}: '{attr}' looks like a hook but lacks the @hookimpl decorator")
        close = difflib.get_close_matches(attr, HOOK_NAMES, n=1, cutoff=0.85)
        if callable(value) and close and attr not in HOOK_NAMES and attr.startswith(HOOK_PREFIXES):
            raise ClbenchError(f"{where}: '{attr}' is not a hook; did you mean '{close[0]}'? (a helper, not a "
                               "hook: rename it further from the hook's name)")


def _class_attributes(cls: type) -> dict[str, Any]:
    """Every attribute the class has, its own or inherited (as attribute lookup resolves it, the nearest class in
    the MRO first): pluggy registers the hook implementations of base classes and mixins too, so a misspelt or
    undecorated hook in a base class is as silent as one in the class itself."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__[:-1]:  # object's attributes are no plugin's
        for attr, value in vars(klass).items():
            found.setdefault(attr, value)
    return found


def plugin_dirs(suite_dir: str | None, cli_dirs: Iterable[str | Path], trust_suite: bool,
                source: str) -> list[str]:
    """The plugin folders a run may load: every ``--plugins-dir``, and the suite's ``plugins_dir`` only when the
    user allowed it on the command line (the same folder as a ``--plugins-dir``, or ``--trust-suite-plugins``).

    A suite file is data someone may have sent; loading its folder imports and runs every ``.py`` in it, so it
    is refused (before anything is imported, ``--dry-run`` included) unless the user said so."""
    dirs = [str(Path(d).expanduser().resolve()) for d in cli_dirs if d]
    if suite_dir and str(Path(suite_dir).resolve()) not in dirs:
        if not trust_suite:
            raise ClbenchError(f"{source}: plugins_dir {suite_dir} would import and run the Python files in it; "
                               f"allow it with --plugins-dir {suite_dir} or --trust-suite-plugins")
        dirs.insert(0, str(Path(suite_dir).resolve()))
    return list(dict.fromkeys(dirs))  # one folder named twice is loaded once


def discover(plugins_dirs: Iterable[str | Path] = (), strict: bool = True) -> Registry:
    """Built-ins and entry points, then every module of each plugins directory."""
    reg = Registry()
    reg.load_entry_points(strict=strict)
    for d in plugins_dirs:
        if d:
            reg.load_dir(d, strict=strict)
    return reg


_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "venv", "build", "dist"}


def folders_defining(name: str, root: Path, depth: int = 3) -> list[Path]:
    """Plugin folders under ``root`` (``depth`` levels at most; hidden folders, virtual environments and build
    output skipped) holding a ``*.py`` file that looks like it registers method ``name``: it defines
    ``register_methods`` and spells the name as a string literal. Text only: nothing is imported (a folder's code
    runs only with ``--plugins-dir``)."""
    needles = (f'"{name}"', f"'{name}'")
    found: list[Path] = []

    def walk(folder: Path, level: int) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.is_dir() and level < depth and not entry.name.startswith(".") and entry.name not in _SKIP_DIRS:
                walk(entry, level + 1)
            elif entry.suffix == ".py" and not entry.name.startswith("_") and folder not in found:
                try:
                    text = entry.read_text(errors="replace")[:200_000] if entry.stat().st_size < 2_000_000 else ""
                except OSError:
                    continue
                if "register_methods" in text and any(n in text for n in needles):
                    found.append(folder)

    walk(root, 0)
    return found


def plugins_dir_hint(name: str, given: Iterable[str | Path], root: Path | None = None) -> str:
    """What to add to an "unknown method" error: the folders under ``root`` (default: the working directory) that
    seem to define ``name`` and were not given with ``--plugins-dir``, as the option to add; or, when there are
    none, that a method in a plugins folder is loaded only with ``--plugins-dir``."""
    root = root or Path.cwd()
    loaded = {Path(d).resolve() for d in given}
    folders = [f for f in folders_defining(name, root) if f.resolve() not in loaded]
    if folders:
        shown = ", ".join(str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in folders[:3])
        first = folders[0].relative_to(root) if folders[0].is_relative_to(root) else folders[0]
        return (f"; '{name}' seems to be defined in the plugins folder {shown}, which is loaded only with "
                f"--plugins-dir: add --plugins-dir {first}")
    return "; a method in a plugins folder is loaded only with --plugins-dir DIR"


class RunManager(MethodManager):
    """The plugin manager of one run: it knows its method (``method``, ``method_name``), so the loop's checked
    caller (``clbench.methods.hookcheck``) needs no look-up. Built once per run by :func:`run_manager`."""

    def __init__(self, method: Any) -> None:
        super().__init__()
        self.method = method
        self.method_name = str(getattr(method, "name", type(method).__name__))


def run_manager(method: Any, probes: Iterable[Any] = ()) -> RunManager:
    """The per-run manager: the one method instance of the run, the harness's default ``task_updates``
    (:class:`clbench.methods.probes.TaskUpdateProbe`, called last: a method's own non-None result wins) and read-only
    probes."""
    from clbench.methods.probes import TaskUpdateProbe  # torch: loaded only when a run is set up

    pm = RunManager(method)
    pm.register(method, name=f"method:{pm.method_name}")
    pm.register(TaskUpdateProbe(), name="harness:task_updates")
    for i, probe in enumerate(probes):
        pm.register(probe, name=f"probe:{i}")
    pm.check_pending()
    return pm
