"""DomainNet (Peng et al., ICCV 2019): 345 classes in six domains, with official train/test list files.

Layout under the data root: ``domainnet/<domain>/<class>/<file>`` plus the official lists
``domainnet/<domain>_train.txt`` and ``domainnet/<domain>_test.txt`` (lines ``<domain>/<class>/<file> <label>``),
for the six domains clipart, infograph, painting, quickdraw, real, sketch. The class stream pools all six
domains (5 tasks of 69 classes, as InfLoRA). The hosting publishes no checksums, so nothing is downloaded:
a missing file gives one line saying where to get it and where to put it. The class list (label id order of
the official lists) is pinned in ``clbench/splits/domainnet_classes.txt`` and checked against the lists.
"""

from __future__ import annotations

from pathlib import Path

from clbench.data.datasets.splitfiles import Split, class_list, pinned_split
from clbench.errors import ClbenchError

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
HOME = "http://ai.bu.edu/M3SDA/"


def how_to(folder: Path) -> str:
    return (f"download the six domain zips and their <domain>_train.txt / <domain>_test.txt lists from {HOME} "
            f"and unpack them into {folder} (giving {folder}/clipart/..., {folder}/clipart_train.txt, ...), "
            "or set stream.root / CLBENCH_DATA to the folder that holds domainnet/")


def locate(root: Path) -> Path:
    for cand in (root / "domainnet", root):
        if (cand / f"{DOMAINS[0]}_train.txt").is_file():
            return cand
    raise ClbenchError(f"stream.root: DomainNet not found under {root} (no domainnet/{DOMAINS[0]}_train.txt); "
                       + how_to(root / "domainnet"))


def read_lists(folder: Path, classes: list[str]) -> Split:
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for split in ("train", "test"):
        for domain in DOMAINS:
            path = folder / f"{domain}_{split}.txt"
            if not path.is_file():
                raise ClbenchError(f"stream.root: {path} is missing; " + how_to(folder))
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != 2 or not fields[1].isdigit():
                    raise ClbenchError(f"stream.root: {path} line {n}: expected '<path> <label>'; "
                                       "re-download the official list")
                rel, label = fields[0], int(fields[1])
                pieces = rel.split("/")
                if label >= len(classes) or len(pieces) < 3 or pieces[-2] != classes[label]:
                    raise ClbenchError(f"stream.root: {path} line {n}: label {label} of {rel} does not match the "
                                       "pinned DomainNet class list; use the official lists")
                parts[split].append((rel, label))
    return Split(parts["train"], parts["test"], "derived:official-lists")


def load(root: Path) -> tuple[Path, Split, list[str]]:
    classes = class_list("domainnet")
    folder = locate(root)
    split = read_lists(folder, classes)
    pinned = pinned_split("domainnet")
    if pinned is not None and pinned.sha256 != split.sha256:
        raise ClbenchError(f"stream.root: the list files in {folder} differ from the pinned DomainNet split "
                           f"(sha256 {split.sha256[:12]} vs {pinned.sha256[:12]}); use the official lists")
    if pinned is not None:
        split.source = pinned.source
    first_missing = next((r for r, _ in split.train[:1] + split.test[:1] if not (folder / r).is_file()), None)
    if first_missing is not None:
        raise ClbenchError(f"stream.root: {folder / first_missing} is missing; " + how_to(folder))
    return folder, split, classes
