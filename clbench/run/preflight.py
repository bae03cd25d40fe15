"""Before a suite creates anything in MLflow: is every stream's data and every backbone's weights here, or can it
be downloaded now? Do the methods' params fit the backbone?

``clbench run`` calls :func:`preflight` after validating the suite and before the runner opens the store, so an
offline machine without CIFAR-100 or the ViT weights fails in seconds with one line and leaves no FAILED parent
run behind (and no "continuing suite run" on the retry). The checks are cheap: folders, the Hugging Face cache,
and a TCP connection to the download host; the real loading still verifies checksums later.

:func:`method_problems` (called by the runner right after planning, ``--dry-run`` included) checks each method
entry's validated params against the backbone's shape, read from a weightless copy on the meta device
(milliseconds, no download): a params field named ``blocks`` or ``*_blocks`` (a list of block indices) must name
blocks the backbone has, each once; a field named ``rank`` (the rank of each adapted map's low-rank update) must
not exceed ``min(d_in, d_out)`` of any map the entry adapts (``targets`` x ``blocks``), the largest rank such an
update can have; beyond it InfLoRA's and CL-LoRA's down-projections do not fit (a shape error after the run
started) and the other adapters spend parameters that cannot raise the rank. Plugins from elsewhere that use
these names get the same checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clbench.errors import ClbenchError


def stream_problem(cfg) -> str | None:
    """None when the stream's data is present or downloadable now, else what is missing and how to fix it: the
    stream's own check (``StreamSpec.check``, clbench.data.registry)."""
    from clbench.data.registry import stream_spec

    return stream_spec(cfg.name).check(cfg)


def split_problem(cfg) -> str | None:
    """None when ``num_tasks`` divides the stream's classes (or the count is only known once loaded)."""
    from clbench.data.registry import stream_spec

    classes = stream_spec(cfg.name).classes(cfg)
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
    from clbench.model.backbones import TINY
    from clbench.model.lm import HF_PREFIX, LM_TINY, hub_available, is_language_backbone, require_transformers

    if is_language_backbone(cfg.name):  # clbench.model.lm: the extra installed, a hub model cached or reachable
        try:
            require_transformers(cfg.name)
            if cfg.name in LM_TINY and cfg.pretrained:
                return (f"backbone.pretrained: {cfg.name} has no pretrained weights (built from a config, random "
                        "weights from the run's seed); set backbone.pretrained: false")
            if cfg.name.startswith(HF_PREFIX):
                hub_available(cfg.name[len(HF_PREFIX):])
        except ClbenchError as exc:
            return str(exc)
        return None
    if cfg.name not in TINY:
        import timm

        if cfg.name not in timm.list_models() and cfg.name.split(".")[0] not in timm.list_models():
            close = timm.list_models(f"*{cfg.name.split('_')[0]}*")[:8]
            return f"backbone.name: unknown timm model '{cfg.name}'; close matches: {close}"
    if cfg.checkpoint is not None:
        return checkpoint_problem(Path(cfg.checkpoint))
    if not cfg.pretrained:
        return None
    if cfg.name in TINY:  # the shipped weights: present, of this shape, and the pinned bytes
        from clbench.weights import shipped_weights

        try:
            shipped_weights(cfg.name, cfg.image_size, cfg.in_chans or 1)
        except ClbenchError as exc:
            return str(exc)
        return None
    from clbench.model.backbones import _pretrained_available

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


def skeleton(cfg) -> Any | None:
    """The backbone's modules without weights (meta device): depth and map widths, no download, no memory. None
    when it cannot be built here (an unknown name: the backbone checks report that)."""
    import torch

    try:
        with torch.device("meta"):
            from clbench.model.backbones import TINY

            if cfg.name in TINY:
                from timm.models.vision_transformer import VisionTransformer

                return VisionTransformer(img_size=cfg.image_size, in_chans=cfg.in_chans or 1, num_classes=0,
                                         **TINY[cfg.name])
            import timm

            kwargs = {"in_chans": cfg.in_chans} if cfg.in_chans else {}
            return timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    except Exception:  # noqa: BLE001 - not a ViT clbench can shape-check; the run reports its own errors
        return None


def _block_fields(params) -> dict[str, list[int]]:
    """The params' lists of block indices: fields named ``blocks`` or ``*_blocks`` holding a list of ints."""
    out = {}
    for name in type(params).model_fields:
        value = getattr(params, name, None)
        if (name == "blocks" or name.endswith("_blocks")) and isinstance(value, list) and all(
                isinstance(b, int) for b in value):
            out[name] = value
    return out


def _blocks_problem(params, depth: int) -> str | None:
    for name, blocks in _block_fields(params).items():
        bad = [b for b in blocks if not 0 <= b < depth]
        if bad:
            return (f"params.{name}: block {bad[0]} does not exist; the backbone has {depth} blocks, numbered "
                    f"0..{depth - 1}")
        twice = sorted({b for b in blocks if blocks.count(b) > 1})
        if twice:
            return f"params.{name}: block(s) {twice} listed twice; list each block once"
    return None


def _narrowest_site(backbone, targets: tuple[str, ...], blocks: tuple[int, ...] | None,
                    cache: dict) -> tuple[str, int, int] | None:
    """(name, d_out, d_in) of the narrowest map ``targets`` x ``blocks`` adapts, once per distinct pair (a
    copy of the skeleton is injected for each: a 10,000-entry suite repeats a handful of pairs)."""
    import copy

    from clbench.model.lora import inject

    if (targets, blocks) not in cache:
        sites = inject(copy.deepcopy(backbone), list(targets), list(blocks) if blocks is not None else None)
        narrow = min(sites.items(), key=lambda kv: min(kv[1].d_in, kv[1].d_out)) if sites else None
        cache[(targets, blocks)] = (narrow[0], narrow[1].d_out, narrow[1].d_in) if narrow else None
    return cache[(targets, blocks)]


def _rank_problem(params, backbone, cache: dict) -> str | None:
    """``rank`` above the smallest ``min(d_in, d_out)`` of the maps the entry adapts."""
    from clbench.model.lora import TARGETS

    rank = getattr(params, "rank", None)
    if not isinstance(rank, int) or getattr(params, "trainable", "lora") != "lora":
        return None  # no rank, or a method that trains the backbone itself (ER / joint with trainable: full)
    targets = [t for t in (getattr(params, "targets", None) or ["q", "v"]) if t in TARGETS] or ["q", "v"]
    blocks = getattr(params, "blocks", None)
    narrow = _narrowest_site(backbone, tuple(targets), tuple(blocks) if isinstance(blocks, list) else None, cache)
    if narrow is None:
        return None
    name, d_out, d_in = narrow
    limit = min(d_in, d_out)
    if rank <= limit:
        return None
    return (f"params.rank: {rank} exceeds what the adapted maps can hold: {name} is {d_out} x {d_in}, "
            f"so a low-rank update of it has rank at most {limit}; choose rank <= {limit}")


def method_problems(suite, planned, source: str) -> None:
    """Raise one :class:`ClbenchError` for the first method entry whose params do not fit the backbone (block
    indices it lacks, a rank above its maps' width), naming the entry's key path; before any run exists."""
    if not planned:
        return
    backbone = skeleton(suite.backbone)
    blocks = getattr(backbone, "blocks", None)
    if backbone is None or blocks is None:
        return
    cache: dict = {}
    for run in planned:
        entry = suite.methods[run.entry_index]
        where, prefix = entry.source_and_prefix(source, run.entry_index)
        problem = _blocks_problem(run.params, len(blocks)) or _rank_problem(run.params, backbone, cache)
        if problem:
            flag = entry.blame(("params", problem.removeprefix("params.").split(":", 1)[0]))
            raise ClbenchError(f"{flag or where}: {prefix}{problem} (backbone {suite.backbone.name}; checked before "
                               "creating any MLflow run)")


def preflight(suite) -> None:
    """Raise one :class:`ClbenchError` naming everything the suite needs but cannot get (data, weights)."""
    problems = [p for p in (device_problem(suite), split_problem(suite.stream), stream_problem(suite.stream),
                            backbone_problem(suite.backbone)) if p]
    if problems:
        raise ClbenchError("; ".join(problems) + " (checked before creating any MLflow run)")
