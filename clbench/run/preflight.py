"""Before a suite creates anything in MLflow: is every stream's data and every backbone's weights here, or can it
be downloaded now? Do the methods' params fit the backbone?

``clbench run`` calls :func:`preflight` after validating the suite and before the runner opens the store, so an
offline machine without CIFAR-100 or the ViT weights fails in seconds with one line and leaves no FAILED parent
run behind (and no "continuing suite run" on the retry). The checks are cheap: folders, the Hugging Face cache,
and a TCP connection to the download host; the real loading still verifies checksums later.

:func:`method_problems` (called by the runner right after planning, ``--dry-run`` included) asks each method
entry's validated params whether they fit the backbone (``check_against(backbone)``, ``clbench.model.fit``: the
params model declares its checks; one that declares none gets the checks by field name, ``blocks`` / ``*_blocks``
and ``rank``), with the backbone's shape read from a weightless copy on the meta device (milliseconds, no
download), and names the first problem's key path.
"""

from __future__ import annotations

from pathlib import Path

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


def method_problems(suite, planned, source: str) -> None:
    """Raise one :class:`ClbenchError` for the first method entry that cannot run on the suite's kind of backbone
    (its class's ``backbones``, ``clbench.Method``) or whose params do not fit the backbone, naming the entry's key
    path; before any run exists. The params say what to check (``check_against``,
    ``clbench.model.fit``): block indices the backbone lacks, a rank above its maps' width."""
    if not planned:
        return
    from clbench.methods.method import backbone_refusal
    from clbench.model.fit import backbone_facts, check_params
    from clbench.model.lm import backbone_kind

    kind = backbone_kind(suite.backbone.name)
    for run in planned:  # a method that cannot run on this kind of backbone (``Method.backbones``)
        refusal = backbone_refusal(run.info.cls, kind)
        if refusal:
            entry = suite.methods[run.entry_index]
            where, prefix = entry.source_and_prefix(source, run.entry_index)
            raise ClbenchError(f"{where}: {prefix}name: method '{run.info.name}' {refusal} (backbone "
                               f"{suite.backbone.name}); remove the entry or choose a method that runs on it "
                               "(clbench methods NAME says which backbones; checked before creating any MLflow run)")
    backbone = backbone_facts(suite.backbone)
    if backbone is None:
        return
    for run in planned:
        problems = check_params(run.params, backbone)
        if problems:
            entry = suite.methods[run.entry_index]
            where, prefix = entry.source_and_prefix(source, run.entry_index)
            flag = entry.blame(("params", problems[0].split(":", 1)[0]))
            raise ClbenchError(f"{flag or where}: {prefix}params.{problems[0]} (backbone {suite.backbone.name}; "
                               "checked before creating any MLflow run)")


def preflight(suite) -> None:
    """Raise one :class:`ClbenchError` naming everything the suite needs but cannot get (data, weights)."""
    problems = [p for p in (device_problem(suite), split_problem(suite.stream), stream_problem(suite.stream),
                            backbone_problem(suite.backbone)) if p]
    if problems:
        raise ClbenchError("; ".join(problems) + " (checked before creating any MLflow run)")
