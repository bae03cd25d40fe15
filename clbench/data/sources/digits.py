"""``digits``: scikit-learn's 1,797 8x8 handwritten digits (10 classes), a fixed 30-per-class test split."""

from __future__ import annotations

from clbench.data.registry import StreamSpec, needs_package, register_stream


def digits_tensors():
    """scikit-learn's digits as uint8 ``N x 1 x 8 x 8`` images (0..16 scaled by 16) and their labels."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * 16.0, 0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
    return torch.from_numpy(x), torch.from_numpy(d.target.astype(np.int64))


def build(cfg, seed: int, with_test: bool):
    from clbench.data.streams import tensor_stream

    x, y = digits_tensors()
    return tensor_stream(cfg, seed, with_test, x, y, test_per_class=30)


register_stream(StreamSpec("digits", build, num_classes=10, check=needs_package("digits", "sklearn"),
                           about="scikit-learn's 1,797 8x8 handwritten digits"))
