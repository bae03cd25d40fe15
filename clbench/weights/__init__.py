"""The identity of the backbone weights a run loads, and the pretrained tiny-ViT weights clbench ships.

Every run's suite hash covers the sha256 of the weights its backbone starts from (``weights_identity``), so runs
that start from different weights never share a leaderboard group or a checkpoint folder:

- ``vit_tiny_clbench`` at 16 px, one channel, ``pretrained: true`` (the quickstart's backbone): the file shipped
  in this folder, whose sha256 is pinned in ``SHA256SUMS``. The loader checks the file against the pin before every
  use and refuses a file that differs (one line saying so); it never reads weights from a cache. The file was made
  by ``python -m clbench.model.pretrain --write`` (one CPU thread, seed 0; see clbench/model/pretrain.py), which regenerates it.
- ``backbone.checkpoint``: the sha256 of that file.
- timm hub weights (``pretrained: true`` on a timm model): the sha256 of the weights file in the Hugging Face cache.
  The hub stores weights with Git LFS, and the cache names each LFS blob by its sha256, so the checksum is read from
  the blob's name (the file's content is hashed only when the name is not one). Before the file is downloaded its
  checksum is unknown: the identity says ``hub:<repo>/<file>, not downloaded`` and ``clbench run`` downloads the
  file before it computes the suite hash, so every recorded run carries the checksum of the file it loaded.
- ``pretrained: false`` without a checkpoint: ``random-init`` (the weights come from the run's seed).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from importlib import resources
from pathlib import Path

from clbench.errors import ClbenchError

# the tiny ViTs clbench ships pretrained weights for: (name, image size, input channels) -> file in this folder
SHIPPED = {("vit_tiny_clbench", 16, 1): "vit_tiny_clbench-digits-16px-1ch-e40.safetensors"}
REGENERATE = "python -m clbench.model.pretrain --write"
HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
RANDOM_INIT = "random-init"


def weights_dir() -> Path:
    return Path(str(resources.files("clbench.weights")))


@functools.lru_cache(maxsize=1)
def pinned_sums() -> dict[str, str]:
    """file name -> sha256, from this folder's SHA256SUMS (``sha256  name`` lines, as sha256sum writes them)."""
    path = weights_dir() / "SHA256SUMS"
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest
    return sums


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (cached per path, size and mtime)."""
    st = Path(path).stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_weights(name: str, image_size: int, in_chans: int) -> Path:
    """The shipped pretrained weights of a tiny ViT, checked against their pinned sha256; one line when clbench
    ships none for this shape, or when the file is missing or differs from the pin (never used then)."""
    fname = SHIPPED.get((name, image_size, in_chans))
    if fname is None:
        shipped = ", ".join(f"{n} at {s} px, {c} channel(s)" for n, s, c in SHIPPED)
        raise ClbenchError(
            f"backbone.pretrained: clbench ships pretrained weights only for {shipped}, not {name} at {image_size} "
            f"px, {in_chans} channel(s); pretrain them with `python -m clbench.model.pretrain --name {name} --image-size "
            f"{image_size} --in-chans {in_chans} --out FILE` and set backbone.checkpoint to FILE (its sha256 then "
            "enters the suite hash), or set backbone.pretrained: false")
    path = weights_dir() / fname
    pinned = pinned_sums().get(fname)
    if not path.is_file() or pinned is None:
        raise ClbenchError(f"{path}: the shipped weights or their pin in SHA256SUMS are missing; reinstall clbench "
                           f"or regenerate them with `{REGENERATE}`")
    actual = file_sha256(path)
    if actual != pinned:
        raise ClbenchError(f"{path}: sha256 {actual[:12]} is not the pinned {pinned[:12]} (SHA256SUMS); these are "
                           f"not clbench's weights, so they are not used: reinstall clbench or regenerate them with "
                           f"`{REGENERATE}`")
    return path


def hub_weights_file(hub_id: str) -> str | None:
    """Path of the hub weights file in the Hugging Face cache, or None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    for fname in HUB_FILES:
        found = try_to_load_from_cache(hub_id, fname)
        if isinstance(found, str):
            return found
    return None


def hub_sha256(path: str) -> str:
    """sha256 of a cached hub file: the name of its blob (an LFS object's name is its sha256), else hashed."""
    blob = os.path.basename(os.path.realpath(path))
    return blob if re.fullmatch(r"[0-9a-f]{64}", blob) else file_sha256(path)


def hub_id_of(name: str) -> str | None:
    """The Hugging Face repo timm loads ``name``'s pretrained weights from (None when timm hosts them elsewhere)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return hub_id.split("@")[0] if hub_id else None


def weights_identity(name: str, image_size: int, in_chans: int | None, pretrained: bool,
                     checkpoint: str | None) -> str:
    """The sha256 of the weights a backbone starts from (see the module's docstring), or what stands for it:
    ``random-init``, ``missing:<file>`` (a checkpoint that is not there; the run fails on it with its own line),
    ``hub:<repo>, not downloaded``, ``timm:<name>`` (timm hosts them outside the hub)."""
    if checkpoint:
        try:
            return file_sha256(checkpoint)
        except OSError:
            return "missing:" + Path(checkpoint).name
    if not pretrained:
        return RANDOM_INIT
    if name.startswith("hf:"):  # a language model (clbench.model.lm): a hub repo or a local folder
        return language_weights_identity(name[3:])
    if name.endswith("_clbench"):  # clbench's tiny ViTs: only the shipped weights are ever loaded
        fname = SHIPPED.get((name, image_size, in_chans or 1))
        return pinned_sums().get(fname, f"unshipped:{name}-{image_size}px-{in_chans or 1}ch")
    hub_id = hub_id_of(name)
    if hub_id is None:
        return f"timm:{name}"
    found = hub_weights_file(hub_id)
    return hub_sha256(found) if found else f"hub:{hub_id}, not downloaded"


def language_weights_files(hub_id: str) -> list[str] | None:
    """The weights files a language model ``hf:<hub_id>`` loads (a local folder's or the Hugging Face cache's; one
    file or every shard its index lists), or None when they are not all there."""
    import json

    folder = Path(hub_id)
    if folder.is_dir():
        for single, index in (("model.safetensors", "model.safetensors.index.json"),
                              ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            if (folder / single).is_file():
                return [str(folder / single)]
            if (folder / index).is_file():
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
                files = [folder / f for f in shards]
                return [str(f) for f in files] if all(f.is_file() for f in files) else None
        return None
    from huggingface_hub import try_to_load_from_cache

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        found = try_to_load_from_cache(hub_id, single)
        if isinstance(found, str):
            return [found]
        found = try_to_load_from_cache(hub_id, index)
        if isinstance(found, str):
            shards = sorted(set(json.loads(Path(found).read_text())["weight_map"].values()))
            files = [try_to_load_from_cache(hub_id, f) for f in shards]
            return [str(f) for f in files] if all(isinstance(f, str) for f in files) else None
    return None


def language_weights_identity(hub_id: str) -> str:
    """The sha256 of a language model's weights (a sharded model's: of its shards' sha256s, in order), or
    ``hub:<repo>, not downloaded`` / ``missing:<folder>``."""
    files = language_weights_files(hub_id)
    if files is None:
        return f"missing:{Path(hub_id).name}" if Path(hub_id).is_dir() else f"hub:{hub_id}, not downloaded"
    sums = [hub_sha256(f) for f in files]
    return sums[0] if len(sums) == 1 else hashlib.sha256(" ".join(sums).encode()).hexdigest()


def is_checksum(identity: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-f]{64}", identity))


def weights_line(identity: str) -> str:
    """How ``clbench run --dry-run`` shows the weights beside the suite hash: a checksum's first 12 hex digits."""
    return f"sha256 {identity[:12]}" if is_checksum(identity) else identity
