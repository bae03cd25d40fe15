"""Real benchmark datasets on disk: locating, downloading (with checksums) and listing them, and their splits.

``clbench.data.streams`` turns these listings into Avalanche streams; nothing here imports Avalanche.
"""
