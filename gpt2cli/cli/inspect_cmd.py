"""`gpt2 inspect`: placeholder until the checkpoint module lands."""


def inspect() -> None:
    """Inspect a checkpoint (coming next)."""
    raise NotImplementedError
