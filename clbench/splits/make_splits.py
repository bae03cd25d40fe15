"""Produce the pinned class lists and split files from the datasets' own listings.

    python -m clbench.splits.make_splits imagenet_r --root DATA [--out clbench/splits]
    python -m clbench.splits.make_splits domainnet --root DATA [--out clbench/splits]

ImageNet-R: the class list is the sorted wnid folder names of the extracted ``imagenet-r.tar``; the split is the
documented 80/20 rule (``clbench.datasets.imagenet_r.derive_split``) over the folder listing. DomainNet: the class
list is the label-id order of the official ``<domain>_{train,test}.txt`` lists (label -> class folder); the
split is those lists, six domains, in order. Both are written as ``<dataset>_classes.txt`` and
``<dataset>_split.tsv.gz`` with their sha256 in ``SHA256SUMS`` (of the uncompressed text). Commit the outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clbench.datasets import domainnet, imagenet_r
from clbench.datasets.splitfiles import Split, splits_dir, write_pinned
from clbench.errors import ClbenchError


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=["imagenet_r", "domainnet"])
    ap.add_argument("--root", required=True, type=Path, help="data root holding imagenet-r/ or domainnet/")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the installed clbench/splits)")
    args = ap.parse_args(argv)
    try:
        split, classes = (imagenet_r_files if args.dataset == "imagenet_r" else domainnet_files)(args.root)
    except ClbenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    sums = write_pinned(args.dataset, split, classes, args.out or splits_dir())
    print(f"classes={len(classes)} train={len(split.train)} test={len(split.test)}")
    for name in (f"{args.dataset}_classes.txt", f"{args.dataset}_split.tsv.gz"):
        print(f"{name} sha256={sums[name]}")


if __name__ == "__main__":
    main()
