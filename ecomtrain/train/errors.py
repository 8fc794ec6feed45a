"""Errors of the training side that the CLI reports as one line (exit 2), torch-free to import."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not ours, not a checkpoint, or holding code (a pickle that
    would import or call something beyond tensors and plain containers)."""
