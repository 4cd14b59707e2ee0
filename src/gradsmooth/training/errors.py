"""Errors the entry point reports without a traceback."""


class ConfigError(ValueError):
    """An invalid configuration value, found before training starts."""
