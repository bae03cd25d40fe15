"""The effective protocol of a suite, as a user compares it with a paper (``clbench protocol SUITE``).

Everything here is computed by the functions the training loop itself uses, never re-derived: the optimizer from
``make_task_optimizer``, the learning rate of every parameter group in every epoch by stepping the loop's
``Schedule`` as ``train_task`` does, the class order from ``class_order_for``, the training augmentation and test
transform from the stream builder's ``_with_augment`` and the model's ``preprocess`` (normalisation), applied to
an image. The conformance test (tests/test_conformance.py) compares this with fixtures recorded by running the
official repositories' code (benchmarks/conformance/).
"""

from __future__ import annotations

import functools
import hashlib
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from clbench.data.registry import stream_spec
from clbench.suite import Suite, TrainConfig

GROUPS = ("adapters", "head")


def synthetic_image(seed: int = 0, width: int = 500, height: int = 375) -> np.ndarray:
    """The conformance image: seeded uniform RGB noise, ``height x width x 3`` uint8 (500 x 375 by default)."""
    return np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)


def lr_per_epoch(cfg: TrainConfig, steps_per_epoch: int = 4) -> dict[str, list[float]]:
    """Each parameter group's learning rate at the start of every epoch of a task (what ``train/lr`` logs), by the
    loop's own optimizer and schedule stepped as ``train_task`` steps them."""
    from clbench.run.loop import make_task_optimizer

    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "name": "adapters"}]
    head = torch.nn.Linear(1, 1)
    ctx = SimpleNamespace(steps_per_epoch=steps_per_epoch)
    optimizer, schedule = make_task_optimizer(None, head, groups, cfg, ctx)  # type: ignore[arg-type]
    out: dict[str, list[float]] = {g["name"]: [] for g in optimizer.param_groups}
    for _ in range(cfg.epochs):
        for g in optimizer.param_groups:
            out[g["name"]].append(float(g["lr"]))
        for _ in range(steps_per_epoch):
            if schedule is not None:
                schedule.step()
        if schedule is not None:
            schedule.epoch_end()
    return out


def optimizer_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The optimizer's class and its hyperparameters as the loop builds it (first group's defaults)."""
    from clbench.run.loop import make_task_optimizer

    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "name": "adapters"}]
    optimizer, _ = make_task_optimizer(None, torch.nn.Linear(1, 1), groups, cfg,  # type: ignore[arg-type]
                                       SimpleNamespace(steps_per_epoch=1))
    keep = ("lr", "momentum", "betas", "weight_decay", "dampening", "nesterov", "eps", "amsgrad")
    d = optimizer.defaults
    return {"class": type(optimizer).__name__, **{k: (list(d[k]) if isinstance(d[k], tuple) else d[k])
                                                  for k in keep if k in d}}


def class_orders(suite: Suite) -> dict[int, list[int]] | None:
    """The class order (original class ids in stream order) of every seed of the suite; None where the number of
    classes is known only from the data (synthetic streams)."""
    from clbench.data.streams import class_order_for

    n = stream_spec(suite.stream.name).classes(suite.stream)
    if n is None:
        return None
    s = suite.stream
    return {seed: class_order_for(n, seed, s.shuffle_classes, s.class_order, s.name) for seed in suite.seeds}


def class_names(stream_name: str) -> list[str] | None:
    """clbench's class id -> name (wnid / DomainNet class) for the file-based streams; None for the others."""
    names = stream_spec(stream_name).class_names
    return names() if names is not None else None


def _model(suite: Suite):
    bb = suite.backbone
    return _built(bb.name, bb.image_size, bb.in_chans, bb.normalize)


@functools.lru_cache(maxsize=8)
def _built(name: str, image_size: int, in_chans: int | None, normalize: str):
    """The suite's model as the runner builds it (random weights: only ``preprocess`` is used), cached per
    backbone setting (a ViT-B takes seconds to initialise; the repro suites share three)."""
    from clbench.model.backbones import Arch, build_model

    return build_model(name, image_size, pretrained=False, checkpoint=None,
                       arch=Arch(in_chans=in_chans, normalize=normalize))


def _stream_transforms(suite: Suite):
    from clbench.data.streams import Stream, _with_augment

    return _with_augment(Stream(suite.stream.name, [], []), suite.stream)


def transforms_of(suite: Suite, image: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The train and test inputs the backbone receives for ``image`` (``H x W x 3`` uint8) under this suite, by
    clbench's own path: for imagenet_r/domainnet the cache's decoding (``imagecache.decode_image``), for in-memory
    streams the image as stored; then the stream's device augmentation (train, generator seeded with ``seed``) or
    test transform, then the model's ``preprocess`` (resize, normalisation)."""
    from clbench.data.imagecache import decode_image

    model, stream = _model(suite), _stream_transforms(suite)
    size = suite.backbone.image_size
    res = suite.stream.resolution
    if stream_spec(suite.stream.name).images == "cached":
        with tempfile.TemporaryDirectory() as tmp:
            from PIL import Image

            path = Path(tmp) / "image.png"
            Image.fromarray(image).save(path)
            train_raw = decode_image(path, int(round(res * 256 / 224)), "center")
            test_raw = decode_image(path, res, "resize_center")
        train_x = torch.from_numpy(np.ascontiguousarray(train_raw))[None]
        test_x = torch.from_numpy(np.ascontiguousarray(test_raw))[None]
    else:
        train_x = test_x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        train = stream.augment(train_x, size, g) if stream.augment is not None else train_x
        test = stream.test_transform(test_x, size, None) if stream.test_transform is not None else test_x
        train, test = model.preprocess(train)[0], model.preprocess(test)[0]
    augment = stream.augment
    scale = getattr(augment, "keywords", {}).get("scale", (0.08, 1.0)) if augment is not None else None
    return {"train": train, "test": test,
            "train_augment": {"kind": stream.meta.get("augment"), "scale": list(scale) if scale else None,
                              "ratio": [3 / 4, 4 / 3] if augment is not None else None,
                              "flip_p": 0.5 if augment is not None else None},
            "test_transform": _describe_test(suite),
            "normalize": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}}


def _describe_test(suite: Suite) -> str:
    s = suite.stream
    if stream_spec(s.name).images == "cached":
        return f"Resize({int(round(s.resolution * 256 / 224))}) + CenterCrop({s.resolution}) (cache, PIL bilinear)"
    if s.test_transform == "resize_center_crop":
        big = int(suite.backbone.image_size * 256 / 224)
        return f"Resize({big}, bicubic) + CenterCrop({suite.backbone.image_size}) (device)"
    return f"Resize({suite.backbone.image_size}) of the whole image (device, bilinear)"


def tensor_summary(x: torch.Tensor) -> dict[str, Any]:
    """Shape, per-channel mean/std, min/max, a sha256 of the float32 bytes rounded to 1e-4 and a 3 x 3 slice."""
    x = x.detach().float()
    rounded = np.round(x.numpy().astype(np.float64), 4).astype(np.float32)
    return {"shape": list(x.shape), "mean": [round(float(v), 5) for v in x.mean((1, 2))],
            "std": [round(float(v), 5) for v in x.std((1, 2))], "min": round(float(x.min()), 5),
            "max": round(float(x.max()), 5), "sha256": hashlib.sha256(rounded.tobytes()).hexdigest()[:16],
            "slice": [[round(float(v), 4) for v in row] for row in x[0, :3, :3]]}


def effective_protocol(suite: Suite, entry: int = 0, image_seed: int = 0) -> dict[str, Any]:
    """The protocol of method entry ``entry`` of ``suite`` (its ``train`` overrides applied), as a dict."""
    from clbench.model.lm import is_language_backbone

    cfg = suite.train_for(suite.methods[entry])
    if is_language_backbone(suite.backbone.name):  # text: no image path (the language model tokenizes the rows)
        tf = {"normalize": None, "train_augment": None, "test_transform": "text, tokenized by the language model",
              "train": None, "test": None}
    else:
        image = synthetic_image(image_seed)
        stored = stream_spec(suite.stream.name).stored_size
        if stored is not None:
            image = image[:stored, :stored]  # CIFAR's images are 32 x 32: the synthetic image's top-left corner
        tf = transforms_of(suite, image)
    return {"suite": suite.name, "hash": suite.protocol_hash(), "method": suite.methods[entry].display,
            "stream": suite.stream.name, "num_tasks": suite.stream.num_tasks, "seeds": list(suite.seeds),
            "epochs": cfg.epochs, "lr_per_epoch": lr_per_epoch(cfg), "schedule": cfg.schedule,
            "optimizer": optimizer_settings(cfg), "batch_size": cfg.batch_size, "drop_last": cfg.drop_last,
            "precision": cfg.precision, "head_init": cfg.head_init, "normalize": tf["normalize"],
            "train_augment": tf["train_augment"], "test_transform": tf["test_transform"],
            "train_output": tensor_summary(tf["train"]) if tf["train"] is not None else None,
            "test_output": tensor_summary(tf["test"]) if tf["test"] is not None else None,
            "class_order": class_orders(suite), "class_names": class_names(suite.stream.name)}


def protocol_lines(p: dict[str, Any], tasks_shown: int = 2) -> list[str]:
    """The protocol as text, one setting a line."""
    opt = p["optimizer"]
    hyper = ", ".join(f"{k} {v}" for k, v in opt.items() if k != "class")
    lines = [f"suite {p['suite']} (hash {p['hash']}), method entry {p['method']}",
             f"stream      {p['stream']}, {p['num_tasks']} tasks, seeds {p['seeds']}",
             f"optimizer   {opt['class']}: {hyper}",
             f"schedule    {p['schedule']}, {p['epochs']} epochs"]
    for name, lrs in p["lr_per_epoch"].items():
        shown = ", ".join(f"{v:.4g}" for v in lrs[:12]) + (", ..." if len(lrs) > 12 else "")
        lines.append(f"  lr[{name}] per epoch: {shown}")
    lines += [f"batch       {p['batch_size']}, drop_last {p['drop_last']}",
              f"precision   {p['precision']}"]
    if p["normalize"] is None:  # a language model: text in, no image path
        lines.append(f"input       {p['test_transform']}")
        return lines
    lines += [f"normalise   mean {_fmt(p['normalize']['mean'])}, std {_fmt(p['normalize']['std'])}"
              + ("  (inputs in [0, 1])" if set(p["normalize"]["mean"]) == {0.0} and
                 set(p["normalize"]["std"]) == {1.0} else ""),
              f"head init   {p['head_init']}"]
    aug = p["train_augment"]
    lines.append("train       " + ("no augmentation" if aug["kind"] in (None, "none") else
                                   f"RandomResizedCrop scale {_fmt(aug['scale'])} ratio {_fmt(aug['ratio'])} + "
                                   f"horizontal flip p {aug['flip_p']} (device)"))
    lines.append(f"test        {p['test_transform']}")
    for name, key in (("train input", "train_output"), ("test input", "test_output")):
        o = p[key]
        lines.append(f"  {name} of the synthetic image: shape {o['shape']}, mean {_fmt(o['mean'])}, "
                     f"range [{o['min']:.3f}, {o['max']:.3f}]")
    orders, names = p["class_order"], p["class_names"]
    if orders:
        per_task = len(next(iter(orders.values()))) // p["num_tasks"]
        for seed, order in orders.items():
            tasks = [order[i * per_task:(i + 1) * per_task] for i in range(min(tasks_shown, p["num_tasks"]))]
            shown = "; ".join(" ".join(names[c] if names else str(c) for c in t) for t in tasks)
            lines.append(f"classes     seed {seed}: {shown}" + (" ..." if p["num_tasks"] > tasks_shown else ""))
    return lines


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else str(v)
                           for v in values) + "]"


class _Enough(Exception):
    """Ends the counting run after the tasks it needs."""


def trainable_params(suite: Suite, source: str, entry: int = 0, tasks: int = 2, images: int = 2) -> list[int]:
    """The trainable parameters the loop reports (``TaskResult.trainable_params``: every parameter of the
    optimizer's groups) for the first ``tasks`` tasks of method entry ``entry``: the real loop (``run_stream``)
    with the suite's backbone (random weights) and method on a placeholder stream of the suite's task sizes
    (``images`` random 32 x 32 images per task), one step per task on the CPU."""
    from clbench.data.streams import Stream, TaskData
    from clbench.methods.registry import discover, run_manager
    from clbench.model.backbones import Arch, build_model
    from clbench.run.loop import LoopOptions, run_stream
    from clbench.run.plan import plan_runs

    run = plan_runs(suite, source, discover([suite.plugins_dir] if suite.plugins_dir else []), None)[entry]
    cfg = suite.train_for(suite.methods[entry]).model_copy(update={"epochs": 1, "max_steps_per_epoch": 1,
                                                                   "precision": "fp32", "drop_last": False})
    n = stream_spec(suite.stream.name).classes(suite.stream) or 10
    per = n // suite.stream.num_tasks
    g = torch.Generator().manual_seed(0)
    tasks_data = []
    for t in range(suite.stream.num_tasks):
        x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.arange(images) % per + t * per
        tasks_data.append(TaskData(tuple(range(t * per, (t + 1) * per)), x, y, x, y))
    bb = suite.backbone
    torch.manual_seed(0)
    model = build_model(bb.name, bb.image_size, pretrained=False, checkpoint=None,
                        arch=Arch(in_chans=bb.in_chans, normalize=bb.normalize))
    counts: list[int] = []

    def on_task(result, state, model) -> None:
        counts.append(int(result.trainable_params))
        if len(counts) >= tasks:
            raise _Enough

    try:
        run_stream(model, Stream(suite.stream.name, tasks_data, list(range(n))), run_manager(run.info.cls(run.params)),
                   cfg, suite.seeds[0], LoopOptions(on_task=on_task))
    except _Enough:
        pass
    return counts
