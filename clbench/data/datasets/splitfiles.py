"""Split files: a canonical text form, its sha256, and the pinned copies shipped in ``clbench/splits``.

A split is two lists of ``(relative path, class id)``, train and test. Its canonical form is one line per
image, ``<train|test>\\t<path>\\t<label>\\n`` (train first, each in the order produced from the listing), UTF-8;
its checksum is the sha256 of that text. Pinned split files are that text gzip-compressed (mtime 0, so the
compressed bytes are reproducible too); ``SHA256SUMS`` holds the sha256 of the *uncompressed* text, so the
checksum a run records is the same whether the split came from a pinned file or was derived on the spot.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from clbench.errors import ClbenchError


@dataclass
class Split:
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    source: str  # "pinned:<file>" or "derived:<rule>"

    def canonical(self) -> bytes:
        return canonical(self.train, self.test)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()


def canonical(train: list[tuple[str, int]], test: list[tuple[str, int]]) -> bytes:
    lines = [f"train\t{p}\t{y}\n" for p, y in train] + [f"test\t{p}\t{y}\n" for p, y in test]
    return "".join(lines).encode()


def parse_canonical(blob: bytes, where: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for n, line in enumerate(blob.decode().splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 3 or parts[0] not in out or not parts[2].isdigit():
            raise ClbenchError(f"{where}: line {n} is not '<train|test>\\t<path>\\t<label>'; regenerate it with "
                               "python -m clbench.splits.make_splits")
        out[parts[0]].append((parts[1], int(parts[2])))
    return out["train"], out["test"]


def splits_dir() -> Path:
    return Path(str(resources.files("clbench.splits")))


def pinned_sums(folder: Path | None = None) -> dict[str, str]:
    path = (folder or splits_dir()) / "SHA256SUMS"
    sums = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                digest, name = line.split(maxsplit=1)
                sums[name.strip()] = digest
    return sums


def read_pinned(name: str, folder: Path | None = None) -> bytes | None:
    """The (uncompressed) content of pinned file ``name``, verified against SHA256SUMS; None if absent."""
    folder = folder or splits_dir()
    path = folder / name
    if not path.is_file():
        return None
    blob = path.read_bytes()
    if name.endswith(".gz"):
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError) as exc:
            raise ClbenchError(f"{path}: not a valid gzip file ({exc}); restore it from the repository") from None
    expected = pinned_sums(folder).get(name)
    if expected is None:
        raise ClbenchError(f"{path}: no checksum for it in {folder / 'SHA256SUMS'}; regenerate with "
                           "python -m clbench.splits.make_splits")
    actual = hashlib.sha256(blob).hexdigest()
    if actual != expected:
        raise ClbenchError(f"{path}: sha256 {actual[:16]}... does not match SHA256SUMS ({expected[:16]}...); "
                           "the pinned file is corrupt or edited: restore it from the repository")
    return blob


def class_list(dataset: str, folder: Path | None = None) -> list[str]:
    blob = read_pinned(f"{dataset}_classes.txt", folder)
    if blob is None:
        raise ClbenchError(f"clbench/splits/{dataset}_classes.txt is missing from the installation; reinstall clbench")
    return blob.decode().split()


def pinned_split(dataset: str, folder: Path | None = None) -> Split | None:
    name = f"{dataset}_split.tsv.gz"
    blob = read_pinned(name, folder)
    if blob is None:
        return None
    train, test = parse_canonical(blob, str((folder or splits_dir()) / name))
    return Split(train, test, f"pinned:{name}")


def write_pinned(dataset: str, split: Split, classes: list[str], folder: Path) -> dict[str, str]:
    """Write ``<dataset>_split.tsv.gz`` and ``<dataset>_classes.txt`` and update SHA256SUMS; return the sums."""
    folder.mkdir(parents=True, exist_ok=True)
    blob = split.canonical()
    (folder / f"{dataset}_split.tsv.gz").write_bytes(gzip.compress(blob, mtime=0))
    class_blob = ("\n".join(classes) + "\n").encode()
    (folder / f"{dataset}_classes.txt").write_bytes(class_blob)
    sums = pinned_sums(folder)
    sums[f"{dataset}_split.tsv.gz"] = hashlib.sha256(blob).hexdigest()
    sums[f"{dataset}_classes.txt"] = hashlib.sha256(class_blob).hexdigest()
    (folder / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))
    return sums
