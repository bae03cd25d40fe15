"""The suite schema (pydantic, unknown keys rejected) and ``load_suite(path, overrides)``.

A suite names a continual stream, a backbone, the shared training protocol and the methods to compare.
Every error a user can make is turned into one :class:`ClbenchError` line naming the file and key path.
Relative paths inside a suite resolve against the suite file's folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from clbench.errors import ClbenchError

# The streams clbench can build (clbench.streams.build_stream has one branch per name).
STREAM_NAMES = ("split_cifar100", "mnist5k", "digits", "synthetic", "imagenet_r", "domainnet")


# numpy and torch take seeds in [0, 2**32 - 1]; strict: YAML 1.1 reads `yes` as True, which is no seed
SEED_MAX = 2**32 - 1
Seed = Annotated[StrictInt, Field(ge=0, le=SEED_MAX)]
MAX_SUITE_BYTES = 1 << 20  # a suite is a page of YAML; a bigger file (or /dev/zero) is not one


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

    @property
    def display(self) -> str:
        return self.label or self.name


class TrackingConfig(Strict):
    experiment: str | None = Field(None, description="MLflow experiment (default: the suite name)")
    uri: str | None = Field(None, description="tracking URI (default: $MLFLOW_TRACKING_URI or MLflow's default)")


class Suite(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    stream: StreamConfig
    backbone: BackboneConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    methods: list[MethodEntry] = Field(min_length=1)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    plugins_dir: str | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        dup = sorted({x for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"seed(s) {dup} listed twice; each seed is one run per method")
        return v

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


def format_validation_error(source: str, err: ValidationError, prefix: str = "") -> str:
    parts = []
    for e in err.errors()[:3]:
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        parts.append(f"{prefix}{_loc(e['loc'])}: {msg}")
    more = f" (+{len(err.errors()) - 3} more)" if len(err.errors()) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more


def apply_override(data: dict, assignment: str, source: str) -> None:
    """Apply ``key.path=value`` (value parsed as YAML) to the raw suite mapping."""
    if "=" not in assignment:
        raise ClbenchError(f"--set {assignment}: expected key.path=value")
    path, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    keys = path.strip().split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            idx = _list_index(node, key, path)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ClbenchError(f"--set {assignment}: '{'.'.join(keys[:i])}' is not a mapping or list")


def _list_index(node: list, key: str, path: str) -> int:
    if key.isdigit() and int(key) < len(node):
        return int(key)
    # methods.<label>.params.x addresses a method entry by its label, or by its name when one entry has it
    entries = [(i, item) for i, item in enumerate(node) if isinstance(item, dict)]
    for i, item in entries:
        if item.get("label") == key:
            return i
    named = [(i, item) for i, item in entries if item.get("name") == key]
    if len(named) > 1:
        labels = [item.get("label") or f"#{i}" for i, item in named]
        raise ClbenchError(f"--set {path}: {len(named)} entries use '{key}' (labels {labels}); address one by "
                           f"its label or index, e.g. {path.replace(key, str(named[0][0]), 1)}")
    if named:
        return named[0][0]
    raise ClbenchError(f"--set {path}: no list entry '{key}'")


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading that refuses a key given twice in one mapping (YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key in seen:
                raise ClbenchError(f"duplicate key '{key}' at lines {seen[key]} and {line}; YAML keeps only the "
                                   "last one: merge them into one")
            seen[key] = line
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 lambda loader, node: loader.construct_mapping(node))


def _read_text(path: Path) -> str:
    """The suite file's text: a regular UTF-8 file of at most MAX_SUITE_BYTES."""
    try:
        if path.exists() and not path.is_file():
            raise ClbenchError(f"{path}: not a regular file; give a suite YAML file")
        with path.open("rb") as f:
            raw = f.read(MAX_SUITE_BYTES + 1)
    except FileNotFoundError:
        raise ClbenchError(f"{path}: suite file not found") from None
    except OSError as exc:
        raise ClbenchError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_SUITE_BYTES:
        raise ClbenchError(f"{path}: larger than {MAX_SUITE_BYTES >> 20} MiB; not a suite file")
    if b"\0" in raw:
        raise ClbenchError(f"{path}: a binary file (NUL bytes), not a suite YAML file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ClbenchError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                           "save the suite as UTF-8") from None


def read_yaml(path: Path) -> dict:
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ClbenchError as exc:
        raise ClbenchError(f"{path}: {exc}") from None
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


def load_suite(path: str | Path, overrides: list[str] | None = None) -> Suite:
    """Read, override and validate a suite file; raise ClbenchError with one line on any problem."""
    path = Path(path)
    data = read_yaml(path)
    for assignment in overrides or []:
        apply_override(data, assignment, str(path))
    try:
        suite = Suite.model_validate(data)
    except ValidationError as err:
        raise ClbenchError(format_validation_error(str(path), err)) from None
    for i, entry in enumerate(suite.methods):
        try:
            suite.train_for(entry)
        except ValidationError as err:
            raise ClbenchError(format_validation_error(str(path), err, prefix=f"methods.{i}.train.")) from None
    _resolve_paths(suite, path.resolve().parent)
    return suite
