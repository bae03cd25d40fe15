"""``lm_synthetic``: the language quickstart's synthetic instruction-formatted text tasks, generated from the seed
(clbench.data.lm_synthetic; nothing on disk). It builds a ``clbench.data.text.TextStream``, which a language backbone
tokenizes; ``stream.num_tasks`` tasks (at most 4) of three label words, ``stream.samples_per_class`` training and
half as many test examples per label word."""

from __future__ import annotations

from clbench.data.registry import StreamSpec, register_stream


def build(cfg, seed: int, with_test: bool):
    from clbench.data.lm_synthetic import synthetic_text_stream

    return synthetic_text_stream(cfg.num_tasks, cfg.samples_per_class, max(1, cfg.samples_per_class // 2), seed)


def check(cfg) -> str | None:
    from clbench.data.lm_synthetic import MAX_TASKS

    if cfg.num_tasks > MAX_TASKS:
        return f"stream.num_tasks: lm_synthetic has {MAX_TASKS} tasks; choose 1..{MAX_TASKS}"
    return None


register_stream(StreamSpec("lm_synthetic", build, num_classes=lambda cfg: 3 * cfg.num_tasks, check=check,
                           about="synthetic instruction-formatted text tasks (3 label words each), for language "
                                 "backbones"))
