"""Sub-seeds derived from a run's seed without overflow.

A seed may be anything in 0..2**32-1 (``clbench.suite.SEED_MAX``); arithmetic such as ``seed * 1000 + t`` leaves
the range numpy's generators accept (``ValueError: Seed must be between 0 and 2**32 - 1`` at seed 5,000,000)
and maps different (seed, t) pairs onto one stream. numpy's ``SeedSequence`` hashes the whole tuple instead.
"""

from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed for the sub-stream ``keys`` (a task index, a purpose) of ``seed``: distinct tuples give
    independent seeds, and every value fits any generator (numpy's RandomState, torch's manual_seed)."""
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint32)[0])
