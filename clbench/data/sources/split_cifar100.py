"""``split_cifar100``: Avalanche's classic ``SplitCIFAR100`` over the official CIFAR-100 archive (100 classes, 32 px),
downloaded into the data root on a connected machine; offline without the files it fails at once with one line."""

from __future__ import annotations

from urllib.parse import urlparse

from clbench.data.registry import StreamSpec, register_stream
from clbench.errors import ClbenchError

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"  # torchvision's CIFAR100.url


def build(cfg, seed: int, with_test: bool):
    import socket

    from avalanche.benchmarks.classic import SplitCIFAR100
    from torchvision import transforms

    from clbench.data.datasets import cifar100
    from clbench.data.streams import class_order_for, data_root, materialise, split_tasks

    root = cifar100.folder(data_root(cfg), explicit_root=cfg.root is not None)
    split_tasks(100, cfg.num_tasks)
    order = class_order_for(100, seed, cfg.shuffle_classes, cfg.class_order, cfg.name)
    split_sha = cifar100.verify(root, cfg.download)
    to_uint8 = transforms.PILToTensor()
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a download over a dead network fails instead of hanging
    try:
        bm = SplitCIFAR100(n_experiences=cfg.num_tasks, fixed_class_order=order, dataset_root=str(root),
                           train_transform=to_uint8, eval_transform=to_uint8)
    except Exception as exc:  # noqa: BLE001 - network and file errors all mean "data not available"
        raise ClbenchError(
            f"stream.root: CIFAR-100 is not under {root} and could not be downloaded ({type(exc).__name__}); "
            "connect to the internet once, or put cifar-100-python/ there, or set stream.root / CLBENCH_DATA"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    stream = materialise("split_cifar100", bm.train_stream, bm.test_stream, order, with_test)
    if split_sha is None:  # downloaded just now: torchvision verified the archive's md5
        split_sha = cifar100.verify(root, False)
    stream.meta.update(split_sha256=split_sha, split_source="official:cifar-100-python")
    return stream


def check(cfg) -> str | None:
    from clbench.data.datasets import download
    from clbench.data.streams import data_root

    root = data_root(cfg)
    if (root / "cifar-100-python").is_dir() or (root / "cifar100" / "cifar-100-python").is_dir():
        return None
    if not cfg.download:
        return (f"stream.root: CIFAR-100 not found under {root} (no cifar-100-python/) and stream.download is "
                "false; put cifar-100-python/ there or allow the download")
    if not download.reachable(URL):
        return (f"stream.root: CIFAR-100 is not under {root} and {urlparse(URL).hostname} cannot be "
                "reached; connect to the internet once, or put cifar-100-python/ there, or set stream.root / "
                "CLBENCH_DATA")
    return None


register_stream(StreamSpec("split_cifar100", build, num_classes=100, check=check, augment="rrc_flip",
                           downloads=True, stored_size=32, coda_prompt_ids=True,
                           about="CIFAR-100 (official archive, 32 px) through Avalanche's SplitCIFAR100"))
