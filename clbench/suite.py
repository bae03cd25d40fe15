"""The suite schema (pydantic, unknown keys rejected) and ``load_suite(path, overrides)``.

A suite names a continual stream, a backbone, the shared training protocol and the methods to compare.
Every error a user can make is turned into one :class:`ClbenchError` line naming the file and key path.
Relative paths inside a suite resolve against the suite file's folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from clbench.errors import ClbenchError

# The streams clbench can build (clbench.streams.build_stream has one branch per name).
STREAM_NAMES = ("split_cifar100", "mnist5k", "digits", "synthetic", "imagenet_r", "domainnet")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StreamConfig(Strict):
    name: str = Field(description="benchmark name: " + ", ".join(STREAM_NAMES))
    num_tasks: int = Field(5, ge=1, le=1000, description="number of tasks (must divide the classes)")
    class_order: list[int] | None = Field(None, description="explicit class order; else from the seed")
    shuffle_classes: bool = Field(True, description="permute the class order with the run's seed")
    root: str | None = Field(None, description="data root (default: $CLBENCH_DATA or the cache folder)")
    num_classes: int | None = Field(None, ge=2, description="synthetic stream only: number of classes")
    samples_per_class: int = Field(60, ge=1, description="synthetic stream only: training samples per class")
    resolution: int = Field(224, ge=8, le=1024, description="imagenet_r/domainnet: cached test image size "
                            "(Resize(r*256/224)+CenterCrop(r)); training images are cached at r*256/224")
    augment: Literal["auto", "none", "rrc_flip"] = Field(
        "auto", description="training augmentation on the device; auto = rrc_flip (random resized crop + flip, "
                            "as InfLoRA) for split_cifar100/imagenet_r/domainnet, none otherwise")
    cache: bool = Field(True, description="imagenet_r/domainnet: decode once into a uint8 memmap in the cache folder")
    download: bool = Field(True, description="download missing data where the hosting allows (CIFAR-100, ImageNet-R)")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in STREAM_NAMES:
            raise ValueError(f"unknown stream '{v}'; choose from {list(STREAM_NAMES)}")
        return v


class BackboneConfig(Strict):
    name: str = Field(description="timm model name, or vit_tiny_clbench / vit_micro_clbench for CPU")
    pretrained: bool = Field(True, description="load pretrained weights (hub cache, or clbench's cached "
                                               "pretraining for the tiny ViTs)")
    checkpoint: str | None = Field(None, description="local weights file (state dict or .safetensors)")
    image_size: int = Field(224, ge=8, le=1024)
    in_chans: int | None = Field(None, ge=1, le=4)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)


class TrainConfig(Strict):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = Field(False, description="torch.compile the backbone (CUDA)")
    log_every: int = Field(25, ge=1, description="read the loss back from the device every N steps")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap steps per epoch (smoke tests)")
    cpu_threads: int | None = Field(None, ge=1, le=512, description="torch threads when training on the CPU "
                                    "(default: torch's choice; tiny models run fastest on 1)")


class MethodEntry(Strict):
    name: str
    label: str | None = Field(None, description="display name (defaults to name); distinguishes ablations")
    params: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the suite's train settings")

    # where the entry came from when not the suite file (``--add-method ...``); not part of the suite's data
    _origin: str | None = PrivateAttr(None)

    @property
    def display(self) -> str:
        return self.label or self.name

    def source_and_prefix(self, path: str, index: int) -> tuple[str, str]:
        """What an error about this entry names: the suite file and ``methods.<index>.``, or the flag that added
        it (and no prefix)."""
        return (self._origin, "") if self._origin else (path, f"methods.{index}.")


class TrackingConfig(Strict):
    experiment: str | None = Field(None, description="MLflow experiment (default: the suite name)")
    uri: str | None = Field(None, description="tracking URI (default: $MLFLOW_TRACKING_URI or MLflow's default)")


class Suite(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    stream: StreamConfig
    backbone: BackboneConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    methods: list[MethodEntry] = Field(min_length=1)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    plugins_dir: str | None = None

    @model_validator(mode="after")
    def _unique_labels(self) -> Suite:
        labels = [m.display for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"methods: duplicate method label(s) {dup}; give each entry a distinct 'label'")
        return self

    def protocol_hash(self) -> str:
        """Hash of what makes runs comparable (stream, backbone, training protocol), not of the methods."""
        blob = json.dumps({k: getattr(self, k).model_dump() for k in ("stream", "backbone", "train")},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def train_for(self, entry: MethodEntry) -> TrainConfig:
        return TrainConfig(**{**self.train.model_dump(), **entry.train})


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def format_validation_error(source: str, err: ValidationError, prefix: str = "", drop: int = 0) -> str:
    """One line for pydantic's errors (the first three), each located by its key path (``drop`` leading parts
    left out, e.g. ``methods.4`` for an ``--add-method`` entry)."""
    parts = []
    for e in err.errors()[:3]:
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        parts.append(f"{prefix}{_loc(e['loc'][drop:])}: {msg}")
    more = f" (+{len(err.errors()) - 3} more)" if len(err.errors()) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more


def apply_override(data: dict, assignment: str, source: str) -> tuple:
    """Apply ``key.path=value`` (value parsed as YAML) to the raw suite mapping; return the key path it set,
    list entries as indices (so a validation error at that path can name the ``--set`` flag)."""
    if "=" not in assignment:
        raise ClbenchError(f"--set {assignment}: expected key.path=value")
    path, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    keys = path.strip().split(".")
    node: Any = data
    resolved: list = []
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            idx = _list_index(node, key, path)
            resolved.append(idx)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            resolved.append(key)
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ClbenchError(f"--set {assignment}: '{'.'.join(keys[:i])}' is not a mapping or list")
    return tuple(resolved)


def _set_flag(overrides: dict[tuple, str], loc: tuple) -> str | None:
    """The ``--set`` that wrote the key at ``loc`` (or a mapping above it), the last one when several did."""
    if not loc:  # a whole-suite check (e.g. duplicate labels): not attributable to one key
        return None
    hits = [a for path, a in overrides.items() if loc[:len(path)] == path or path[:len(loc)] == loc]
    return hits[-1] if hits else None


def _list_index(node: list, key: str, path: str) -> int:
    if key.isdigit() and int(key) < len(node):
        return int(key)
    for i, item in enumerate(node):  # methods.<label>.params.x addresses a method entry by label or name
        if isinstance(item, dict) and key in (item.get("label"), item.get("name")):
            return i
    raise ClbenchError(f"--set {path}: no list entry '{key}'")


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ClbenchError(f"{path}: suite file not found") from None
    except OSError as exc:
        raise ClbenchError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise ClbenchError(f"{path}: {where}{problem}; fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise ClbenchError(f"{path}: a suite must be a YAML mapping with name, stream, backbone and methods")
    return data


def _resolve_paths(suite: Suite, base: Path) -> None:
    def absolute(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    suite.stream.root = absolute(suite.stream.root)
    suite.backbone.checkpoint = absolute(suite.backbone.checkpoint)
    suite.plugins_dir = absolute(suite.plugins_dir)


ADD_METHOD_EXAMPLE = "--add-method '{name: lora, label: lora-r8, params: {rank: 8}}'"


def add_method(data: dict, raw: str) -> None:
    """Append one ``--add-method`` entry (a method entry in flow YAML) to the raw suite mapping's methods."""
    flag = f"--add-method {raw}"
    try:
        entry = yaml.safe_load(raw)
    except yaml.YAMLError:
        entry = None
    if not isinstance(entry, dict):
        raise ClbenchError(f"{flag}: expected a method entry in flow YAML, e.g. {ADD_METHOD_EXAMPLE}")
    methods = data.get("methods")
    if not isinstance(methods, list):
        raise ClbenchError(f"{flag}: the suite's 'methods' is not a list")
    label = entry.get("label") or entry.get("name")
    taken = {m.get("label") or m.get("name") for m in methods if isinstance(m, dict)}
    if label in taken:
        raise ClbenchError(f"{flag}: the suite already has a method labelled '{label}'; give the added entry a "
                           f"distinct label, e.g. {{name: {entry.get('name')}, label: {label}-2, ...}}")
    methods.append(entry)


def load_suite(path: str | Path, overrides: list[str] | None = None, added: list[str] | None = None) -> Suite:
    """Read, override and validate a suite file, with ``added`` method entries (``--add-method``, flow YAML)
    appended to its methods; raise ClbenchError with one line on any problem."""
    path = Path(path)
    data = read_yaml(path)
    set_paths: dict[tuple, str] = {}
    for assignment in overrides or []:
        set_paths[apply_override(data, assignment, str(path))] = assignment
    added = list(added or [])
    first_added = len(data["methods"]) if isinstance(data.get("methods"), list) else 0
    for raw in added:
        add_method(data, raw)
    try:
        suite = Suite.model_validate(data)
    except ValidationError as err:
        loc = err.errors()[0]["loc"]
        if added and loc[:1] == ("methods",) and len(loc) > 1 and isinstance(loc[1], int) and loc[1] >= first_added:
            raise ClbenchError(format_validation_error(f"--add-method {added[loc[1] - first_added]}", err,
                                                       drop=2)) from None
        flag = _set_flag(set_paths, tuple(loc))
        raise ClbenchError(format_validation_error(f"--set {flag}" if flag else str(path), err)) from None
    for raw, entry in zip(added, suite.methods[first_added:]):
        entry._origin = f"--add-method {raw}"
    for i, entry in enumerate(suite.methods):
        source, prefix = entry.source_and_prefix(str(path), i)
        try:
            suite.train_for(entry)
        except ValidationError as err:
            flag = _set_flag(set_paths, ("methods", i, "train", *err.errors()[0]["loc"]))
            source = f"--set {flag}" if flag else source
            raise ClbenchError(format_validation_error(source, err, prefix=f"{prefix}train.")) from None
    _resolve_paths(suite, path.resolve().parent)
    return suite
