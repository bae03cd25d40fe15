"""clbench's built-in method plugins, installed as the package ``clbench_plugins``.

Each module registers through the ``clbench`` entry-point group (see pyproject.toml), exactly as a
third-party method package would.
"""
