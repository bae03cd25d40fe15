"""A plugin that registers an int instead of a class."""


def register_methods(register):
    register(42)
