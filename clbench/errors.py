"""The one exception type users see: a ClbenchError becomes one clear line and exit code 1 in the CLI."""


class ClbenchError(Exception):
    """An error the user can fix; the message names the file, key or path and how to fix it."""
