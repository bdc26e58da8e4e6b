"""The one exception type a user can fix: the CLI prints its message as one line, exit 1."""


class UserError(Exception):
    """A mistake in the user's input (a file, a flag, a model reference) with a clear message."""


class ParameterError(UserError):
    """A value that its parameter does not allow. The core names the parameter (`lr`,
    `val_fraction`); a command that takes it as a flag says the flag instead (`--lr`)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem
