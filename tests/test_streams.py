"""Real benchmark streams on small fake datasets in each on-disk layout (generated in temporary folders):
class splits and orders, split checksums, clear errors for missing or corrupt data, the decode-once cache."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from clbench.data import imagecache
from clbench.data.augment import random_resized_crop_flip
from clbench.data.datasets import splitfiles
from clbench.data.datasets.domainnet import DOMAINS
from clbench.data.streams import build_stream
from clbench.errors import ClbenchError
from clbench.suite import StreamConfig, load_suite

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _fake_imagenet_r_uses_the_rule(request, tmp_path, monkeypatch):
    """The fake ImageNet-R below holds five images per class, not the images of the shipped official split, so
    its tests read a splits folder with the class lists only: the documented fallback rule applies."""
    if "imagenet_r_root" not in request.fixturenames:
        return
    folder = tmp_path / "classes-only"
    folder.mkdir()
    keep = [n for n in splitfiles.pinned_sums() if n.endswith("_classes.txt")]
    for name in keep:
        (folder / name).write_bytes((splitfiles.splits_dir() / name).read_bytes())
    sums = splitfiles.pinned_sums()
    (folder / "SHA256SUMS").write_text("".join(f"{sums[n]}  {n}\n" for n in keep))
    monkeypatch.setattr(splitfiles, "splits_dir", lambda: folder)


def _save(path: Path, rgb: tuple[int, int, int], size=(12, 10), fmt="JPEG") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, fmt)


@pytest.fixture(scope="module")
def imagenet_r_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inr")
    for c, wnid in enumerate(splitfiles.class_list("imagenet_r")):
        for k in range(5):
            _save(root / "imagenet-r" / wnid / f"art_{k}.jpg", (c, 40 * k, 128))
    return root


@pytest.fixture(scope="module")
def domainnet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dn") / "domainnet"
    classes = splitfiles.class_list("domainnet")
    for d, domain in enumerate(DOMAINS):
        for split in ("train", "test"):
            lines = []
            for label, name in enumerate(classes):
                rel = f"{domain}/{name}/{domain}_{label:03d}_{split}.png"
                _save(root / rel, (label % 256, d * 40, 0 if split == "train" else 255), (8, 8), "PNG")
                lines.append(f"{rel} {label}\n")
            (root / f"{domain}_{split}.txt").write_text("".join(lines))
    return root.parent


def _cfg(name: str, root: Path, **kw) -> StreamConfig:
    base = dict(name=name, root=str(root), resolution=16, download=False)
    return StreamConfig(**{**base, **kw})


def test_imagenet_r_split_order_and_checksum(imagenet_r_root):
    s = build_stream(_cfg("imagenet_r", imagenet_r_root, num_tasks=10), seed=3)
    assert s.class_order == [int(c) for c in np.random.RandomState(3).permutation(200)]
    assert len(s.tasks) == 10 and all(len(t.classes) == 20 for t in s.tasks)
    assert [c for t in s.tasks for c in t.classes] == list(range(200))  # contiguous labels per task
    for t in s.tasks:
        assert len(t.train_y) == 4 * 20 and len(t.test_y) == 20  # 80/20 of five images per class
        assert set(t.train_y.tolist()) == set(t.classes) == set(t.test_y.tolist())
        assert t.train_x[torch.arange(3)].shape == (3, 3, 18, 18)  # cached at 16 * 256 / 224 for crops
        assert t.test_x[torch.arange(2)].shape == (2, 3, 16, 16)
    # pixel colour encodes the original class: the remapped label must point back to it through the order
    t = s.tasks[1]
    red = t.test_x[torch.arange(len(t.test_y))][:, 0, 8, 8].long()
    expected = torch.tensor([s.class_order[y] for y in t.test_y.tolist()])
    assert (red - expected).abs().max() <= 2  # JPEG is lossy by a level or two
    # the rule: in every class the test image is the one whose "<wnid>/<name>" hashes lowest
    from clbench.data.datasets import imagenet_r

    folder = imagenet_r_root / "imagenet-r"
    split = imagenet_r.derive_split(imagenet_r.listing(folder, splitfiles.class_list("imagenet_r")),
                                    splitfiles.class_list("imagenet_r"))
    wnid = splitfiles.class_list("imagenet_r")[7]
    names = [f"art_{k}.jpg" for k in range(5)]
    lowest = min(names, key=lambda n: hashlib.sha256(f"{wnid}/{n}".encode()).hexdigest())
    assert [p for p, y in split.test if y == 7] == [f"{wnid}/{lowest}"]
    assert s.meta["split_sha256"] == hashlib.sha256(splitfiles.canonical(split.train, split.test)).hexdigest()
    assert s.meta["split_source"].startswith("derived:") and s.meta["augment"] == "rrc_flip"
    assert s.augment is not None


def test_second_run_is_served_from_the_cache(imagenet_r_root, monkeypatch, tmp_path):
    cfg = _cfg("imagenet_r", imagenet_r_root, num_tasks=5)
    first = build_stream(cfg, seed=0)
    files = sorted((tmp_path / "cache" / "images").glob("*.u8"))
    assert len(files) == 2  # train and test
    before = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although the cache holds the images")

    monkeypatch.setattr(imagecache, "decode_image", no_decoding)
    second = build_stream(cfg, seed=0)
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == before
    assert isinstance(second.tasks[0].train_x.base, np.memmap)
    idx = torch.arange(len(first.tasks[2].train_y))
    assert torch.equal(first.tasks[2].train_x[idx], second.tasks[2].train_x[idx])


def test_pinned_split_wins_and_is_verified(imagenet_r_root, monkeypatch, tmp_path):
    from clbench.data.datasets import imagenet_r

    classes = splitfiles.class_list("imagenet_r")
    derived = imagenet_r.derive_split(imagenet_r.listing(imagenet_r_root / "imagenet-r", classes), classes)
    pinned = splitfiles.Split(derived.train[::-1], derived.test, "x")  # a different but valid split
    folder = tmp_path / "splits"
    splitfiles.write_pinned("imagenet_r", pinned, classes, folder)
    monkeypatch.setattr(splitfiles, "splits_dir", lambda: folder)
    s = build_stream(_cfg("imagenet_r", imagenet_r_root, num_tasks=20, cache=False), seed=0)
    assert s.meta["split_source"] == "pinned:imagenet_r_split.tsv.gz"
    assert s.meta["split_sha256"] == pinned.sha256 != derived.sha256
    sums = (folder / "SHA256SUMS").read_text().replace(pinned.sha256, "0" * 64)
    (folder / "SHA256SUMS").write_text(sums)
    with pytest.raises(ClbenchError, match="does not match SHA256SUMS"):
        build_stream(_cfg("imagenet_r", imagenet_r_root, num_tasks=20, cache=False), seed=0)


def test_shipped_files_match_their_checksums():
    sums = splitfiles.pinned_sums()
    assert {"imagenet_r_classes.txt", "domainnet_classes.txt"} <= set(sums)
    for name in sums:
        assert splitfiles.read_pinned(name) is not None  # raises on a mismatch
    assert len(splitfiles.class_list("imagenet_r")) == 200 and len(splitfiles.class_list("domainnet")) == 345


def test_imagenet_r_missing_or_corrupt(tmp_path, imagenet_r_root):
    with pytest.raises(ClbenchError, match=r"ImageNet-R not found.*imagenet-r\.tar \(md5 a6131213"):
        build_stream(_cfg("imagenet_r", tmp_path / "empty", num_tasks=10), seed=0)
    (tmp_path / "tar").mkdir()
    (tmp_path / "tar" / "imagenet-r.tar").write_bytes(b"not a tarball")
    with pytest.raises(ClbenchError, match="corrupt or incomplete"):
        build_stream(_cfg("imagenet_r", tmp_path / "tar", num_tasks=10), seed=0)
    # a damaged image is named in the error
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(imagenet_r_root, copy)
    bad = copy / "imagenet-r" / splitfiles.class_list("imagenet_r")[5] / "art_2.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ClbenchError, match="art_2.jpg.*corrupt"):
        build_stream(_cfg("imagenet_r", copy, num_tasks=10), seed=0)
    with pytest.raises(ClbenchError, match="do not divide"):
        build_stream(_cfg("imagenet_r", imagenet_r_root, num_tasks=7), seed=0)


def test_domainnet_official_lists(domainnet_root):
    s = build_stream(_cfg("domainnet", domainnet_root, num_tasks=5, shuffle_classes=False), seed=0)
    assert s.class_order == list(range(345))
    assert [len(t.classes) for t in s.tasks] == [69] * 5
    for t in s.tasks:  # every class has one image per domain in each split, all six domains pooled
        assert len(t.train_y) == len(t.test_y) == 69 * 6
    t = s.tasks[0]
    blue = t.test_x[torch.arange(len(t.test_y))][:, 2].float().mean()
    assert blue > 200  # test images come from the *_test lists (blue = 255 in the fake data)
    lines = []
    for split in ("train", "test"):
        for domain in DOMAINS:
            for line in (domainnet_root / "domainnet" / f"{domain}_{split}.txt").read_text().splitlines():
                rel, label = line.split()
                lines.append(f"{split}\t{rel}\t{label}\n")
    assert s.meta["split_sha256"] == hashlib.sha256("".join(lines).encode()).hexdigest()
    assert s.meta["split_source"] == "derived:official-lists"


def test_domainnet_errors(domainnet_root, tmp_path):
    with pytest.raises(ClbenchError, match="DomainNet not found.*M3SDA"):
        build_stream(_cfg("domainnet", tmp_path, num_tasks=5), seed=0)
    import shutil

    bad = tmp_path / "bad" / "domainnet"
    shutil.copytree(domainnet_root / "domainnet", bad)
    (bad / "sketch_test.txt").unlink()
    with pytest.raises(ClbenchError, match="sketch_test.txt is missing"):
        build_stream(_cfg("domainnet", bad.parent, num_tasks=5), seed=0)
    text = (bad / "clipart_train.txt").read_text().replace(" 0\n", " 1\n", 1)
    (bad / "clipart_train.txt").write_text(text)
    with pytest.raises(ClbenchError, match="does not match the pinned DomainNet class list"):
        build_stream(_cfg("domainnet", bad.parent, num_tasks=5), seed=0)


def _fake_cifar(root: Path, monkeypatch) -> Path:
    from torchvision.datasets import CIFAR100

    folder = root / "cifar100" / CIFAR100.base_folder
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, per in (("train", 3), ("test", 1)):
        labels = np.repeat(np.arange(100), per)
        data = rng.randint(0, 255, (len(labels), 3072)).astype(np.uint8)
        data[:, 0] = labels  # first red pixel = class id
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": [0] * len(labels)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    md5 = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in ("train", "test", "meta")}
    # the fake files stand in for the real ones: pin their md5 where torchvision keeps the official ones
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": md5["meta"]})
    return folder


def test_split_cifar100_pickle_layout(tmp_path, monkeypatch):
    folder = _fake_cifar(tmp_path, monkeypatch)
    s = build_stream(StreamConfig(name="split_cifar100", num_tasks=20, root=str(tmp_path), download=False), seed=1)
    assert s.class_order == [int(c) for c in np.random.RandomState(1).permutation(100)]
    assert [len(t.classes) for t in s.tasks] == [5] * 20
    t = s.tasks[4]
    assert t.train_x.shape[1:] == (3, 32, 32) and len(t.train_y) == 15 and len(t.test_y) == 5
    assert torch.equal(t.train_x[:, 0, 0, 0].long(), torch.tensor([s.class_order[y] for y in t.train_y.tolist()]))
    assert len(s.meta["split_sha256"]) == 64 and s.augment is not None
    with open(folder / "test", "ab") as f:
        f.write(b"x")
    with pytest.raises(ClbenchError, match=r"test has md5 .* \(corrupt\)"):
        build_stream(StreamConfig(name="split_cifar100", num_tasks=10, root=str(tmp_path)), seed=1)
    with pytest.raises(ClbenchError, match="CIFAR-100 not found"):
        build_stream(StreamConfig(name="split_cifar100", root=str(tmp_path / "none"), download=False), seed=1)


def test_random_resized_crop_flip_on_device():
    x = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = random_resized_crop_flip(x, 16, g)
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, random_resized_crop_flip(x, 16, torch.Generator().manual_seed(0)))
    # full-image "crops" at the input size reproduce the image or its mirror exactly
    x = torch.randint(0, 256, (16, 3, 20, 20), dtype=torch.uint8)
    full = random_resized_crop_flip(x, 20, torch.Generator().manual_seed(0), scale=(1.0, 1.0), flip_p=0.5)
    ref = x.float() / 255
    kinds = [torch.allclose(full[i], ref[i], atol=1e-5) or torch.allclose(full[i], ref[i].flip(-1), atol=1e-5)
             for i in range(16)]
    assert all(kinds)
    flipped = [torch.allclose(full[i], ref[i].flip(-1), atol=1e-5) for i in range(16)]
    assert 0 < sum(flipped) < 16  # both outcomes occur


def test_loop_applies_augment_to_training_batches_only():
    from clbench.data.batching import Draw, batches
    from clbench.testing import tiny_model

    calls = []

    def aug(x, size, gen):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], x.shape[1], size, size)

    model = tiny_model()
    x = torch.randint(0, 256, (10, 1, 16, 16), dtype=torch.uint8)
    y = torch.arange(10)
    plain = [b for b, _ in batches(x, y, 4, torch.device("cpu"), model)]
    assert not calls
    draw = Draw(shuffle=True, generator=torch.Generator().manual_seed(0), augment=aug)
    aug_b = [b for b, _ in batches(x, y, 4, torch.device("cpu"), model, draw)]
    assert calls == [4, 4, 2]
    assert not torch.allclose(plain[0], aug_b[0]) and torch.allclose(aug_b[0], model.preprocess(torch.zeros(4, 1, 16, 16)))


@pytest.mark.parametrize("suite", ["vit-imagenet-r.yaml", "vit-domainnet.yaml"])
def test_real_suites_validate(suite):
    s = load_suite(REPO / "suites" / suite)
    assert s.stream.name in ("imagenet_r", "domainnet")
    assert s.backbone.name == "vit_base_patch16_224.augreg_in21k" and s.backbone.image_size == 224
    from clbench.methods.registry import discover
    from clbench.run.runner import plan_runs

    planned = plan_runs(s, suite, discover([]), None)  # every method exists and its params validate
    assert {p.info.name for p in planned} >= {"lora", "inflora"}


def test_no_machine_paths_in_cache_keys():
    key = imagecache.cache_key("imagenet_r", "train", 256, "center", "ab" * 32)
    assert os.sep not in key and key.endswith("abababababababab")


def test_make_splits_reproduces_the_shipped_class_lists(imagenet_r_root, domainnet_root, tmp_path):
    from clbench.splits.make_splits import main

    out = tmp_path / "splits"
    main(["imagenet_r", "--root", str(imagenet_r_root), "--out", str(out)])
    main(["domainnet", "--root", str(domainnet_root), "--out", str(out)])
    shipped = splitfiles.pinned_sums()
    made = splitfiles.pinned_sums(out)
    for name in ("imagenet_r_classes.txt", "domainnet_classes.txt"):
        assert made[name] == shipped[name]  # the listings regenerate the pinned class files byte for byte
    assert splitfiles.pinned_split("imagenet_r", out).sha256 == made["imagenet_r_split.tsv.gz"]
