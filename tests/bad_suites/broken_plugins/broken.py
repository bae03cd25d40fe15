"""A plugin module whose import fails (the bad-input corpus expects one clear line)."""
import clbench_no_such_module  # noqa: F401


def register_methods(register):
    return None
