"""MNIST reader: IDX parsing, locating the files, verified download and the paper's split.

An explicit ``data_dir`` (the ``--data-dir`` option of the experiments) is the only place
looked at: when it lacks a file, that is an error, with no fall-back. Without one the data is
looked for, in this order, in:

1. the folder named by the environment variable ``MEPROP_DATA_DIR``,
2. the user cache, ``$XDG_CACHE_HOME/meprop_jax/mnist`` (default ``~/.cache/meprop_jax/mnist``).

``data_dir`` and ``MEPROP_DATA_DIR`` may hold the four files themselves or an ``mnist/``
subfolder with them; each file may be gzip-compressed (``.gz``) or not. When neither of these
has the files, they are downloaded into the cache and their uncompressed content is checked
against known SHA-256 digests before anything is written.
"""

import hashlib
import math
import os
import struct
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.common import ENV_VAR, GZIP_MAGIC, DataError, gunzip_if_needed, read_bytes

__all__ = [
    "ENV_VAR",
    "MNIST_DEV_SIZE",
    "MNIST_FILES",
    "MNIST_SPECS",
    "MNIST_URL",
    "DataError",
    "FileSpec",
    "Mnist",
    "cache_dir",
    "download_mnist",
    "load_mnist",
    "load_mnist_tfds",
    "locate_mnist",
    "parse_idx",
    "read_bytes",
    "read_idx",
]


MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
MNIST_DEV_SIZE = 5000
DOWNLOAD_TIMEOUT_S = 60.0

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
MNIST_FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

_IDX_UINT8 = 0x08
_NUM_CLASSES = 10


@dataclass(frozen=True)
class FileSpec:
    """What one IDX file must contain.

    Attributes:
        sha256: hex SHA-256 of the uncompressed file content.
        shape: the array shape stored in the file.
    """

    sha256: str
    shape: tuple[int, ...]


# Digests of the uncompressed files: the published .gz archives have been recompressed by some
# mirrors, so only the uncompressed content is stable.
MNIST_SPECS: Mapping[str, FileSpec] = {
    TRAIN_IMAGES: FileSpec(
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", (60000, 28, 28)
    ),
    TRAIN_LABELS: FileSpec(
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", (60000,)
    ),
    TEST_IMAGES: FileSpec(
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", (10000, 28, 28)
    ),
    TEST_LABELS: FileSpec(
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", (10000,)
    ),
}


@dataclass(frozen=True, eq=False)
class Mnist:
    """MNIST in the paper's split.

    Attributes:
        train_x: float32 ``[N, 784]`` in [0, 1]; training images 5,000.. (55,000 unless limited).
        train_y: int32 ``[N]`` labels of ``train_x``.
        dev_x: float32 ``[5000, 784]``, the first 5,000 training images.
        dev_y: int32 ``[5000]``.
        test_x: float32 ``[10000, 784]``.
        test_y: int32 ``[10000]``.
        source: the folder the files were read from (or ``"tfds"``).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    dev_x: np.ndarray
    dev_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str


# ---------------------------------------------------------------------------------------------
# Reading files


def parse_idx(raw: bytes, source: str) -> np.ndarray:
    """Decode uncompressed IDX bytes holding unsigned bytes.

    The header is two zero bytes, a type byte (0x08 = uint8, the only type MNIST uses), the
    number of dimensions, then one big-endian uint32 per dimension.

    Args:
        raw: the uncompressed file content.
        source: the file name, used in error messages.

    Returns:
        A read-only uint8 array of the stored shape (a view of ``raw``).

    Raises:
        DataError: bad magic number, unsupported type, or a data size that does not match the
            dimensions exactly (truncated or trailing bytes).
    """
    if len(raw) < 4:
        raise DataError(f"{source}: {len(raw)} bytes, too short for an IDX header")
    zero0, zero1, type_code, ndim = raw[:4]
    if zero0 != 0 or zero1 != 0 or ndim == 0:
        raise DataError(
            f"{source}: bad IDX magic number 0x{raw[:4].hex()} "
            "(expected 0x0000TTNN: two zero bytes, type, number of dimensions)"
        )
    if type_code != _IDX_UINT8:
        raise DataError(f"{source}: IDX type 0x{type_code:02x} not supported (only 0x08 uint8)")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{source}: truncated IDX header: expected {header_len} bytes, found {len(raw)}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = math.prod(dims)
    found = len(raw) - header_len
    if found < expected:
        raise DataError(
            f"{source}: truncated file: expected {expected} data bytes for shape {dims}, "
            f"found {found}"
        )
    if found > expected:
        raise DataError(
            f"{source}: {found - expected} trailing bytes after the {expected} data bytes "
            f"of shape {dims}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header_len).reshape(dims)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file, gzip-compressed or not.

    Args:
        path: the file.

    Returns:
        A read-only uint8 array of the stored shape.

    Raises:
        DataError: unreadable file, corrupt gzip, or malformed IDX content.
    """
    return parse_idx(read_bytes(path), str(path))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_digest(data: bytes, spec: FileSpec, source: str) -> None:
    digest = _sha256(data)
    if digest != spec.sha256:
        raise DataError(
            f"{source}: SHA-256 of the uncompressed content is {digest}, expected {spec.sha256}"
        )


def _check_shape(array: np.ndarray, spec: FileSpec, source: str) -> None:
    if array.shape != spec.shape:
        raise DataError(f"{source}: expected shape {spec.shape}, found {array.shape}")


# ---------------------------------------------------------------------------------------------
# Locating files


def cache_dir() -> Path:
    """The user cache folder for MNIST: ``$XDG_CACHE_HOME/meprop_jax/mnist``.

    Falls back to ``~/.cache`` when ``XDG_CACHE_HOME`` is unset or empty.
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meprop_jax" / "mnist"


def _find_file(folder: Path, name: str) -> Path | None:
    """The file ``name`` or ``name.gz`` in ``folder`` (uncompressed preferred), if any."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing_files(folder: Path) -> list[str]:
    return [name for name in MNIST_FILES if _find_file(folder, name) is None]


def _complete_folder(root: Path) -> Path | None:
    """``root`` or ``root/mnist``, whichever holds all four files."""
    for folder in (root, root / "mnist"):
        if not _missing_files(folder):
            return folder
    return None


def locate_mnist(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Find the folder holding the four MNIST files.

    Args:
        data_dir: explicit folder (the files or an ``mnist/`` subfolder). When given, it is the
            only place looked at.

    Returns:
        The folder, or None when neither ``MEPROP_DATA_DIR`` nor the cache has the files.

    Raises:
        DataError: ``data_dir`` was given but lacks some files (the message lists them).
    """
    if data_dir is not None:
        root = Path(data_dir)
        found = _complete_folder(root)
        if found is None:
            # Report against mnist/ when it exists: that is the layout the user meant.
            folder = root / "mnist" if (root / "mnist").is_dir() else root
            missing = ", ".join(f"{n}[.gz]" for n in _missing_files(folder))
            raise DataError(f"MNIST data dir {folder} lacks: {missing}")
        return found
    env = os.environ.get(ENV_VAR)
    if env:
        found = _complete_folder(Path(env))
        if found is not None:
            return found
    cache = cache_dir()
    return cache if not _missing_files(cache) else None


def _where_to_put_files() -> str:
    names = "\n".join(f"    {n}  (or {n}.gz)" for n in MNIST_FILES)
    return (
        f"Put the four MNIST files\n{names}\n"
        "in one of:\n"
        f"  - the cache folder {cache_dir()}\n"
        f"  - a folder named by the environment variable {ENV_VAR} "
        "(holding the files or an mnist/ subfolder)\n"
        "  - a folder passed with --data-dir (data_dir=...)\n"
        f"They can be downloaded from {MNIST_URL}<name>.gz"
    )


# ---------------------------------------------------------------------------------------------
# Download


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        return response.read()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder then rename, so no partial file is visible."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_mnist(
    dest: str | os.PathLike[str] | None = None,
    *,
    expected: Mapping[str, FileSpec] = MNIST_SPECS,
    base_url: str = MNIST_URL,
) -> Path:
    """Download the MNIST files missing from ``dest`` and verify them.

    Every missing file is fetched and checked (SHA-256 of the uncompressed content, IDX
    structure) before any is written, so a failure leaves ``dest`` as it was.

    Args:
        dest: target folder; defaults to :func:`cache_dir`.
        expected: digests and shapes, by file name.
        base_url: URL prefix; ``<base_url><name>.gz`` is fetched.

    Returns:
        The folder.

    Raises:
        DataError: network failure (with instructions for a manual install) or a file that
            fails verification.
    """
    folder = Path(dest) if dest is not None else cache_dir()
    payloads: dict[str, bytes] = {}
    for name in _missing_files(folder):
        url = f"{base_url}{name}.gz"
        try:
            payload = _fetch(url)
        except (urllib.error.URLError, OSError) as exc:
            raise DataError(f"Downloading {url} failed: {exc}\n{_where_to_put_files()}") from exc
        content = gunzip_if_needed(payload, url)
        _check_digest(content, expected[name], url)
        _check_shape(parse_idx(content, url), expected[name], url)
        payloads[name] = payload
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in payloads.items():
        suffix = ".gz" if payload.startswith(GZIP_MAGIC) else ""
        _write_atomic(folder / f"{name}{suffix}", payload)
    return folder


# ---------------------------------------------------------------------------------------------
# Loading


def _read_checked(
    folder: Path, name: str, expected: Mapping[str, FileSpec], verify: bool
) -> tuple[np.ndarray, Path]:
    path = _find_file(folder, name)
    if path is None:
        raise DataError(f"{folder / name}[.gz]: file not found")
    content = read_bytes(path)
    if verify:
        _check_digest(content, expected[name], str(path))
    array = parse_idx(content, str(path))
    _check_shape(array, expected[name], str(path))
    return array, path


def _read_pair(
    folder: Path,
    images_name: str,
    labels_name: str,
    expected: Mapping[str, FileSpec],
    verify: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 ``[N, rows*cols]`` in [0, 1] and labels as int32 ``[N]``."""
    images, images_path = _read_checked(folder, images_name, expected, verify)
    labels, labels_path = _read_checked(folder, labels_name, expected, verify)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"{images_path}, {labels_path}: expected 3-D images and 1-D labels, "
            f"found shapes {images.shape} and {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= _NUM_CLASSES:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    x = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
    return x, labels.astype(np.int32)


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _split(
    x: np.ndarray, y: np.ndarray, dev_size: int, limit_train: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first ``dev_size`` examples are dev, the rest (optionally truncated) train."""
    if dev_size >= len(x):
        raise ValueError(f"dev_size={dev_size} leaves no training examples out of {len(x)}")
    stop = None if limit_train is None else dev_size + limit_train
    return x[dev_size:stop], y[dev_size:stop], x[:dev_size], y[:dev_size]


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    limit_train: int | None = None,
    verify: bool = False,
    expected: Mapping[str, FileSpec] = MNIST_SPECS,
    dev_size: int = MNIST_DEV_SIZE,
) -> Mnist:
    """Load MNIST in the paper's split: 55,000 train, 5,000 dev (the first 5,000), 10,000 test.

    Args:
        data_dir: explicit folder (files or ``mnist/`` subfolder); see the module docstring for
            the lookup order when None.
        download: fetch the files into the cache when they are nowhere to be found.
        limit_train: keep only the first N training examples (after the dev ones); a value
            above the number available keeps them all.
        verify: also check the SHA-256 of local files (downloads are always checked).
        expected: digests and shapes by file name; shapes are always checked.
        dev_size: number of leading training examples held out as dev.

    Returns:
        The split data; ``source`` is the folder read.

    Raises:
        DataError: files missing (with instructions), malformed, or failing verification.
        ValueError: ``limit_train`` or ``dev_size`` out of range.
    """
    if limit_train is not None:
        _check_positive_int(limit_train, "limit_train")
    _check_positive_int(dev_size, "dev_size")
    folder = locate_mnist(data_dir)
    if folder is None:
        if not download:
            raise DataError(f"MNIST not found and download is disabled.\n{_where_to_put_files()}")
        folder = download_mnist(expected=expected)
    all_x, all_y = _read_pair(folder, TRAIN_IMAGES, TRAIN_LABELS, expected, verify)
    test_x, test_y = _read_pair(folder, TEST_IMAGES, TEST_LABELS, expected, verify)
    train_x, train_y, dev_x, dev_y = _split(all_x, all_y, dev_size, limit_train)
    return Mnist(train_x, train_y, dev_x, dev_y, test_x, test_y, source=str(folder))


def load_mnist_tfds(limit_train: int | None = None) -> Mnist:
    """Load MNIST through tensorflow-datasets, split like :func:`load_mnist`.

    tfds stores the examples in its own order, so the 5,000 dev examples are not the same
    images as with the IDX route. Preparing the dataset needs TensorFlow and network access.

    Args:
        limit_train: keep only the first N training examples after the dev ones.

    Returns:
        The split data with ``source="tfds"``.

    Raises:
        ImportError: tensorflow-datasets is not installed.
    """
    if limit_train is not None:
        _check_positive_int(limit_train, "limit_train")
    try:
        import tensorflow_datasets as tfds  # optional dependency, imported only here
    except ImportError as exc:
        raise ImportError(
            "load_mnist_tfds needs tensorflow-datasets: pip install 'meprop_jax[tfds]'. "
            "tfds also needs TensorFlow to prepare MNIST (it cannot build it from local IDX "
            "files without TensorFlow); load_mnist() reads the IDX files directly."
        ) from exc

    def as_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        data = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1))
        x = np.asarray(data["image"]).reshape(len(data["label"]), -1)
        return x.astype(np.float32) / np.float32(255.0), np.asarray(data["label"], np.int32)

    all_x, all_y = as_arrays("train")
    test_x, test_y = as_arrays("test")
    train_x, train_y, dev_x, dev_y = _split(all_x, all_y, MNIST_DEV_SIZE, limit_train)
    return Mnist(train_x, train_y, dev_x, dev_y, test_x, test_y, source="tfds")
