"""CIFAR-100 (Krizhevsky, 2009) on disk: where it lives under the data root and whether it is intact.

Layout: ``<data root>/cifar100/cifar-100-python/`` (what torchvision and Avalanche download), or
``<stream.root>/cifar-100-python/`` when the suite names a root that holds it directly. The split is the
dataset's own (50,000 train / 10,000 test); its checksum is derived from the verified official files.
``clbench.data.streams`` builds the stream (Avalanche's ``SplitCIFAR100``); nothing here imports Avalanche.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from clbench.data.datasets.download import file_digest
from clbench.errors import ClbenchError


def folder(root: Path, explicit_root: bool) -> Path:
    """The folder that holds (or will hold) ``cifar-100-python/``: ``root/cifar100`` for the default data root,
    and for an explicit ``stream.root`` unless that root holds ``cifar-100-python/`` directly."""
    if not explicit_root or (root / "cifar100" / "cifar-100-python").is_dir():
        return root / "cifar100"
    return root


def verify(root: Path, allow_download: bool) -> str | None:
    """Verify an existing ``cifar-100-python`` against torchvision's md5s; return the split checksum.

    None when the folder is absent and a download may fetch it. The checksum is the sha256 of the verified
    ``<file> <md5>`` lines of the official train and test files (the split is the dataset's own).
    """
    from torchvision.datasets import CIFAR100  # torchvision's file list and md5s: the official ones

    data = root / CIFAR100.base_folder
    if not data.is_dir():
        if allow_download:
            return None
        raise ClbenchError(f"stream.root: CIFAR-100 not found under {root} (no {CIFAR100.base_folder}/) and "
                           "stream.download is false; put cifar-100-python/ there or allow the download")
    lines = []
    for name, md5 in [*CIFAR100.train_list, *CIFAR100.test_list, (CIFAR100.meta["filename"], CIFAR100.meta["md5"])]:
        path = data / name
        if not path.is_file():
            raise ClbenchError(f"stream.root: {path} is missing; delete {data} and download CIFAR-100 again")
        got = file_digest(path)
        if got != md5:
            raise ClbenchError(f"stream.root: {path} has md5 {got}, expected {md5} (corrupt); delete {data} and "
                               "download CIFAR-100 again")
        lines.append(f"{name} {md5}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()
