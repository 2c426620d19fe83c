"""Errors users see. Each names the problem in words; the CLI prints them without a traceback."""


class DToPError(ValueError):
    """Base class for dtop's user-facing errors."""


class InputError(DToPError):
    """An input tensor or file the model cannot take (shape, channels, size)."""


class ConfigError(DToPError):
    """An unknown preset, config key or inconsistent setting."""


class CheckpointError(DToPError):
    """A checkpoint file that is missing, unreadable or does not match the model."""
