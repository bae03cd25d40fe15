"""Produce the pinned class lists and split files from the datasets' own listings or from published lists.

    python -m clbench.splits.make_splits imagenet_r --root DATA [--out clbench/splits]
    python -m clbench.splits.make_splits domainnet --root DATA [--out clbench/splits]
    python -m clbench.splits.make_splits imagenet_r --from-inflora-yaml DIR [--out clbench/splits]
    python -m clbench.splits.make_splits domainnet --from-inflora-yaml DIR [--out clbench/splits]

``--root``. ImageNet-R: the class list is the sorted wnid folder names of the extracted ``imagenet-r.tar``; the
split is the documented fallback 80/20 rule (``clbench.data.datasets.imagenet_r.derive_split``) over the folder
listing. DomainNet: the class list is the label-id order of the official ``<domain>_{train,test}.txt`` lists
(label -> class folder); the split is those lists, six domains, in order.

``--from-inflora-yaml DIR``: the split lists of the InfLoRA repository (github.com/liangyanshuo/InfLoRA,
``utils/splits/imagenet-r_{train,test}.yaml``, ``dataloaders/splits/domainnet_{train,test}.yaml``), YAML
mappings ``{data: [path, ...], targets: [label, ...]}`` with paths such as ``data/imagenet-r/<wnid>/<file>``.
Paths are cut to the layout under the data root (``<wnid>/<file>``, ``<domain>/<class>/<file>``). The class
list is the pinned one and is not rewritten. ImageNet-R's YAML labels are a permutation of the classes (the
order of the lists' authors, CODA-Prompt): the InfLoRA loader never uses them (it reads the images through
``ImageFolder``, whose ids are the sorted wnids = our class list), so they are checked to be a consistent
permutation and replaced by our ids. DomainNet's YAML labels are the class ids InfLoRA trains with, so they
must agree with the pinned class list (else an error). Each list is sorted by (label, path).

All commands write ``<dataset>_classes.txt`` and ``<dataset>_split.tsv.gz`` with their sha256 in
``SHA256SUMS`` (of the uncompressed text). Commit the outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from clbench.data.datasets import domainnet, imagenet_r
from clbench.data.datasets.splitfiles import Split, class_list, splits_dir, write_pinned
from clbench.errors import ClbenchError

# file names of the InfLoRA lists (imagenet_r under utils/splits/, domainnet under dataloaders/splits/)
INFLORA_YAML = {"imagenet_r": "imagenet-r_{}.yaml", "domainnet": "domainnet_{}.yaml"}


def imagenet_r_files(root: Path) -> tuple[Split, list[str]]:
    folder = imagenet_r.locate(root, allow_download=False)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    return imagenet_r.derive_split(imagenet_r.listing(folder, classes), classes), classes


def domainnet_files(root: Path) -> tuple[Split, list[str]]:
    folder = domainnet.locate(root)
    names: dict[int, str] = {}
    for domain in domainnet.DOMAINS:
        for split in ("train", "test"):
            for line in (folder / f"{domain}_{split}.txt").read_text().splitlines():
                if line.strip():
                    rel, label = line.split()
                    names.setdefault(int(label), rel.split("/")[-2])
    classes = [names[i] for i in range(len(names))]
    return domainnet.read_lists(folder, classes), classes


def read_inflora_yaml(path: Path) -> list[tuple[str, int]]:
    """``[(path as written, label)]`` of one InfLoRA split YAML, checked for shape."""
    if not path.is_file():
        raise ClbenchError(f"--from-inflora-yaml: {path} is missing; copy it from the InfLoRA repository")
    try:
        with path.open() as f:
            doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # safe, C speed if built
    except yaml.YAMLError as exc:
        raise ClbenchError(f"--from-inflora-yaml: {path} is not valid YAML ({str(exc).splitlines()[0]}); use "
                           "the file from the InfLoRA repository unchanged") from None
    data, targets = (doc.get("data"), doc.get("targets")) if isinstance(doc, dict) else (None, None)
    if not isinstance(data, list) or not isinstance(targets, list) or len(data) != len(targets):
        raise ClbenchError(f"--from-inflora-yaml: {path} is not a mapping with equally long 'data' and "
                           "'targets' lists; use the file from the InfLoRA repository unchanged")
    if not all(isinstance(p, str) for p in data) or not all(isinstance(y, int) for y in targets):
        raise ClbenchError(f"--from-inflora-yaml: {path}: 'data' must hold paths and 'targets' integers")
    return list(zip(data, targets, strict=True))


def _relative(dataset: str, raw: str, classes: set[str], where: str) -> str:
    """Cut a listed path to the layout under the data root: ``<wnid>/<file>`` or ``<domain>/<class>/<file>``."""
    parts = raw.replace("\\", "/").split("/")
    if dataset == "imagenet_r" and len(parts) >= 2 and parts[-2] in classes:
        return "/".join(parts[-2:])
    if dataset == "domainnet":
        starts = [i for i, p in enumerate(parts) if p in domainnet.DOMAINS and i == len(parts) - 3]
        if starts:
            return "/".join(parts[starts[0]:])
    layout = "<wnid>/<file>" if dataset == "imagenet_r" else "<domain>/<class>/<file>"
    raise ClbenchError(f"--from-inflora-yaml: {where}: path {raw!r} does not end in {layout} with a known "
                       f"{'wnid' if dataset == 'imagenet_r' else 'domain'}")


def inflora_yaml_split(dataset: str, folder: Path, classes: list[str]) -> Split:
    """The canonical split of the InfLoRA YAML lists in ``folder``, labelled with our class ids."""
    known, index = set(classes), {c: i for i, c in enumerate(classes)}
    parts: dict[str, list[tuple[str, int]]] = {}
    seen_label: dict[int, str] = {}
    for split in ("train", "test"):
        path = folder / INFLORA_YAML[dataset].format(split)
        rows = []
        for raw, label in read_inflora_yaml(path):
            rel = _relative(dataset, raw, known, str(path))
            name = rel.split("/")[-2]  # wnid (ImageNet-R) or class folder (DomainNet)
            if seen_label.setdefault(label, name) != name:
                raise ClbenchError(f"--from-inflora-yaml: {path}: label {label} names both {seen_label[label]} "
                                   f"and {name}; the lists are inconsistent")
            if dataset == "domainnet" and (label >= len(classes) or classes[label] != name):
                raise ClbenchError(f"--from-inflora-yaml: {path}: label {label} of {raw} is not class {name} in "
                                   "clbench/splits/domainnet_classes.txt; the lists use another class order")
            rows.append((rel, index[name]))
        parts[split] = sorted(rows, key=lambda r: (r[1], r[0]))
    if len(set(seen_label.values())) != len(seen_label):
        raise ClbenchError(f"--from-inflora-yaml: {folder}: two labels name the same class; the lists are "
                           "inconsistent")
    _check_partition(parts["train"], parts["test"], classes, folder)
    return Split(parts["train"], parts["test"], f"inflora-yaml:{INFLORA_YAML[dataset].format('{train,test}')}")


def _check_partition(train: list[tuple[str, int]], test: list[tuple[str, int]], classes: list[str],
                     folder: Path) -> None:
    for name, rows in (("train", train), ("test", test)):
        paths = [p for p, _ in rows]
        if len(set(paths)) != len(paths):
            raise ClbenchError(f"--from-inflora-yaml: {folder}: the {name} list holds an image twice")
        missing = sorted(set(range(len(classes))) - {y for _, y in rows})
        if missing:
            raise ClbenchError(f"--from-inflora-yaml: {folder}: the {name} list has no image of class "
                               f"{classes[missing[0]]} ({len(missing)} classes missing)")
    both = {p for p, _ in train} & {p for p, _ in test}
    if both:
        raise ClbenchError(f"--from-inflora-yaml: {folder}: {len(both)} images are in both train and test "
                           f"(e.g. {sorted(both)[0]})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=["imagenet_r", "domainnet"])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", type=Path, help="data root holding imagenet-r/ or domainnet/")
    src.add_argument("--from-inflora-yaml", type=Path, metavar="DIR",
                     help="folder holding InfLoRA's imagenet-r_{train,test}.yaml or domainnet_{train,test}.yaml")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the installed clbench/splits)")
    args = ap.parse_args(argv)
    try:
        if args.from_inflora_yaml is not None:
            classes = class_list(args.dataset)
            split = inflora_yaml_split(args.dataset, args.from_inflora_yaml, classes)
        else:
            split, classes = (imagenet_r_files if args.dataset == "imagenet_r" else domainnet_files)(args.root)
    except ClbenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    sums = write_pinned(args.dataset, split, classes, args.out or splits_dir())
    print(f"classes={len(classes)} train={len(split.train)} test={len(split.test)}")
    for name in (f"{args.dataset}_classes.txt", f"{args.dataset}_split.tsv.gz"):
        print(f"{name} sha256={sums[name]}")


if __name__ == "__main__":
    main()
