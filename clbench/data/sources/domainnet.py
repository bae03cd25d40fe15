"""``domainnet``: DomainNet (345 classes, six domains pooled) from its folder and official lists, the class list
pinned (``clbench.data.datasets.domainnet``), decoded once into the memmap cache; never downloaded (its hosting
asks for a manual download)."""

from __future__ import annotations

from clbench.data.registry import StreamSpec, register_stream
from clbench.errors import ClbenchError


def build(cfg, seed: int, with_test: bool):
    from clbench.data.datasets import domainnet
    from clbench.data.streams import data_root, image_stream

    return image_stream(cfg, seed, with_test, domainnet.load(data_root(cfg)))


def check(cfg) -> str | None:
    from clbench.data.datasets import domainnet
    from clbench.data.streams import data_root

    try:
        domainnet.locate(data_root(cfg))
    except ClbenchError as exc:
        return str(exc)
    return None


def class_names() -> list[str]:
    from clbench.data.datasets.splitfiles import class_list

    return class_list("domainnet")


register_stream(StreamSpec("domainnet", build, num_classes=345, check=check, augment="rrc_flip", images="cached",
                           class_names=class_names,
                           about="DomainNet, 345 classes over six domains, official lists, decoded once into the cache"))
