"""The shipped official ImageNet-R split (InfLoRA's lists) and the converter that produced it
(``make_splits --from-inflora-yaml``), on synthetic YAML lists in the InfLoRA format."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
import yaml

from clbench.data.datasets import imagenet_r, splitfiles
from clbench.data.datasets.domainnet import DOMAINS
from clbench.errors import ClbenchError
from clbench.splits.make_splits import main

INR = splitfiles.class_list("imagenet_r")
DN = splitfiles.class_list("domainnet")


def _write(folder: Path, stem: str, rows: list[tuple[str, int]]) -> None:
    for split in ("train", "test"):
        part = [(p, y) for p, y in rows if f"/{split}_" in p]
        doc = {"data": [p for p, _ in part], "targets": [y for _, y in part]}
        (folder / f"{stem}_{split}.yaml").write_text(yaml.safe_dump(doc))


def _inr_rows(perm=lambda i: (7 * i + 3) % 200, prefix="data/imagenet-r") -> list[tuple[str, int]]:
    """Two train and one test image per class, labelled by a permutation of our ids (as the real lists are)."""
    rows = []
    for i, wnid in enumerate(INR):
        rows += [(f"{prefix}/{wnid}/{s}_{k}.jpg", perm(i)) for s, k in (("train", 0), ("train", 1), ("test", 0))]
    return rows[::-1]  # any order in; sorted out


def test_shipped_split_is_the_official_imagenet_r_lists():
    split = splitfiles.pinned_split("imagenet_r")  # verified against SHA256SUMS on reading
    assert split is not None and split.source == "pinned:imagenet_r_split.tsv.gz"
    assert len(split.train) == 24000 and len(split.test) == 6000  # InfLoRA's lists: 24,000 + 6,000 = all 30,000
    tr, te = {p for p, _ in split.train}, {p for p, _ in split.test}
    assert len(tr) == 24000 and len(te) == 6000 and not tr & te
    for path, label in split.train + split.test:
        wnid, name = path.split("/")  # the tarball layout imagenet-r/<wnid>/<file>
        assert INR[label] == wnid and name.endswith(".jpg")
    assert {y for _, y in split.train} == {y for _, y in split.test} == set(range(200))
    # entries straight from the official files, relabelled from their CODA-Prompt ids to the sorted-wnid ids
    assert ("n02128757/sculpture_4.jpg", INR.index("n02128757")) in split.train
    assert ("n01910747/tattoo_75.jpg", INR.index("n01910747")) in split.test
    sums = splitfiles.pinned_sums()
    assert sums["imagenet_r_split.tsv.gz"] == split.sha256 == "8f67dccacd26b181e1e8d06e99edc26293dab1e1473e75084870f258e19efa97"


def test_shipped_split_takes_precedence_over_the_rule(tmp_path):
    (tmp_path / "imagenet-r" / INR[0]).mkdir(parents=True)
    (tmp_path / "imagenet-r" / INR[0] / "art_0.jpg").write_bytes(b"x")  # a folder that is not the full dataset
    with pytest.raises(ClbenchError, match="listed in the pinned split"):
        imagenet_r.load(tmp_path, allow_download=False)


def test_converter_relabels_sorts_and_checksums(tmp_path):
    src, out = tmp_path / "yaml", tmp_path / "out"
    src.mkdir()
    _write(src, "imagenet-r", _inr_rows())
    main(["imagenet_r", "--from-inflora-yaml", str(src), "--out", str(out)])
    blob = gzip.decompress((out / "imagenet_r_split.tsv.gz").read_bytes())
    lines = blob.decode().splitlines()
    assert lines[:3] == [f"train\t{INR[0]}/train_0.jpg\t0", f"train\t{INR[0]}/train_1.jpg\t0",
                         f"train\t{INR[1]}/train_0.jpg\t1"]
    assert lines[400] == f"test\t{INR[0]}/test_0.jpg\t0" and len(lines) == 600
    assert splitfiles.pinned_sums(out)["imagenet_r_split.tsv.gz"] == hashlib.sha256(blob).hexdigest()
    assert (out / "imagenet_r_classes.txt").read_bytes() == (splitfiles.splits_dir() / "imagenet_r_classes.txt").read_bytes()
    # the same lists written under a pre-split folder (imagenet-r/train/<wnid>/...) give the same split
    src2 = tmp_path / "yaml2"
    src2.mkdir()
    _write(src2, "imagenet-r", _inr_rows(prefix="data/imagenet-r/train"))
    main(["imagenet_r", "--from-inflora-yaml", str(src2), "--out", str(tmp_path / "out2")])
    assert splitfiles.pinned_sums(tmp_path / "out2")["imagenet_r_split.tsv.gz"] == hashlib.sha256(blob).hexdigest()


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows + [(rows[0][0].replace("train_", "test_"), rows[0][1])], "twice|in both"),
    (lambda rows: [(p, 5 if p.startswith(f"data/imagenet-r/{INR[9]}/") else y) for p, y in rows], "names both"),
    (lambda rows: [r for r in rows if f"/{INR[4]}/test_" not in r[0]], "no image of class"),
    (lambda rows: [("data/imagenet-r/n99999999/train_0.jpg", 0)] + rows, "known wnid"),
])
def test_converter_refuses_inconsistent_lists(tmp_path, edit, message, capsys):
    _write(tmp_path, "imagenet-r", edit(_inr_rows()))
    with pytest.raises(SystemExit, match=message):
        main(["imagenet_r", "--from-inflora-yaml", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_converter_refuses_malformed_or_missing_files(tmp_path):
    with pytest.raises(SystemExit, match="imagenet-r_train.yaml is missing"):
        main(["imagenet_r", "--from-inflora-yaml", str(tmp_path), "--out", str(tmp_path / "out")])
    (tmp_path / "imagenet-r_train.yaml").write_text("data: [a.jpg]\ntargets: []\n")
    with pytest.raises(SystemExit, match="equally long"):
        main(["imagenet_r", "--from-inflora-yaml", str(tmp_path), "--out", str(tmp_path / "out")])
    (tmp_path / "imagenet-r_train.yaml").write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(SystemExit, match="not valid YAML"):  # safe loader: no object construction
        main(["imagenet_r", "--from-inflora-yaml", str(tmp_path), "--out", str(tmp_path / "out")])


def _dn_rows(label=lambda i: i) -> list[tuple[str, int]]:
    rows = []
    for i, name in enumerate(DN):
        d = DOMAINS[i % len(DOMAINS)]
        rows += [(f"data/domainnet/{d}/{name}/{s}_{d}_{i}.jpg", label(i)) for s in ("train", "test")]
    return rows


def test_converter_domainnet_keeps_the_official_ids(tmp_path):
    src = tmp_path / "yaml"
    src.mkdir()
    _write(src, "domainnet", _dn_rows())
    main(["domainnet", "--from-inflora-yaml", str(src), "--out", str(tmp_path / "out")])
    split = splitfiles.pinned_split("domainnet", tmp_path / "out")
    assert split.train[0] == (f"clipart/{DN[0]}/train_clipart_0.jpg", 0) and len(split.test) == 345
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad, "domainnet", _dn_rows(lambda i: (i + 1) % 345))  # another class order: InfLoRA's ids differ
    with pytest.raises(SystemExit, match="uses? another class order"):
        main(["domainnet", "--from-inflora-yaml", str(bad), "--out", str(tmp_path / "out2")])
