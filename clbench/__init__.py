"""clbench: a benchmark suite for continual low-rank adaptation of pre-trained models."""

__version__ = "0.1.0"
