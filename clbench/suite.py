"""The suite schema (pydantic, unknown keys rejected) and ``load_suite(path, overrides)``.

A suite names a continual stream, a backbone, the shared training protocol and the methods to compare.
Every error a user can make is turned into one :class:`ClbenchError` line naming the file and key path.
Relative paths inside a suite resolve against the suite file's folder.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from clbench.data.registry import find_stream, stream_names
from clbench.errors import ClbenchError
from clbench.weights import weights_identity

# numpy and torch take seeds in [0, 2**32 - 1]; strict: YAML 1.1 reads `yes` as True, which is no seed
SEED_MAX = 2**32 - 1
Seed = Annotated[StrictInt, Field(ge=0, le=SEED_MAX)]
MAX_SUITE_BYTES = 1 << 20  # a suite is a page of YAML; a bigger file (or /dev/zero) is not one


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StreamConfig(Strict):
    name: str = Field(description="benchmark name: a registered stream (clbench.data.registry; the built-ins are "
                                  "the modules of clbench/data/sources)")
    num_tasks: int = Field(5, ge=1, le=1000, description="number of tasks (must divide the classes)")
    class_order: list[int] | Literal["coda_prompt", "pilot"] | None = Field(
        None, description="explicit class order (a permutation of the class ids), or an official repository's rule "
                          "per seed: coda_prompt = CODA-Prompt's trainer.py (Python's random.shuffle after "
                          "random.seed(seed), only when seed > 0; ImageNet-R ids from its split YAML's targets); "
                          "pilot = PILOT's data_manager (np.random.seed(seed); permutation), as CL-LoRA and SD-LoRA; "
                          "default: from the seed as shuffle_classes says")
    shuffle_classes: bool = Field(True, description="permute the class order with the run's seed (numpy's "
                                                    "RandomState(seed).permutation, PILOT's order)")
    root: str | None = Field(None, description="data root (default: $CLBENCH_DATA or the cache folder)")
    num_classes: int | None = Field(None, ge=2, description="synthetic stream only: number of classes")
    samples_per_class: int = Field(60, ge=1, description="synthetic stream only: training samples per class")
    resolution: int = Field(224, ge=8, le=1024, description="imagenet_r/domainnet: cached test image size "
                            "(Resize(r*256/224)+CenterCrop(r)); training images are cached at r*256/224")
    augment: Literal["auto", "none", "rrc_flip"] = Field(
        "auto", description="training augmentation on the device; auto = rrc_flip (random resized crop + flip, "
                            "as InfLoRA) for split_cifar100/imagenet_r/domainnet, none otherwise")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="rrc_flip: RandomResizedCrop's scale range "
                                            "(torchvision's default (0.08, 1); PILOT / CL-LoRA / SD-LoRA: (0.05, 1))")
    test_transform: Literal["auto", "resize", "resize_center_crop"] = Field(
        "auto", description="test images: resize = the whole image resized to the backbone's size (bilinear); "
                            "resize_center_crop = Resize(size*256/224, bicubic) + CenterCrop(size) on the device "
                            "(PILOT's CIFAR test transform); auto = resize for in-memory streams, and for "
                            "imagenet_r/domainnet the cached Resize(256) + CenterCrop(224)")
    cache: bool = Field(True, description="imagenet_r/domainnet: decode once into a uint8 memmap in the cache folder")
    download: bool = Field(True, description="download missing data where the hosting allows (CIFAR-100, ImageNet-R)")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if find_stream(v) is None:
            raise ValueError(f"unknown stream '{v}'; choose from {stream_names()}")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("crop_scale: two fractions of the image area, 0 < low <= high <= 1, e.g. [0.05, 1.0]")
        return v

    @model_validator(mode="after")
    def _test_transform(self) -> StreamConfig:
        if self.test_transform == "resize_center_crop" and find_stream(self.name).images == "cached":
            raise ValueError(f"test_transform: {self.name} test images are cached as Resize + CenterCrop "
                             "already; leave it at auto")
        return self


class BackboneConfig(Strict):
    name: str = Field(description="timm model name, or vit_tiny_clbench / vit_micro_clbench for CPU")
    pretrained: bool = Field(True, description="load pretrained weights (the hub's, or for vit_tiny_clbench at "
                                               "16 px the weights shipped in clbench/weights)")
    checkpoint: str | None = Field(None, description="local weights file (state dict or .safetensors)")
    image_size: int = Field(224, ge=8, le=1024)
    in_chans: int | None = Field(None, ge=1, le=4)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    normalize: Literal["timm", "none"] = Field(
        "timm", description="input normalisation after scaling pixels to [0, 1]: timm = the model's pretrained "
                            "mean/std (0.5/0.5 for the augreg ViTs); none = inputs stay in [0, 1] (InfLoRA's "
                            "official pipeline, Normalize(0, 1))")
    # language backbones (clbench.model.lm: t5_tiny_clbench, llama_tiny_clbench, hf:<hub id>) only
    max_source_length: int = Field(512, ge=1, le=100_000, description="language model: prompt tokens kept "
                                   "(O-LoRA's max_source_length)")
    max_target_length: int = Field(50, ge=2, le=10_000, description="language model: target tokens kept, end of "
                                   "sequence included (O-LoRA's max_target_length)")
    lm_eval: Literal["generate", "likelihood"] = Field(
        "generate", description="language model evaluation: generate = greedy generation + exact match with the "
                                "label word (O-LoRA's); likelihood = the label word of highest log-likelihood "
                                "(faster; not O-LoRA's)")


EPOCHS_MAX = 10_000  # far above any protocol (InfLoRA: 50 per task); 1e20 would "run" for ever
BATCH_MAX = 1_000_000


class TrainConfig(Strict):
    """The training protocol: every field changes what is learned, so every field is in the suite hash."""

    epochs: int = Field(1, ge=1, le=EPOCHS_MAX)
    batch_size: int = Field(64, ge=1, le=BATCH_MAX)
    lr: float = Field(1e-3, gt=0, description="learning rate of the method's parameter groups (the adapters)")
    head_lr: float | None = Field(None, gt=0, description="learning rate of the current task's head "
                                  "(default: lr; InfLoRA's DomainNet run uses 1e-2 against 5e-3)")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine", "cosine_epoch", "inflora_cosine", "multistep"] = Field(
        "constant", description="constant; cosine: per-step half cosine to 0; cosine_epoch: CosineAnnealingLR("
                                "T_max=epochs) stepped per epoch, epoch e at lr*(1+cos(pi*e/K))/2 (CL-LoRA); "
                                "inflora_cosine: the "
                                "CosineSchedule of InfLoRA and CODA-Prompt stepped per epoch with its lag: epoch e "
                                "at lr*f(max(e-1, 0)), f(e) = cos(99*pi*e/(200*(K-1))); multistep: lr*gamma^m "
                                "after m of train.milestones (epochs)")
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs (0-based) at which the "
                                  "learning rate is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, description="multistep: the factor at each milestone")
    # precision changes the arithmetic (bf16 autocast vs fp32), hence the numbers: it is protocol, not runtime.
    drop_last: bool = Field(False, description="drop each epoch's last partial training batch (CODA-Prompt's "
                            "DataLoader(drop_last=True))")
    head_init: Literal["torch", "kaiming_zero"] = Field(
        "torch", description="a new head's initialisation: torch = nn.Linear's default (uniform weight and bias); "
                             "kaiming_zero = PILOT's SimpleLinear (kaiming_uniform_(nonlinearity='linear') weight, "
                             "zero bias), as CL-LoRA and SD-LoRA")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="fp32, bf16 autocast, or auto (bf16 on CUDA, fp32 elsewhere; the resolved one is "
                            "recorded as the clbench.precision tag)")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap steps per epoch (smoke tests)")

    @model_validator(mode="after")
    def _milestones(self) -> TrainConfig:
        if self.milestones != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ValueError("milestones: strictly increasing epochs >= 1, e.g. [4]")
        return self


# Settings that say how a run executes, not what it learns: outside the suite hash, recorded as tags.
RUNTIME_KEYS = ("device", "compile", "log_every", "cpu_threads", "eval_batch_size", "deterministic")


class RuntimeConfig(Strict):
    """How the runs execute on this machine. None of it changes the protocol, so none of it is hashed: the same
    suite run on another device, thread count or log interval lands in the same leaderboard group and resumes
    from the same checkpoints. (Evaluation batch size changes only the order of float additions inside a
    batch's forward, not which images are counted.)"""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    compile: bool = Field(False, description="torch.compile the backbone (CUDA)")
    log_every: int = Field(25, ge=1, description="read the loss back from the device every N steps")
    cpu_threads: int | None = Field(None, ge=1, le=512, description="torch threads when training on the CPU "
                                    "(default: torch's choice; tiny models run fastest on 1)")
    eval_batch_size: int = Field(256, ge=1)
    deterministic: bool = Field(False, description="bit-reproducible runs on CUDA: torch.use_deterministic_algorithms"
                                "(True) (an op without a deterministic kernel fails, naming itself), cuBLAS's "
                                "CUBLAS_WORKSPACE_CONFIG=:4096:8, no cuDNN autotuning; slower. The CPU is "
                                "bit-reproducible at a given thread count without it (README: determinism)")


LABEL_CHARS = "ASCII letters, digits and _ . - + = , : [ ] ( )"
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=,:\[\]()-]*")
LABEL_MAX = 200


def check_label(label: str) -> str:
    """A method label reaches terminals, file names, Markdown, HTML, CSV and figures unescaped, so it holds only
    ``LABEL_CHARS`` and starts with a letter or digit: no control character, bidirectional override or markup,
    no spreadsheet formula, and no letter of another script that reads as a Latin one (``lоra`` with a Cyrillic
    o would be a second ``lora`` row)."""
    if _LABEL_RE.fullmatch(label) and len(label) <= LABEL_MAX:
        return label
    if len(label) > LABEL_MAX:
        raise ValueError(f"a label has at most {LABEL_MAX} characters ({len(label)} given)")
    bad = next((c for c in label if not _LABEL_RE.fullmatch("a" + c)), None)
    if bad is None:
        raise ValueError(f"{label!r}: a label must start with a letter or digit (it may hold {LABEL_CHARS})")
    import unicodedata

    name = unicodedata.name(bad, "")
    shown = repr(bad) if bad.isprintable() and bad.isascii() else "a character"
    raise ValueError(f"{ascii(label)} holds {shown} (U+{ord(bad):04X}{' ' + name if name else ''}); a label may "
                     f"hold only {LABEL_CHARS} and starts with a letter or digit")


class MethodEntry(Strict):
    name: str
    label: str | None = Field(None, description="display name (defaults to name); distinguishes ablations")
    params: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the suite's train settings")

    # where the entry came from when not the suite file (``--add-method ...``); not part of the suite's data
    _origin: str | None = PrivateAttr(None)
    # the ``--set`` assignments that wrote into this entry, by key path within it (() = the whole entry)
    _sets: dict[tuple, str] = PrivateAttr(default_factory=dict)
    # other flags that wrote keys of this entry (a sweep trial's ``--grid ...``), by key path within it
    _flags: dict[tuple, str] = PrivateAttr(default_factory=dict)

    @field_validator("label")
    @classmethod
    def _safe_label(cls, v: str | None) -> str | None:
        return None if v is None else check_label(v)

    @property
    def display(self) -> str:
        return self.label or self.name

    def source_and_prefix(self, path: str, index: int) -> tuple[str, str]:
        """What an error about this entry names: the suite file and ``methods.<index>.``, or the flag that added
        it (and no prefix)."""
        return (self._origin, "") if self._origin else (path, f"methods.{index}.")

    def blame(self, loc: tuple) -> str | None:
        """The command-line flag that wrote the key at ``loc`` (``--set KEY=VALUE``, a sweep's ``--grid ...``), if
        one did: an error about that value names the flag, not the suite file."""
        flag = self.set_flag(loc)
        return f"--set {flag}" if flag else self._flags.get(loc)

    def set_flag(self, loc: tuple) -> str | None:
        """The ``--set`` assignment that wrote the key at ``loc`` within this entry (``("params", "rank")``), if
        one did: errors found after loading (params, validated against the registry) name that flag."""
        return _set_flag(self._sets, loc)


class TrackingConfig(Strict):
    experiment: str | None = Field(None, description="MLflow experiment (default: the suite name)")
    uri: str | None = Field(None, description="tracking URI used when neither --tracking-uri nor "
                            "$MLFLOW_TRACKING_URI is given (a relative sqlite/file path: the suite's folder)")

    @field_validator("uri")
    @classmethod
    def _persistent(cls, v: str | None) -> str | None:
        from clbench.paths import memory_store

        if v is not None and memory_store(v):
            raise ValueError(f"{v} does not persist (an in-memory store: every result would be gone when clbench "
                             "exits); use a file, e.g. sqlite:///mlflow.db")
        return v


class Reference(Strict):
    """Published numbers of one method entry that a reproduction suite is compared with: ``clbench leaderboard``
    and the HTML report show the measured mean next to ``mean``, the difference, and whether it is within
    ``tolerance`` points. A suite may list several (one per method entry, or a paper table and a log file)."""

    method: str | None = Field(None, description="the method entry's label (default: the suite's only entry)")
    source: str = Field(min_length=1, description="where the numbers come from: a paper table, or the official "
                                                  "log file's path in its repository (with the commit)")
    per_seed: dict[int, dict[str, float]] = Field(default_factory=dict, description="seed -> metric -> value, "
                                                  "where the source gives them (final/acc, final/avg_acc, ...)")
    mean: dict[str, float | None] = Field(default_factory=dict, description="metric -> the published mean "
                                          "(over per_seed when given); null = not retrieved")
    tolerance: float = Field(1.0, gt=0, description="|measured mean - reference| within this many points passes")
    note: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Reference:
        for key in {k for row in self.per_seed.values() for k in row}:
            values = [row[key] for row in self.per_seed.values() if key in row]
            mean = sum(values) / len(values)
            stated = self.mean.get(key)
            if stated is None:
                self.mean[key] = round(mean, 4)
            elif abs(stated - mean) > 0.011:  # published per-seed numbers are rounded to 0.01
                raise ValueError(f"mean.{key}: {stated} is not the mean of per_seed ({mean:.3f})")
        return self


class ValidationConfig(Strict):
    """The held-out split that ``clbench sweep`` chooses hyperparameters on (clbench.data.validation): per task and
    class, round(fraction * n) (at least 1) of the class's training images, drawn with ``seed`` (default: the
    run's seed), never trained on. Used only by validation runs; a test run ignores it, so it is not in the
    hash of test runs."""

    fraction: float = Field(0.1, gt=0, lt=1, description="share of each class's training images held out")
    seed: Seed | None = Field(None, description="seed of the held-out draw (default: the run's seed)")


class Suite(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    stream: StreamConfig
    backbone: BackboneConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    methods: list[MethodEntry] = Field(min_length=1)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    reference: list[Reference] = Field(default_factory=list, description="reproduction suites: the published "
                                       "numbers, one block per method entry and source")
    plugins_dir: str | None = None
    validation: ValidationConfig | None = Field(None, description="the held-out split of clbench sweep "
                                                "(default for sweeps: fraction 0.1)")

    # which split this suite's runs are evaluated on: "test" (clbench run) or "validation" (for_validation())
    _split: str = PrivateAttr("test")

    @property
    def split(self) -> str:
        return self._split

    def for_validation(self) -> Suite:
        """This suite with its runs evaluated on the validation split (``validation`` defaulted when absent)."""
        copy = self.model_copy(deep=True)
        if copy.validation is None:
            copy.validation = ValidationConfig()
        copy._split = "validation"
        return copy

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
        dup = sorted(x for x, n in collections.Counter(labels).items() if n > 1)
        if dup:
            raise ValueError(f"methods: duplicate method label(s) {dup}; give each entry a distinct 'label'")
        for ref in self.reference:
            if ref.method is None and len(labels) == 1:
                ref.method = labels[0]
            if ref.method not in labels:
                raise ValueError(f"reference: method '{ref.method}' is not a method label of this suite "
                                 f"({labels}); name the entry it refers to")
        return self

    @property
    def experiment(self) -> str:
        """The MLflow experiment of this suite's runs: ``tracking.experiment``, else the suite's name."""
        return self.tracking.experiment or self.name

    def protocol_hash(self) -> str:
        """Hash of what makes runs comparable: the training protocol, the backbone and the data's identity (stream
        settings and the shipped split files' checksums), not the methods, not the runtime settings and never a
        local path (the same protocol on two machines is one leaderboard group and resumes one checkpoint)."""
        return hashlib.sha256(json.dumps(self.protocol_identity(), sort_keys=True).encode()).hexdigest()[:12]

    def protocol_identity(self) -> dict[str, Any]:
        """What ``protocol_hash`` hashes. ``backbone.weights`` is the sha256 of the weights the backbone starts from
        (clbench.weights: the shipped tiny-ViT file, a checkpoint file or the hub's file), so runs on other weights
        are another protocol."""
        stream = without_new_defaults(self.stream.model_dump(exclude={"root", "download", "cache"}))
        backbone = without_new_defaults(self.backbone.model_dump(exclude={"checkpoint"}))
        backbone["weights"] = self.weights_identity()
        train = without_new_defaults(self.train.model_dump())
        if train["schedule"] == "inflora_cosine":  # since issue 31 with the official one-epoch lag: other runs
            train["schedule_lag"] = 1
        identity = {"train": train, "backbone": backbone, "stream": stream,
                    "splits": shipped_split_sums(self.stream.name)}
        if self._split == "validation":  # other images measured: never one group or checkpoint with test runs
            identity["validation"] = self.validation.model_dump()
        return identity

    def weights_identity(self) -> str:
        """The sha256 of the backbone's starting weights, or what stands for it (clbench.weights)."""
        b = self.backbone
        return weights_identity(b.name, b.image_size, b.in_chans, b.pretrained, b.checkpoint)

    def train_for(self, entry: MethodEntry) -> TrainConfig:
        return TrainConfig(**{**self.train.model_dump(), **entry.train})


# Keys added after suites had hashes (issue 31): hashed only when set to something else than their default, so
# that every suite that does not use them keeps its hash (and its leaderboard group and checkpoints).
NEW_KEY_DEFAULTS = {"crop_scale": (0.08, 1.0), "test_transform": "auto", "drop_last": False, "head_init": "torch",
                    "max_source_length": 512, "max_target_length": 50, "lm_eval": "generate"}


def without_new_defaults(section: dict[str, Any]) -> dict[str, Any]:
    """``section`` (a model_dump) without the keys of NEW_KEY_DEFAULTS that hold their default."""
    return {k: v for k, v in section.items() if k not in NEW_KEY_DEFAULTS or v != NEW_KEY_DEFAULTS[k]}


def shipped_split_sums(stream_name: str) -> dict[str, str]:
    """Checksums of the split / class-list files clbench ships for ``stream_name`` (clbench/splits/SHA256SUMS):
    the data's identity known without reading the data. (CIFAR-100's split is its fixed official archive;
    DomainNet's lists are read from the data folder and their checksum is the run's clbench.stream.split_sha256.)"""
    from clbench.data.datasets.splitfiles import pinned_sums

    return {k: v for k, v in pinned_sums().items()
            if k.startswith(stream_name + "_") or stream_name.startswith(SHARED_SPLIT_FILES.get(k, "\0"))}


# Pinned files that several streams read: file -> the stream-name prefix of its readers (O-LoRA's task lists are one
# file for its four orders, clbench.data.text_olora).
SHARED_SPLIT_FILES = {"olora_cl_benchmark.json": "olora_"}


def _moved_runtime_keys(data: dict, path: Path) -> None:
    """Old suites set the runtime settings under train: one line naming the new place."""
    sections = [("train", data.get("train"))]
    methods = data.get("methods")
    if isinstance(methods, list):
        sections += [(f"methods.{i}.train", m.get("train")) for i, m in enumerate(methods) if isinstance(m, dict)]
    for where, section in sections:
        if isinstance(section, dict):
            for key in RUNTIME_KEYS:
                if key in section:
                    raise ClbenchError(f"{path}: {where}.{key} has moved to runtime.{key} (a top-level "
                                       f"'runtime:' section, outside the suite hash); move it there")


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
    suite.tracking.uri = _absolute_store(suite.tracking.uri, absolute)


def _absolute_store(uri: str | None, absolute) -> str | None:
    """A local tracking store's path resolved like every suite path (against the suite's folder)."""
    if uri is None or "://" in uri.removeprefix("sqlite:///").removeprefix("file://"):
        return uri
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{absolute(uri.removeprefix('sqlite:///'))}"
    if uri.startswith("file:"):
        return f"file://{absolute(uri.removeprefix('file://').removeprefix('file:'))}"
    return uri if uri.startswith(("http:", "https:", "databricks")) else absolute(uri)


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


class SuiteGroup(Strict):
    """A suite group file: ``{group: NAME, suites: [paths relative to the group file]}``. Each member stays one
    suite (one backbone, one protocol hash, one leaderboard table); the group lets one ``clbench run`` or
    ``clbench leaderboard`` take them all, in order."""

    group: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    suites: list[str] = Field(min_length=1)


def is_group(data: dict) -> bool:
    """A YAML mapping is a group file when it has ``group`` and no suite's ``name``."""
    return "group" in data and "name" not in data


def group_members(path: str | Path) -> list[Path] | None:
    """The member suite files of the group file ``path`` (resolved against its folder, in order), or None when
    ``path`` is a suite (or not a YAML file at all: load_suite says what is wrong with it). A member that is
    missing, a group itself, or listed twice is a ClbenchError naming the group file and the key."""
    path = Path(path)
    data = read_yaml(path)
    if not is_group(data):
        return None
    try:
        group = SuiteGroup.model_validate(data)
    except ValidationError as err:
        raise ClbenchError(format_validation_error(f"{path} (a suite group: group, suites)", err)) from None
    members: list[Path] = []
    for i, member in enumerate(group.suites):
        q = Path(member).expanduser()
        q = q if q.is_absolute() else path.parent / q
        where = f"{path}: suites.{i}: {member}"
        if not q.is_file():
            raise ClbenchError(f"{where}: no such suite file (paths are relative to the group file's folder)")
        if q.resolve() in {m.resolve() for m in members}:
            raise ClbenchError(f"{where}: listed twice; list each suite once")
        if is_group(read_yaml(q)):
            raise ClbenchError(f"{where}: a suite group itself; groups do not nest: list its suites here")
        members.append(q)
    return members


def suite_files(path: str | Path) -> list[Path]:
    """``[path]`` for a suite file, its members for a group file."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return group_members(path) or [path]
    return [path]


def load_suite(path: str | Path, overrides: list[str] | None = None, added: list[str] | None = None) -> Suite:
    """Read, override and validate a suite file, with ``added`` method entries (``--add-method``, flow YAML)
    appended to its methods; raise ClbenchError with one line on any problem."""
    path = Path(path)
    data = read_yaml(path)
    if is_group(data):
        raise ClbenchError(f"{path}: a suite group (group, suites): `clbench run` and `clbench leaderboard` take "
                           f"it; give this command one of the suites it lists")
    set_paths: dict[tuple, str] = {}
    for assignment in overrides or []:
        set_paths[apply_override(data, assignment, str(path))] = assignment
    added = list(added or [])
    first_added = len(data["methods"]) if isinstance(data.get("methods"), list) else 0
    for raw in added:
        add_method(data, raw)
    _moved_runtime_keys(data, path)
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
    for i, entry in enumerate(suite.methods):  # `--set methods=[...]` covers every entry, methods.I.x entry I
        entry._sets = {key[2:]: a for key, a in set_paths.items() if key == ("methods",) or key[:2] == ("methods", i)}
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
