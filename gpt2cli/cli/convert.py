"""`gpt2 convert`: placeholder until the weights module lands."""


def convert() -> None:
    """Convert a checkpoint (coming next)."""
    raise NotImplementedError
