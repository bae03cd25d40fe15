"""The eblora method plugin (work in progress: registers nothing yet)."""


def register_methods(register):
    return None
