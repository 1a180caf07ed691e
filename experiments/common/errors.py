"""The two errors every experiment reports without a traceback."""

__all__ = ["ConfigError", "DataError", "require"]


class DataError(ValueError):
    """A data file is missing, unreadable or malformed; the message names the file."""


class ConfigError(ValueError):
    """A bad command-line value; the message names the flag."""


def require(condition: bool, message: str) -> None:
    """Raises :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
