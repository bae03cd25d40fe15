"""``imagenet_r``: ImageNet-R (200 classes) from its image folder, with the pinned class list and split
(``clbench.data.datasets.imagenet_r``), decoded once into the memmap cache; downloads the archive when allowed."""

from __future__ import annotations

from clbench.data.registry import StreamSpec, register_stream


def build(cfg, seed: int, with_test: bool):
    from clbench.data.datasets import imagenet_r
    from clbench.data.streams import data_root, image_stream

    return image_stream(cfg, seed, with_test, imagenet_r.load(data_root(cfg), cfg.download))


def check(cfg) -> str | None:
    from clbench.data.datasets import download, imagenet_r
    from clbench.data.streams import data_root

    root = data_root(cfg)
    for cand in (root / "imagenet-r", root):
        if cand.is_dir() and any(p.name.startswith("n") and p.is_dir() for p in cand.iterdir()):
            return None
    if (root / "imagenet-r.tar").is_file() or (cfg.download and download.reachable(imagenet_r.URL)):
        return None
    why = "stream.download is false" if not cfg.download else "the download host cannot be reached"
    return f"stream.root: ImageNet-R not found under {root} ({why}); " + imagenet_r.how_to(root)


def class_names() -> list[str]:
    from clbench.data.datasets.splitfiles import class_list

    return class_list("imagenet_r")


register_stream(StreamSpec("imagenet_r", build, num_classes=200, check=check, augment="rrc_flip", images="cached",
                           downloads=True, class_names=class_names, coda_prompt_ids=True,
                           about="ImageNet-R, 200 classes, pinned 80/20 split, decoded once into the cache"))
