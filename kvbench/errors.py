"""The one exception type for bad input: reported as a single line, never a traceback."""


class UserError(ValueError):
    """A bad input (unknown name, unsupported value, unreadable file, unreachable model)."""
