"""The error every checkpoint reader and writer raises (its own module so that all of them can)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, unsafe or does not fit the state it is loaded into."""
