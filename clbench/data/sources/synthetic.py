"""``synthetic``: class prototypes plus noise, generated from the seed (tests, smoke runs); nothing on disk."""

from __future__ import annotations

from clbench.data.registry import StreamSpec, register_stream


def build(cfg, seed: int, with_test: bool):
    from clbench.data.streams import synthetic_tensors, tensor_stream

    x, y = synthetic_tensors(classes(cfg), cfg.samples_per_class + 40, seed=seed)
    return tensor_stream(cfg, seed, with_test, x, y, test_per_class=40)


def classes(cfg) -> int:
    return cfg.num_classes or 10


register_stream(StreamSpec("synthetic", build, num_classes=classes,
                           about="random 4x4 block patterns plus noise, 16 px, stream.num_classes classes"))
