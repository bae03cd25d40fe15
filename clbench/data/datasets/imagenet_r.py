"""ImageNet-R (Hendrycks et al., 2021): 30,000 renditions of 200 ImageNet classes, one folder per WordNet id.

Layout under the data root: ``imagenet-r/<wnid>/<file>`` (what ``imagenet-r.tar`` extracts to). The tarball is
downloaded when missing and checked against its md5. The class list (200 wnids, sorted = ImageFolder order,
the class ids InfLoRA uses) is pinned in ``clbench/splits/imagenet_r_classes.txt``.

Train/test split. ImageNet-R ships no split. The default is the shipped ``imagenet_r_split.tsv.gz``: the 80/20
lists of the InfLoRA repository (``utils/splits/imagenet-r_{train,test}.yaml``, 24,000 + 6,000 images, in the
order of CODA-Prompt's lists), converted by ``python -m clbench.splits.make_splits imagenet_r --from-inflora-yaml DIR``
with labels re-expressed in our (sorted-wnid) class ids. Fallback, used only when no split file is shipped (an
installation without it, or a test's splits folder): a documented deterministic 80/20 rule over the dataset's
own listing: within each class, files are ranked by ``sha256("<wnid>/<file name>")`` and the first
``round(0.2 * n)`` go to test, the rest to train (both then sorted by class id and name). Either way the run
records the split's sha256 and source.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from clbench.data.datasets.download import download, extract_tar, verify_md5
from clbench.data.datasets.splitfiles import Split, class_list, pinned_split
from clbench.errors import ClbenchError

URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
# md5 of imagenet-r.tar as used by public dataset libraries (two independent sources agree); the dataset's
# authors publish none.
MD5 = "a61312130a589d0ca1a8fca1f2bd3337"
TEST_FRACTION = 0.2
RULE = "sha256-rank-20pct-per-class"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def how_to(root: Path) -> str:
    return (f"download {URL} (md5 {MD5}) and extract it into {root} (giving {root / 'imagenet-r'}/<wnid>/...), "
            "or set stream.root / CLBENCH_DATA to a folder that holds imagenet-r/")


def locate(root: Path, allow_download: bool) -> Path:
    """The folder holding the 200 wnid sub-folders; downloads and extracts the tarball when allowed."""
    for cand in (root / "imagenet-r", root):
        if cand.is_dir() and any(p.name.startswith("n") and p.is_dir() for p in cand.iterdir()):
            return cand
    tar = root / "imagenet-r.tar"
    if not tar.is_file():
        if not allow_download:
            raise ClbenchError(f"stream.root: ImageNet-R not found under {root} (stream.download is false); "
                               + how_to(root))
        download(URL, tar, MD5, how_to(root))
    else:
        verify_md5(tar, MD5, how_to(root))
    extract_tar(tar, root)
    return root / "imagenet-r"


def listing(folder: Path, classes: list[str]) -> dict[str, list[str]]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    missing = [c for c in classes if c not in found]
    extra = [c for c in found if c not in set(classes)]
    if missing or extra:
        raise ClbenchError(f"stream.root: {folder} does not hold the 200 ImageNet-R classes "
                           f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}); "
                           "re-extract imagenet-r.tar")
    out = {}
    for c in classes:
        names = sorted(p.name for p in (folder / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(names) < 2:
            raise ClbenchError(f"stream.root: {folder / c} holds {len(names)} images; re-extract imagenet-r.tar")
        out[c] = names
    return out


def derive_split(files: dict[str, list[str]], classes: list[str]) -> Split:
    train, test = [], []
    for label, wnid in enumerate(classes):
        names = files[wnid]
        ranked = sorted(names, key=lambda n: hashlib.sha256(f"{wnid}/{n}".encode()).hexdigest())
        n_test = int(len(names) * TEST_FRACTION + 0.5)
        held = set(ranked[:n_test])
        test += [(f"{wnid}/{n}", label) for n in names if n in held]
        train += [(f"{wnid}/{n}", label) for n in names if n not in held]
    return Split(train, test, f"derived:{RULE}")


def load(root: Path, allow_download: bool) -> tuple[Path, Split, list[str]]:
    """``(image folder, split, class names)``; the split is the shipped one (InfLoRA's lists), else the rule."""
    classes = class_list("imagenet_r")
    folder = locate(root, allow_download)
    split = pinned_split("imagenet_r")
    if split is None:
        split = derive_split(listing(folder, classes), classes)
    else:
        for rel, _ in split.train + split.test:
            if not (folder / rel).is_file():
                raise ClbenchError(f"stream.root: {folder / rel} (listed in the pinned split) is missing; "
                                   "re-extract imagenet-r.tar (the split lists all of its 30,000 images)")
    return folder, split, classes
