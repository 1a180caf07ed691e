"""What every experiment shares: errors, data files, small layers and CLI pieces."""

from experiments.common.cli import CLI_MODES, add_mode_argument
from experiments.common.errors import ConfigError, DataError, require
from experiments.common.files import ENV_VAR, GZIP_MAGIC, gunzip_if_needed, read_bytes
from experiments.common.layers import inverted_dropout

__all__ = [
    "CLI_MODES",
    "ENV_VAR",
    "GZIP_MAGIC",
    "ConfigError",
    "DataError",
    "add_mode_argument",
    "gunzip_if_needed",
    "inverted_dropout",
    "read_bytes",
    "require",
]
