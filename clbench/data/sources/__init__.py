"""The built-in streams, one module per stream: each registers a ``clbench.data.registry.StreamSpec`` when imported
(the registry imports every module of this folder). A new stream is a new file here; keep its heavy imports inside
its functions (the suite schema imports this folder to know the stream names).
"""
