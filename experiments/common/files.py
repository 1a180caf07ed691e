"""Reading data files: the data-folder environment variable and gzip-transparent reads."""

import gzip
import os
import zlib
from pathlib import Path

from experiments.common.errors import DataError

__all__ = ["ENV_VAR", "GZIP_MAGIC", "gunzip_if_needed", "read_bytes", "recorded_path"]

#: The environment variable naming the folder that holds the experiments' data.
ENV_VAR = "MEPROP_DATA_DIR"

#: The first two bytes of every gzip stream.
GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a whole file, decompressing it when it starts with the gzip magic bytes.

    Args:
        path: the file; its name does not matter, only its first two bytes.

    Returns:
        The (uncompressed) content.

    Raises:
        DataError: the file cannot be read or is a corrupt/truncated gzip stream.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from exc
    return gunzip_if_needed(raw, str(path))


def gunzip_if_needed(raw: bytes, source: str) -> bytes:
    """Decompress ``raw`` if it is gzip data; ``source`` names it in errors."""
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{source}: corrupt or truncated gzip data: {exc}") from exc


def recorded_path(path: str | os.PathLike[str] | None) -> str | None:
    """``path`` as a run's record stores it: no machine's folders in it.

    Relative to the data folder (``$MEPROP_DATA_DIR``) when it lies there, for example
    ``mnist`` or ``ptb-dep-sample/train.conllx.gz``; relative to the working directory when
    it lies there (a run folder such as ``runs/...``); otherwise its last part, the file or
    folder name. A non-path value (``"tfds"``) and None pass through.

    Args:
        path: the path a run read or wrote.

    Returns:
        The path to store, or None.
    """
    if path is None:
        return None
    given = Path(path)
    if not given.is_absolute() and ".." not in given.parts:
        return given.as_posix()
    resolved = given.resolve()
    roots = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    for root in [*roots, Path.cwd()]:
        try:
            return resolved.relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
    return resolved.name
