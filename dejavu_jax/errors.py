"""Exceptions that tell the user what was wrong and what to do.

All derive from `DejavuError` (a `ValueError`), so callers can catch one type.
"""


class DejavuError(ValueError):
    """Base class of dejavu-jax's user-facing errors."""


class ConfigError(DejavuError):
    """A config.json or configuration object that dejavu-jax cannot use."""


class CheckpointError(DejavuError):
    """A checkpoint directory or tensor that is missing, mis-shaped or of the wrong kind."""


class InputError(DejavuError):
    """Bad arguments to a model call: tokens, masks, lengths, dtypes."""
