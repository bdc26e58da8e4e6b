"""The one exception type a user can fix: the CLI prints its message as one line, exit 1."""


class UserError(Exception):
    """A mistake in the user's input (a file, a flag, a model reference) with a clear message."""
