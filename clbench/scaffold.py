"""``clbench new-method NAME [--template lora|plain|prompt|rehearsal]``: write a working method plugin and its test
file, ready to be edited.

The default template (``lora``) is a plain sequential LoRA in two hooks (``configure_model`` and ``loss_terms``)
plus ``register_methods`` and the resume pair (``method_state`` / ``load_method_state``) as stubs: the loop trains
the branches and clbench reports each task's update for spectra. ``plain`` (no adapters, ``NoParams``), ``prompt``
and ``rehearsal`` are the other starting points (``clbench.templates``). The generated test runs the full contract
(``clbench.contract.check_method``), a resume comparison (``clbench.testing.assert_resumes``) and one property
test to replace with the property that makes the new method what it is. All pass as generated, so a contributor
starts from green and changes one thing at a time (CONTRIBUTING.md walks through it).

``--package`` writes the same files as an installable package folder ``clbench-NAME/`` (module
``clbench_NAME.py``, ``pyproject.toml`` declaring the ``clbench`` entry point, a README, ``tests/``), so
``pip install -e clbench-NAME`` works as generated and ``clbench`` finds the method without ``--plugins-dir``.
"""

from __future__ import annotations

import os
from pathlib import Path

from clbench import __version__
from clbench.errors import ClbenchError
from clbench.methods.method import NAME_RULE, valid_method_name
from clbench.templates import TEMPLATES, Template

ENTRY_POINT_GROUP = "clbench"  # the group every method plugin registers in (pyproject.toml, clbench.methods.registry)

TEST_HEAD = '''"""Tests of the {name} method plugin: the clbench contract, then what makes it {name}."""

from __future__ import annotations

from pathlib import Path

import torch

from clbench import contract
from clbench.testing import assert_resumes, run_method, tiny_stream

PLUGIN = Path(__file__).resolve().parent / "{relpath}"
METHOD = contract.load_plugin_file(PLUGIN).get("{name}").cls
'''

PACKAGE_TEST_HEAD = '''"""Tests of the {name} method plugin: the clbench contract, then what makes it {name}.

Run after ``pip install -e .`` in the package folder: ``pytest tests``.
"""

from __future__ import annotations

import torch
from {module} import {cls} as METHOD

from clbench import contract
from clbench.methods.registry import discover
from clbench.testing import assert_resumes, run_method, tiny_stream


def test_installed_as_an_entry_point():
    """`pip install -e .` registered the method in the {group!r} entry-point group: clbench finds it by name."""
    info = discover(strict=False).get("{name}")
    assert info.cls is METHOD and info.provenance["kind"] == "entry_point", info.source
'''

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "TODO one line: the {name} continual-learning method as a clbench plugin"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["clbench>={clbench_version}"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The line that makes clbench find the method: the module that defines register_methods, in the
# "{group}" entry-point group.
[project.entry-points.{group}]
{name} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]    # one module; the same file also works dropped into a --plugins-dir folder

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

README = '''# {dist}

TODO: what {name} does, the paper and its official code. A method plugin for clbench.

```
pip install -e .                    # in this folder: registers the '{name}' method with clbench
pytest                              # the clbench contract, resume, and the method's own properties
clbench methods {name} --params
clbench run SUITE --add-method '{{name: {name}}}'   # beside the suite's own methods
```
'''



def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in module_name(name).split("_") if part) or "Method"


def module_name(name: str) -> str:
    """The file / module name of method ``name`` (a '-' is not allowed in a Python module name)."""
    return name.replace("-", "_")


def template(kind: str) -> Template:
    if kind not in TEMPLATES:
        raise ClbenchError(f"new-method: --template {kind}: choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[kind]


def check_name(name: str) -> None:
    if not valid_method_name(name):
        raise ClbenchError(f"new-method {name}: a method name must be {NAME_RULE}")


def _refuse_registered(name: str) -> None:
    from clbench.methods.registry import discover

    reg = discover(strict=False)
    if name in reg.methods or name in reg.aliases:
        owner = reg.get(name)
        raise ClbenchError(f"new-method {name}: a method '{owner.name}' already exists ({owner.source}); "
                           "choose another name")


def _write_new(files: dict[Path, str], name: str) -> list[Path]:
    """Write every file, refusing before writing any when one exists (never overwrites)."""
    for path in files:
        if path.exists():
            raise ClbenchError(f"new-method {name}: {path} already exists; remove it or choose another --dir")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)


def new_method(name: str, directory: str | Path = ".", tests_dir: str | Path | None = None,
               check_registry: bool = True, kind: str = "lora") -> list[Path]:
    """Write ``DIR/NAME.py`` and ``TESTS/test_NAME.py`` (default TESTS = DIR/tests) from template ``kind``
    (``clbench.templates.TEMPLATES``); return both paths.

    Refuses names that break the method-name rule or are already registered, and never overwrites a file.
    """
    chosen = template(kind)
    check_name(name)
    if check_registry:
        _refuse_registered(name)
    directory = Path(directory)
    tests = Path(tests_dir) if tests_dir is not None else directory / "tests"
    plugin, test = directory / f"{module_name(name)}.py", tests / f"test_{module_name(name)}.py"
    if directory.exists() and not directory.is_dir():
        raise ClbenchError(f"new-method {name}: --dir {directory} is not a directory")
    relpath = Path(os.path.relpath(plugin.resolve(), tests.resolve())).as_posix()
    return _write_new({plugin: chosen.plugin.format(name=name, cls=_class_name(name)),
                       test: TEST_HEAD.format(name=name, relpath=relpath) + chosen.tests.format(name=name)}, name)


def new_package(name: str, directory: str | Path = ".", check_registry: bool = True, kind: str = "lora") -> list[Path]:
    """Write the installable package folder ``DIR/clbench-NAME/``: ``pyproject.toml`` (the ``clbench`` entry
    point), ``README.md``, ``clbench_NAME.py`` and ``tests/test_NAME.py``; return the paths written.

    ``pip install -e DIR/clbench-NAME`` works as generated; the tests import the installed module and check
    that clbench finds it through its entry point. Same refusals and templates as :func:`new_method`."""
    chosen = template(kind)
    check_name(name)
    if check_registry:
        _refuse_registered(name)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ClbenchError(f"new-method {name}: --dir {directory} is not a directory")
    dist, module, cls = f"clbench-{name}", f"clbench_{module_name(name)}", _class_name(name)
    root = directory / dist
    fields = dict(name=name, dist=dist, module=module, cls=cls, group=ENTRY_POINT_GROUP,
                  clbench_version=".".join(__version__.split(".")[:2]))
    return _write_new({
        root / "pyproject.toml": PYPROJECT.format(**fields),
        root / "README.md": README.format(**fields),
        root / f"{module}.py": chosen.plugin.format(name=name, cls=cls),
        root / "tests" / f"test_{module_name(name)}.py": PACKAGE_TEST_HEAD.format(**fields) + chosen.tests.format(**fields),
    }, name)
