"""The stream registry: one :class:`StreamSpec` per stream name, the one place the harness asks about a stream.

The suite schema validates ``stream.name`` against it, ``clbench.data.streams.build_stream`` builds through it,
the preflight asks it whether the data is here, and the protocol view reads the class count, the default
augmentation and the test images' treatment from it. The built-in streams are the modules of
``clbench.data.sources``, one file per stream, each calling :func:`register_stream` when imported; the registry
imports them all the first time a name is looked up. Adding a stream is one file there (or, from outside,
one module that calls :func:`register_stream` before the suite is loaded).

A source module keeps its heavy imports (torch, Avalanche, the dataset's package) inside its functions: the suite
schema imports every source module to know the names, and loading a suite must stay cheap.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from clbench.errors import ClbenchError


def nothing_missing(cfg: Any) -> str | None:
    """The preflight check of a stream that needs nothing on disk (generated from the seed)."""
    return None


def needs_package(stream: str, package: str) -> Callable[[Any], str | None]:
    """The preflight check of a stream whose data ships inside the Python package ``package``: is it installed?"""

    def check(cfg: Any) -> str | None:
        if importlib.util.find_spec(package) is None:
            return f"stream.name: {stream} needs the package {package}; pip install {package}"
        return None

    return check


@dataclass(frozen=True)
class StreamSpec:
    """What clbench knows about one stream before building it.

    ``build(cfg, seed, with_test)`` returns the ``clbench.data.streams.Stream`` (``cfg`` a
    ``clbench.suite.StreamConfig``; ``with_test=False``: the test split is not read, see
    ``clbench.data.validation``); the harness adds the augmentation and test transform the suite asks for.
    ``check(cfg)`` is the preflight: None when the data is present or can be downloaded now, else one line naming
    what is missing and how to fix it (cheap: no decoding, no download)."""

    name: str
    build: Callable[[Any, int, bool], Any]
    num_classes: int | Callable[[Any], int] | None  # fixed, from the stream settings, or None: known once loaded
    check: Callable[[Any], str | None] = nothing_missing
    augment: Literal["none", "rrc_flip"] = "none"  # what ``stream.augment: auto`` means for this stream
    # "device": images kept as stored, resized on the device; "cached": decoded from files at stream.resolution
    # (training images at resolution*256/224 for random crops, test images as Resize + CenterCrop), so the test
    # transform is fixed and held-out images are centre-cropped (clbench.data.validation)
    images: Literal["device", "cached"] = "device"
    downloads: bool = False  # can fetch its data itself (stream.download)
    stored_size: int | None = None  # side of the stored images when all have one (CIFAR: 32)
    class_names: Callable[[], list[str]] | None = None  # class id -> name, when the stream has names
    coda_prompt_ids: bool = False  # CODA-Prompt's class ids are known (stream.class_order: coda_prompt)
    about: str = ""  # one line for documentation and listings

    def classes(self, cfg: Any) -> int | None:
        """The stream's number of classes under ``cfg`` (None: known only once the data is read)."""
        return self.num_classes(cfg) if callable(self.num_classes) else self.num_classes


_SPECS: dict[str, StreamSpec] = {}
_loaded = False


def register_stream(spec: StreamSpec) -> StreamSpec:
    """Make ``spec`` buildable by its name. A name registered by two modules is an error (two sources would
    silently compete); the same module registering it again (imported twice, reloaded) replaces it."""
    old = _SPECS.get(spec.name)
    if old is not None and _where(old) != _where(spec):
        raise ClbenchError(f"stream '{spec.name}' is registered twice (by {_where(old)} and {_where(spec)}); "
                           "give one of them another name")
    _SPECS[spec.name] = spec
    return spec


def _where(spec: StreamSpec) -> str:
    return getattr(spec.build, "__module__", None) or "?"


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from clbench.data import sources

    for module in pkgutil.iter_modules(sources.__path__):
        importlib.import_module(f"{sources.__name__}.{module.name}")


def stream_names() -> list[str]:
    """Every registered stream's name, in registration order (the built-ins alphabetically first)."""
    _load_builtins()
    return list(_SPECS)


def find_stream(name: str) -> StreamSpec | None:
    _load_builtins()
    return _SPECS.get(name)


def stream_spec(name: str) -> StreamSpec:
    """The spec of stream ``name``; one line naming the known streams when there is none."""
    spec = find_stream(name)
    if spec is None:
        raise ClbenchError(f"stream.name: unknown stream '{name}'; choose from {stream_names()}")
    return spec
