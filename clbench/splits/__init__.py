"""Pinned class lists and split files (package data), with their sha256 in ``SHA256SUMS``.

Produced from the datasets' own listings by ``python -m clbench.splits.make_splits``; provenance in
docs/DATA.md. Code reads them through ``clbench.data.datasets.splitfiles``.
"""
