"""Small, fast building blocks for tests, benchmarks and plugin authors: a synthetic stream, a micro ViT and
a one-call run of a method through the real loop (no MLflow)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clbench.backbones import CLModel, build_model
from clbench.loop import LoopState, TaskResult, run_stream
from clbench.registry import run_manager
from clbench.streams import Stream, build_stream
from clbench.suite import StreamConfig, TrainConfig

TINY_SUITE_YAML = """\
name: {name}
seeds: [0]
stream: {{name: synthetic, num_tasks: 3, num_classes: 6, samples_per_class: 16}}
backbone: {{name: vit_micro_clbench, image_size: 16, pretrained: false}}
train: {{epochs: 1, batch_size: 16, lr: 5.0e-3, max_steps_per_epoch: 2}}
runtime: {{device: cpu, log_every: 1000}}
methods:
  - {{name: lora, params: {{rank: 2}}}}
  - {{name: lora, label: inclora, params: {{rank: 2, fresh_per_task: true}}}}
tracking: {{experiment: {experiment}}}
"""


def tiny_suite_yaml(name: str, experiment: str | None = None) -> str:
    """A 3-task, 2-method suite on the synthetic stream that a `clbench run` process finishes in seconds."""
    return TINY_SUITE_YAML.format(name=name, experiment=experiment or name)


def tiny_stream(num_tasks: int = 2, num_classes: int = 4, samples_per_class: int = 24, seed: int = 0) -> Stream:
    """A synthetic stream through the same Avalanche path as the real ones."""
    cfg = StreamConfig(name="synthetic", num_tasks=num_tasks, num_classes=num_classes,
                       samples_per_class=samples_per_class)
    return build_stream(cfg, seed)


def tiny_model(name: str = "vit_micro_clbench", image_size: int = 16, seed: int = 0) -> CLModel:
    """A randomly initialised tiny ViT (real timm VisionTransformer)."""
    torch.manual_seed(seed)
    return build_model(name, image_size, pretrained=False, checkpoint=None)


def tiny_train(**overrides: Any) -> TrainConfig:
    base = dict(epochs=1, batch_size=16, lr=5e-3, optimizer="adam")
    return TrainConfig(**{**base, **overrides})


@dataclass
class TinyRun:
    model: CLModel
    method: Any
    state: LoopState
    results: list[TaskResult] = field(default_factory=list)

    @property
    def R(self) -> np.ndarray:
        return self.state.R


def run_method(method: Any, stream: Stream | None = None, model: CLModel | None = None, seed: int = 0,
               **train: Any) -> TinyRun:
    """Run ``method`` (an instance) through ``stream`` on CPU with the real loop and hooks; the returned
    ``model`` is the one trained (the replacement when ``configure_model`` returned one)."""
    stream = stream or tiny_stream(seed=seed)
    trained = [model or tiny_model(seed=seed)]
    results: list[TaskResult] = []

    def on_task(result: TaskResult, state: LoopState, model: CLModel) -> None:
        results.append(result)
        trained[0] = model

    state = run_stream(trained[0], stream, run_manager(method), tiny_train(**train), seed, torch.device("cpu"),
                       on_task=on_task)
    return TinyRun(trained[0], method, state, results)
