"""Tests for experiments.mnist.data on tiny IDX files (and, marked `data`, the real MNIST)."""

import gzip
import hashlib
import io
import os
import struct
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from experiments.mnist import data as mnist_data
from experiments.mnist.data import (
    MNIST_FILES,
    DataError,
    FileSpec,
    load_mnist,
    load_mnist_tfds,
    locate_mnist,
    read_idx,
)

# Captured at import, before the autouse fixture clears the variable for the other tests.
REAL_DATA_DIR = os.environ.get("MEPROP_DATA_DIR")

TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = MNIST_FILES


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_arrays(seed: int = 0, n_train: int = 6, n_test: int = 3) -> dict[str, np.ndarray]:
    """A miniature MNIST: 4x4 images, labels 0..9."""
    rng = np.random.default_rng(seed)
    return {
        TRAIN_IMAGES: rng.integers(0, 256, (n_train, 4, 4), dtype=np.uint8),
        TRAIN_LABELS: rng.integers(0, 10, n_train, dtype=np.uint8),
        TEST_IMAGES: rng.integers(0, 256, (n_test, 4, 4), dtype=np.uint8),
        TEST_LABELS: rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def specs_for(arrays: dict[str, np.ndarray]) -> dict[str, FileSpec]:
    """The `expected` table matching `arrays`."""
    return {
        name: FileSpec(hashlib.sha256(idx_bytes(a)).hexdigest(), a.shape)
        for name, a in arrays.items()
    }


def write_set(folder: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No real cache, no env var, no network unless a test installs a fake opener."""
    monkeypatch.delenv("MEPROP_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def no_network(url: str, timeout: float | None = None) -> io.BytesIO:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return tmp_path / "xdg" / "meprop_jax" / "mnist"


TINY = tiny_arrays()
TINY_SPECS = specs_for(TINY)


def load_tiny(data_dir: Path | None = None, **kwargs) -> mnist_data.Mnist:
    kwargs.setdefault("expected", TINY_SPECS)
    kwargs.setdefault("dev_size", 2)
    return load_mnist(data_dir, **kwargs)


# --- IDX parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(array)
    # The name says nothing about compression: detection is by magic bytes.
    path = tmp_path / "file.bin"
    path.write_bytes(gzip.compress(data) if compress else data)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_labels_1d(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.array([3, 1, 4], np.uint8)))
    out = read_idx(path)
    assert out.shape == (3,) and out.dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (idx_bytes(np.zeros((2, 3), np.uint8))[:-1], r"truncated file: expected 6 .* found 5"),
        (idx_bytes(np.zeros((2, 3), np.uint8)) + b"xx", r"2 trailing bytes"),
        (b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00", r"bad IDX magic"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00", r"type 0x0d"),
        (b"\x00\x00\x08\x02\x00", r"truncated IDX header"),
        (b"\x00\x00", r"too short"),
    ],
    ids=["truncated", "trailing", "bad-magic", "bad-type", "short-header", "tiny"],
)
def test_read_idx_errors(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "broken-idx"
    path.write_bytes(data)
    with pytest.raises(DataError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 3), np.uint8)))[:-10])
    with pytest.raises(DataError, match=r"cut\.gz.*gzip"):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 40)
    with pytest.raises(DataError, match=r"bad\.gz.*gzip"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope"):
        read_idx(tmp_path / "nope")


# --- loading and checks --------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_load_round_trip_and_split(tmp_path: Path, compress: bool) -> None:
    folder = write_set(tmp_path / "d", TINY, compress=compress)
    data = load_tiny(folder)
    all_x = TINY[TRAIN_IMAGES].reshape(6, 16).astype(np.float32) / 255
    np.testing.assert_allclose(data.dev_x, all_x[:2])
    np.testing.assert_allclose(data.train_x, all_x[2:])
    np.testing.assert_array_equal(data.dev_y, TINY[TRAIN_LABELS][:2])
    np.testing.assert_array_equal(data.train_y, TINY[TRAIN_LABELS][2:])
    np.testing.assert_array_equal(data.test_y, TINY[TEST_LABELS])
    assert data.train_x.dtype == np.float32 and data.train_y.dtype == np.int32
    assert data.test_x.shape == (3, 16)
    assert data.source == str(folder)


def test_limit_train(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "d", TINY)
    data = load_tiny(folder, limit_train=3)
    assert len(data.train_x) == 3 and len(data.dev_x) == 2
    np.testing.assert_array_equal(data.train_y, TINY[TRAIN_LABELS][2:5])
    assert len(load_tiny(folder, limit_train=100).train_x) == 4


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_limit_train_validated(tmp_path: Path, bad: object) -> None:
    folder = write_set(tmp_path / "d", TINY)
    with pytest.raises(ValueError, match="limit_train"):
        load_tiny(folder, limit_train=bad)


def test_count_mismatch_names_both_files(tmp_path: Path) -> None:
    arrays = dict(TINY)
    arrays[TRAIN_LABELS] = TINY[TRAIN_LABELS][:5]
    folder = write_set(tmp_path / "d", arrays)
    with pytest.raises(DataError, match=rf"{TRAIN_IMAGES}.*6 images.*{TRAIN_LABELS}.*5 labels"):
        load_tiny(folder, expected=specs_for(arrays))


def test_unexpected_shape(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "d", TINY)
    specs = dict(TINY_SPECS)
    specs[TEST_IMAGES] = FileSpec(specs[TEST_IMAGES].sha256, (10000, 28, 28))
    with pytest.raises(DataError, match=rf"{TEST_IMAGES}.*expected shape \(10000, 28, 28\)"):
        load_tiny(folder, expected=specs)


def test_label_out_of_range(tmp_path: Path) -> None:
    arrays = dict(TINY)
    arrays[TEST_LABELS] = np.array([1, 12, 3], np.uint8)
    folder = write_set(tmp_path / "d", arrays)
    with pytest.raises(DataError, match=rf"{TEST_LABELS}.*label 12"):
        load_tiny(folder, expected=specs_for(arrays))


def test_verify_local_checksums(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "d", TINY)
    load_tiny(folder, verify=True)
    specs = dict(TINY_SPECS)
    specs[TRAIN_LABELS] = FileSpec("0" * 64, specs[TRAIN_LABELS].shape)
    with pytest.raises(DataError, match=rf"{TRAIN_LABELS}.*SHA-256"):
        load_tiny(folder, verify=True, expected=specs)
    load_tiny(folder, verify=False, expected=specs)  # local files are not hashed by default


# --- lookup order --------------------------------------------------------------------------


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_env: Path) -> None:
    explicit = write_set(tmp_path / "explicit", tiny_arrays(1))
    env_root = tmp_path / "env"
    env_mnist = write_set(env_root / "mnist", tiny_arrays(2))
    cache = write_set(isolated_env, tiny_arrays(3))

    assert locate_mnist() == cache
    monkeypatch.setenv("MEPROP_DATA_DIR", str(env_root))
    assert locate_mnist() == env_mnist
    assert locate_mnist(explicit) == explicit
    assert load_tiny(explicit).source == str(explicit)
    assert load_tiny().source == str(env_mnist)


def test_env_var_flat_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flat = write_set(tmp_path / "flat", TINY, compress=False)
    monkeypatch.setenv("MEPROP_DATA_DIR", str(flat))
    assert locate_mnist() == flat


def test_env_var_without_files_falls_back_to_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    cache = write_set(isolated_env, TINY)
    monkeypatch.setenv("MEPROP_DATA_DIR", str(tmp_path / "empty"))
    assert locate_mnist() == cache


def test_data_dir_subfolder_layout(tmp_path: Path) -> None:
    nested = write_set(tmp_path / "root" / "mnist", TINY)
    assert locate_mnist(tmp_path / "root") == nested


def test_explicit_dir_missing_files(tmp_path: Path, isolated_env: Path) -> None:
    write_set(isolated_env, TINY)  # present in the cache, but an explicit dir wins
    partial = tmp_path / "partial"
    write_set(partial, {TRAIN_IMAGES: TINY[TRAIN_IMAGES], TEST_LABELS: TINY[TEST_LABELS]})
    with pytest.raises(DataError) as info:
        load_tiny(partial)
    message = str(info.value)
    assert str(partial) in message
    assert TRAIN_LABELS in message and TEST_IMAGES in message
    assert TRAIN_IMAGES not in message


def test_nothing_found_download_disabled(isolated_env: Path) -> None:
    with pytest.raises(DataError) as info:
        load_tiny(download=False)
    message = str(info.value)
    assert str(isolated_env) in message
    assert "MEPROP_DATA_DIR" in message and "--data-dir" in message
    assert all(name in message for name in MNIST_FILES)


# --- download ------------------------------------------------------------------------------


def fake_opener(served: dict[str, bytes], log: list[str]):
    def urlopen(url: str, timeout: float | None = None) -> io.BytesIO:
        log.append(url)
        return io.BytesIO(served[url.rsplit("/", 1)[-1]])

    return urlopen


def served_files(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {f"{name}.gz": gzip.compress(idx_bytes(a)) for name, a in arrays.items()}


def test_download_good_checksum(monkeypatch: pytest.MonkeyPatch, isolated_env: Path) -> None:
    log: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_opener(served_files(TINY), log))
    data = load_tiny()
    assert data.source == str(isolated_env)
    assert sorted(p.name for p in isolated_env.iterdir()) == sorted(f"{n}.gz" for n in MNIST_FILES)
    assert log == [f"{mnist_data.MNIST_URL}{name}.gz" for name in MNIST_FILES]
    np.testing.assert_array_equal(data.test_y, TINY[TEST_LABELS])
    # Second load comes from the cache.
    log.clear()
    load_tiny()
    assert log == []


def test_download_bad_checksum_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, isolated_env: Path
) -> None:
    served = served_files(TINY)
    tampered = TINY[TEST_LABELS].copy()
    tampered[0] = (tampered[0] + 1) % 10
    served[f"{TEST_LABELS}.gz"] = gzip.compress(idx_bytes(tampered))
    monkeypatch.setattr(urllib.request, "urlopen", fake_opener(served, []))
    with pytest.raises(DataError, match=rf"{TEST_LABELS}.*SHA-256"):
        load_tiny()
    assert not isolated_env.exists() or list(isolated_env.iterdir()) == []


def test_download_network_failure_says_where_to_put_files(isolated_env: Path) -> None:
    with pytest.raises(DataError, match="network disabled") as info:
        load_tiny()
    message = str(info.value)
    assert str(isolated_env) in message and "MEPROP_DATA_DIR" in message
    assert all(name in message for name in MNIST_FILES)


def test_download_only_missing(monkeypatch: pytest.MonkeyPatch, isolated_env: Path) -> None:
    write_set(isolated_env, {TRAIN_IMAGES: TINY[TRAIN_IMAGES]})
    log: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_opener(served_files(TINY), log))
    load_tiny()
    assert len(log) == 3 and not any(TRAIN_IMAGES in url for url in log)


# --- tfds route ----------------------------------------------------------------------------


def test_tfds_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'meprop_jax\[tfds\]'.*TensorFlow"):
        load_mnist_tfds()


# --- real data -----------------------------------------------------------------------------
def locate_mnist_or_none(root: Path) -> Path | None:
    try:
        return locate_mnist(root)
    except DataError:
        return None


@pytest.mark.data
def test_real_mnist() -> None:
    if not REAL_DATA_DIR:
        pytest.skip("MEPROP_DATA_DIR is not set")
    if locate_mnist_or_none(Path(REAL_DATA_DIR)) is None:
        pytest.skip(f"no MNIST files under {REAL_DATA_DIR}")
    data = load_mnist(REAL_DATA_DIR, download=False, verify=True)
    assert data.train_x.shape == (55000, 784)
    assert data.dev_x.shape == (5000, 784)
    assert data.test_x.shape == (10000, 784)
    assert data.train_y.shape == (55000,) and data.dev_y.shape == (5000,)
    assert data.test_y.shape == (10000,)
    for x in (data.train_x, data.dev_x, data.test_x):
        assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    for y in (data.train_y, data.dev_y, data.test_y):
        assert y.dtype == np.int32
    counts = np.bincount(np.concatenate([data.dev_y, data.train_y]), minlength=10)
    expected = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert counts.tolist() == expected
