"""Tests for the MNIST command line, experiments.mnist.cli, on tiny IDX files (and, marked
``data``, on the real MNIST under MEPROP_DATA_DIR)."""

import contextlib
import functools
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from experiments.loop import ConfigError
from experiments.mnist import cli
from experiments.mnist import task as mnist_task
from experiments.mnist.data import MNIST_DEV_SIZE, MNIST_FILES, FileSpec, load_mnist
from meprop_jax._src import native

REAL_DATA_DIR = os.environ.get("MEPROP_DATA_DIR")
REPO = Path(__file__).resolve().parents[3]
N_TRAIN, N_TEST, SIDE = 96, 40, 4
METRICS = ("epoch", "loss", "dev_acc", "test_acc", "dev_loss", "test_loss", "steps")


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: two zero bytes, type 0x08, ndim, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_tiny_mnist(folder: Path) -> dict[str, FileSpec]:
    """Writes 4x4 "images" (5,000 dev + 96 train, 40 test) whose labels follow a fixed
    linear rule of the pixels, so that the MLP can learn something; returns the ``expected``
    table the reader needs to accept these shapes."""
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(SIDE * SIDE, 10))
    folder.mkdir(parents=True, exist_ok=True)
    specs = {}
    for images_name, labels_name, n in (
        (MNIST_FILES[0], MNIST_FILES[1], MNIST_DEV_SIZE + N_TRAIN),
        (MNIST_FILES[2], MNIST_FILES[3], N_TEST),
    ):
        images = rng.integers(0, 256, (n, SIDE, SIDE), dtype=np.uint8)
        labels = np.argmax((images.reshape(n, -1) / 255.0 - 0.5) @ teacher, axis=1)
        for name, array in ((images_name, images), (labels_name, labels.astype(np.uint8))):
            data = idx_bytes(array)
            (folder / name).write_bytes(data)
            specs[name] = FileSpec(hashlib.sha256(data).hexdigest(), array.shape)
    return specs


# The reader insists on MNIST's shapes unless told otherwise; so does this, in a subprocess.
SUBPROCESS_MAIN = """
import functools, json, sys
from experiments.mnist import cli, task
from experiments.mnist import data as mnist_data
specs = {k: mnist_data.FileSpec(v[0], tuple(v[1])) for k, v in json.loads(sys.argv[1]).items()}
task.load_mnist = functools.partial(mnist_data.load_mnist, expected=specs)
sys.exit(cli.main(sys.argv[2:]))
"""


def tiny_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """A small, fast configuration (one device so that it matches a subprocess)."""
    return [
        "--data-dir", str(data_dir), "--out", str(out), "--hidden", "16", "--k", "4",
        "--mode", "per-example", "--dropout", "0.1", "--batch-size", "8", "--devices", "1",
        "--epochs", "2", "--timing-batches", "3", "--chunk-steps", "4", *extra,
    ]  # fmt: skip


def metrics(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: r[k] for k in METRICS} for r in history]


@pytest.fixture(scope="module")
def tiny_run(
    tiny_files: tuple[Path, dict[str, FileSpec]],
    cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """A 2-epoch CLI run on the tiny files: its results.json and printed output."""
    folder, specs = tiny_files
    out = tmp_path_factory.mktemp("tiny-run")
    capture: list[str] = []
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(_Tee(capture)),
    ):
        patch.setattr(mnist_task, "load_mnist", functools.partial(load_mnist, expected=specs))
        code = cli.main(tiny_args(folder, out))
    assert code == 0
    return {
        "out": out,
        "stdout": "".join(capture),
        "results": json.loads((out / "results.json").read_text()),
    }


class _Tee:
    """A write-only stream that keeps what is printed."""

    def __init__(self, sink: list[str]) -> None:
        self.sink = sink

    def write(self, text: str) -> int:
        self.sink.append(text)
        return len(text)

    def flush(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_cli_run_writes_results(tiny_run: dict[str, Any]) -> None:
    results, out = tiny_run["results"], tiny_run["out"]
    cfg = results["config"]
    assert cfg["task"] == "mnist" and cfg["hidden"] == 16 and cfg["layers"] == 2
    assert cfg["k"] == 4 and cfg["mode"] == "per-example" and cfg["k_output"] == 0
    assert cfg["batch_size"] == 8 and cfg["train_size"] == N_TRAIN and cfg["input_dim"] == 16
    assert cfg["dev_size"] == MNIST_DEV_SIZE and cfg["test_size"] == N_TEST
    assert cfg["optimizer"] == "adam" and cfg["lr"] == 1e-3 and cfg["epochs"] == 2
    assert results["status"] == "complete" and results["num_devices"] == 1
    assert results["backend"] == "cpu" and results["jax_version"] == jax.__version__
    assert [r["epoch"] for r in results["epochs"]] == [1, 2]
    for record in results["epochs"]:
        assert record["steps"] == N_TRAIN // 8
        for field in ("forward_s", "backward_s", "update_s", "train_wall_s", "eval_s"):
            assert record["timing"][field] >= 0.0
    best = results["best"]
    assert set(best) == {"epoch", "dev_acc", "test_acc"}
    assert best["dev_acc"] == max(r["dev_acc"] for r in results["epochs"])
    assert (out / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    assert f"best epoch {best['epoch']}: dev {best['dev_acc']:.2f}%" in tiny_run["stdout"]
    assert "forward" in tiny_run["stdout"] and "backward" in tiny_run["stdout"]


@pytest.mark.slow
def test_sigint_saves_checkpoint_and_resume_continues(
    tiny_files: tuple[Path, dict[str, FileSpec]],
    tiny_dir: Path,
    tiny_run: dict[str, Any],
    cache_dir: Path,
    tmp_path: Path,
) -> None:
    """Ctrl-C a real process mid-run: exit 130, a checkpoint, and a resume command whose
    run reproduces the uninterrupted one."""
    out = tmp_path / "run"
    args = tiny_args(tiny_dir, out, "--epochs", "500", "--timing-batches", "0")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PLATFORMS": "cpu",
    }
    specs = {name: [spec.sha256, list(spec.shape)] for name, spec in tiny_files[1].items()}
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBPROCESS_MAIN, json.dumps(specs), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("epoch 1/500") or not line:
                break
        assert lines[-1].startswith("epoch 1/500"), "".join(lines) + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "SIGINT" in stderr and "--resume" in stderr and str(out) in stderr
    results = json.loads((out / "results.json").read_text())
    done = len(results["epochs"])
    assert results["status"] == "interrupted" and 1 <= done < 500
    assert (out / "checkpoints" / str(done)).is_dir()

    resume_args = [*args[: args.index("--epochs")], "--epochs", str(done + 1), "--resume"]
    assert cli.main(resume_args) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["status"] == "complete" and len(resumed["epochs"]) == done + 1
    # Epoch 1 ran in another process, whose XLA may split the work over threads differently:
    # equal up to float reassociation (the in-process resume test demands exact equality).
    want = metrics(tiny_run["results"]["epochs"])
    assert metrics(resumed["epochs"])[:2] == [pytest.approx(r, rel=1e-5) for r in want]


@pytest.mark.slow
def test_the_same_command_again_says_where_the_results_are(
    tiny_dir: Path, tiny_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The Quick start run twice: the second says where the first one's results are, exits 0
    and writes nothing; asked for more epochs, it says how to resume."""
    out = tiny_run["out"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main(tiny_args(tiny_dir, out)) == 0
    said = capsys.readouterr().out
    assert "finished after 2 epochs" in said and str(out / "results.json") in said
    assert cli.main(tiny_args(tiny_dir, out, "--epochs", "3")) == 2
    err = capsys.readouterr().err
    assert "stopped after epoch 2 of 3" in err and "--resume" in err and "--overwrite" in err
    assert "python -m experiments.mnist" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_data_errors_come_before_the_run_folder_check(
    tiny_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--data-dir /empty over a finished run: the real error, not the run folder's."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        cli.main(tiny_args(tmp_path / "empty", tiny_run["out"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'} lacks" in err and "finished" not in err


# ---------------------------------------------------------------------------------------------
# Refusals before training


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training begins with the task's ``init``: make it fail the test."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(mnist_task.MnistTask, "init", fail)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--k", "600", "--hidden", "500"], ["--k 600", "--hidden 500"]),
        (["--k", "500"], ["--k 500", "--hidden 500"]),
        (["--k", "-1"], ["--k"]),
        (["--mode", "topk"], ["--mode", "topk"]),
        (["--epochs", "0"], ["--epochs"]),
        (["--epochs", "-2"], ["--epochs"]),
        (["--limit-train", "0"], ["--limit-train"]),
        (["--layers", "0"], ["--layers"]),
        (["--layers", "6"], ["--layers"]),
        (["--batch-size", "50", "--devices", "8"], ["--batch-size 50", "--devices"]),
        (["--batch-size", "8", "--devices", "3"], ["--batch-size 8", "--devices"]),
        (["--eval-batch-size", "100", "--devices", "8", "--batch-size", "8"], ["--eval-batch"]),
        (["--devices", "9"], ["--devices"]),
        (["--k-output", "10"], ["--k-output"]),
        (["--kdim", "--k", "0"], ["--kdim"]),
        (["--kdim", "--k", "20", "--hidden", "300"], ["--kdim", "--hidden 300"]),
        (["--kdim", "--k", "20", "--hidden", "500"], ["--kdim", "--hidden 500"]),
        (["--kdim", "--k", "20", "--mode", "per-example"], ["--kdim", "--mode per-example"]),
        (["--kdim", "--k", "20", "--mode", "unified"], ["--kdim", "--mode unified"]),
        (["--kdim", "--k", "9", "--hidden", "9", "--mode", "random"], ["--hidden 9", "--mode"]),
        (["--dropout", "1.0"], ["--dropout"]),
        (["--optimizer", "rmsprop"], ["--optimizer"]),
        (["--lr", "0"], ["--lr"]),
        (["--sparse-update", "--k", "0"], ["--sparse-update", "--k >= 1"]),
        (["--sparse-update", "--kdim", "--k", "5"], ["--sparse-update", "--kdim"]),
        (["--kernel-grad", "compact", "--k", "0"], ["--kernel-grad compact", "--k 0"]),
        (["--kernel-grad", "compact", "--mesimp"], ["--kernel-grad compact", "--mesimp"]),
        (
            ["--kernel-grad", "compact", "--error-feedback", "0.1"],
            ["--kernel-grad compact", "--error-feedback"],
        ),
        (["--kernel-grad", "dense"], ["--kernel-grad", "dense"]),
        (["--kernel-grad", "factored", "--mode", "unified"], ["--kernel-grad factored", "--mode"]),
    ],
)
def test_bad_arguments_rejected_before_training(
    argv: list[str],
    named: list[str],
    no_training: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for name in named:
        assert name in err
    assert not (tmp_path / "results.json").exists()


def test_missing_data_rejected_before_training(
    no_training: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "run"),
                    "--devices", "1"])  # fmt: skip
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "absent" in err and "lacks" in err and MNIST_FILES[0] in err


def test_data_dir_without_files_does_not_fall_back(
    no_training: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An explicit --data-dir is the only place looked at, even when $MEPROP_DATA_DIR has
    the files."""
    env_dir = tmp_path / "env" / "mnist"
    env_dir.mkdir(parents=True)
    for name in MNIST_FILES:
        (env_dir / name).write_bytes(b"")
    monkeypatch.setenv("MEPROP_DATA_DIR", str(env_dir.parent))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "run"),
                    "--devices", "1"])  # fmt: skip
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'} lacks" in err and "env" not in err


# ---------------------------------------------------------------------------------------------
# Pieces


def settings(*argv: str, devices: int = 1) -> mnist_task.MnistSettings:
    return cli.settings_from_args(cli.build_parser().parse_args(list(argv)), devices)


def test_defaults_are_documented_ones() -> None:
    s = settings()
    assert (s.hidden, s.layers, s.k, s.mode, s.k_output) == (500, 2, 30, "unified", 0)
    assert (s.batch_size, s.eval_batch_size, s.dropout, s.kdim) == (50, 1000, 0.0, False)
    # Rounded up so that it splits over 3 devices.
    assert settings("--batch-size", "48", devices=3).eval_batch_size == 1002
    args = cli.build_parser().parse_args([])
    assert (args.epochs, args.optimizer, args.lr, args.seed, args.clip) == (
        20,
        "adam",
        None,
        0,
        0.0,
    )
    assert cli.default_out(s, args) == Path("runs/mnist-k30-unified-h500x2-adam-b50-s0")
    assert settings("--mode", "per_example").mode == "per-example"


def test_kernel_layout_auto_is_out_in_for_per_row_modes_only() -> None:
    assert settings("--mode", "per-example", "--k", "20").kernel_layout == "out_in"
    assert settings("--mode", "random", "--k", "20").kernel_layout == "out_in"
    assert settings("--mode", "unified").kernel_layout == "in_out"
    assert settings("--mode", "per-example", "--k", "0").kernel_layout == "in_out"
    assert settings("--mode", "per-example", "--mesimp").kernel_layout == "in_out"
    assert settings("--mode", "per-example", "--sparse-update").kernel_layout == "out_in"
    s = settings("--mode", "per-example", "--kernel-layout", "in_out")
    assert s.kernel_layout == "in_out"
    s = settings("--kernel-layout", "out_in")
    assert s.model().kernel_layout == "out_in"
    with pytest.raises(ConfigError, match="kernel-layout"):
        settings("--mode", "per-example", "--mesimp", "--kernel-layout", "out_in")


def test_kernel_grad_auto_is_compact_on_out_in_kernels_only() -> None:
    s = settings("--mode", "per-example", "--k", "20")
    assert s.kernel_layout == "out_in" and s.compact_gradients and s.taps
    assert settings("--mode", "random", "--k", "20").compact_gradients
    for argv in (
        ("--mode", "per-example", "--k", "20", "--kernel-layout", "in_out"),
        ("--mode", "per-example", "--k", "20", "--kernel-grad", "masked"),
        (
            "--mode",
            "unified",
        ),
        (
            "--k",
            "0",
        ),
        ("--kdim", "--k", "20"),
        ("--mode", "per-example", "--k", "20", "--mesimp"),
        ("--mode", "unified", "--k", "20", "--adaptive-k"),
        ("--mode", "per-example", "--k", "20", "--model", "cnn"),
    ):
        s = settings(*argv)
        assert not s.compact_gradients, argv  # masked where compact is not the faster form
    s = settings("--mode", "per-example", "--k", "20", "--sparse-update")
    assert not s.compact_gradients and s.sparse_update and s.taps


def test_kernel_grad_compact_gives_the_layers_taps() -> None:
    s = settings("--mode", "per-example", "--k", "20", "--kernel-grad", "masked")
    assert not s.compact_gradients and not s.taps
    s = settings("--mode", "per-example", "--k", "20", "--kernel-grad", "compact")
    assert s.compact_gradients and not s.sparse_update and s.taps
    assert s.model().sparse_update  # the layers hand compact gradients through their taps
    assert settings("--mode", "unified", "--kernel-grad", "compact").compact_gradients
    # --sparse-update has compact gradients too, with the lazy rule.
    s = settings("--mode", "per-example", "--kernel-grad", "compact", "--sparse-update")
    assert not s.compact_gradients and s.sparse_update and s.taps


def test_kernel_grad_factored_keeps_compact_gradients_as_factors() -> None:
    s = settings("--mode", "per-example", "--k", "20", "--kernel-grad", "factored")
    assert s.compact_gradients and s.factored_gradients and s.taps
    assert s.model().factored_grad and s.model().sparse_update
    s = settings("--mode", "random", "--k", "20", "--kernel-grad", "factored", "--sparse-update")
    assert s.sparse_update and s.factored_gradients and not s.compact_gradients
    # auto keeps them as factors under either rule, the fastest MNIST epochs on a CPU.
    for mode in ("per-example", "random"):
        s = settings("--mode", mode, "--k", "20")
        assert s.compact_gradients and s.factored_gradients and s.model().factored_grad
        s = settings("--mode", mode, "--k", "20", "--sparse-update")
        assert s.sparse_update and s.factored_gradients and s.model().factored_grad
    # ... but not where the kernels are stored [in, out], nor where a form is asked for.
    for argv in (
        ("--kernel-layout", "in_out"),
        ("--kernel-grad", "masked"),
        ("--kernel-grad", "compact"),
    ):
        lazy = settings("--mode", "per-example", "--k", "20", "--sparse-update", *argv)
        assert not lazy.factored_gradients, argv
    assert not settings(
        "--mode", "per-example", "--k", "20", "--kernel-grad", "compact"
    ).factored_gradients
    assert not settings(
        "--mode", "unified", "--k", "20", "--kernel-layout", "out_in"
    ).factored_gradients


def _run_kernel_grad_forms(
    tiny_dir: Path, tmp_path: Path, forms: tuple[str, ...]
) -> dict[str, Any]:
    """``results.json`` of a tiny per-example run under each ``--kernel-grad`` form."""
    results = {}
    for form in forms:
        out = tmp_path / form
        argv = tiny_args(tiny_dir, out, "--mode", "per-example", "--hidden", "64", "--k", "2")
        assert cli.main([*argv, "--kernel-grad", form]) == 0
        results[form] = json.loads((out / "results.json").read_text())
    return results


@pytest.mark.slow
def test_factored_kernel_grad_trains_as_the_compact_one(
    tiny_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # The same gradients in two forms. The native Adam pass sums a factored row in the
    # block's order (the same bits); the XLA path builds the block by another product.
    results = _run_kernel_grad_forms(tiny_dir, tmp_path, ("compact", "factored"))
    assert results["factored"]["config"]["factored_gradients"] is True
    assert results["compact"]["config"]["factored_gradients"] is False
    for a, b in zip(results["compact"]["epochs"], results["factored"]["epochs"], strict=True):
        if native.enabled():
            assert (a["loss"], a["dev_acc"], a["test_acc"]) == (
                b["loss"],
                b["dev_acc"],
                b["test_acc"],
            )
        else:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.slow
def test_compact_kernel_grad_trains_as_the_masked_one(
    tiny_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # Same updates (the authors' Adam over every weight); only the kernel gradient's form
    # differs. On the XLA path the two programs compute the same numbers.
    with native.disabled():
        results = _run_kernel_grad_forms(tiny_dir, tmp_path, ("masked", "compact"))
    assert results["compact"]["config"]["compact_gradients"] is True
    assert results["masked"]["config"]["compact_gradients"] is False
    for a, b in zip(results["masked"]["epochs"], results["compact"]["epochs"], strict=True):
        assert (a["loss"], a["dev_acc"], a["test_acc"]) == (b["loss"], b["dev_acc"], b["test_acc"])


@pytest.mark.parametrize(
    ("started", "layout"),
    [(("--kernel-grad", "masked"), "out_in"), (("--kernel-layout", "in_out"), "in_out")],
    ids=["masked", "in_out"],
)
def test_resume_keeps_the_forms_the_run_started_with(
    started: tuple[str, ...],
    layout: str,
    tiny_dir: Path,
    cache_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A run started with the masked form or the stock layout (as before the auto flags
    # picked compact gradients and [out, in] kernels) goes on with them under the defaults;
    # an explicit flag that contradicts the run is refused, naming the setting.
    out = tmp_path / "run"
    assert cli.main(tiny_args(tiny_dir, out, "--epochs", "1", *started)) == 0
    resumed = tiny_args(tiny_dir, out, "--resume")
    with pytest.raises(SystemExit) as exc:
        cli.main([*resumed, "--kernel-grad", "compact", "--kernel-layout", "out_in"])
    assert exc.value.code == 2 and "compact_gradients" in capsys.readouterr().err
    assert cli.main(resumed) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["compact_gradients"] is False
    assert results["config"]["kernel_layout"] == layout
    assert [e["epoch"] for e in results["epochs"]] == [1, 2]


def test_resume_of_a_run_with_the_block_keeps_the_block(
    tiny_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # A run started with compact gradients as the block (auto's choice before it chose the
    # factors) goes on with the block under the defaults.
    out = tmp_path / "run"
    assert cli.main(tiny_args(tiny_dir, out, "--epochs", "1", "--kernel-grad", "compact")) == 0
    assert cli.main(tiny_args(tiny_dir, out, "--resume")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["compact_gradients"] is True
    assert results["config"]["factored_gradients"] is False
    assert [e["epoch"] for e in results["epochs"]] == [1, 2]


def test_resume_of_a_lazy_run_keeps_its_form(
    tiny_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # A --sparse-update run started with the block (auto's choice under the lazy rule before
    # it chose the factors) goes on with the block under the defaults.
    out = tmp_path / "run"
    lazy = ("--mode", "per-example", "--hidden", "64", "--k", "2", "--sparse-update")
    started = tiny_args(tiny_dir, out, "--epochs", "1", *lazy, "--kernel-grad", "compact")
    assert cli.main(started) == 0
    assert cli.main(tiny_args(tiny_dir, out, *lazy, "--resume")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["factored_gradients"] is False
    assert [e["epoch"] for e in results["epochs"]] == [1, 2]
    # One started with the factors goes on with them.
    out = tmp_path / "factored"
    assert cli.main(tiny_args(tiny_dir, out, "--epochs", "1", *lazy)) == 0
    assert cli.main(tiny_args(tiny_dir, out, *lazy, "--resume")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["factored_gradients"] is True
    assert [e["epoch"] for e in results["epochs"]] == [1, 2]


def test_kdim_builds_a_dense_mlp_of_width_k() -> None:
    s = settings("--kdim", "--k", "20", "--layers", "3")
    assert (s.hidden, s.k, s.mode, s.kdim) == (20, 0, "unified", True)
    model = s.model()
    assert model.k == 0 and model.hidden == (20, 20, 20)
    args = cli.build_parser().parse_args([])
    assert cli.default_out(s, args) == Path("runs/mnist-kdim20-h20x3-adam-b50-s0")
    # --k-output concerns the output layer only, and is honoured.
    assert settings("--kdim", "--k", "20", "--k-output", "3").model().k_output == 3


def test_explicit_hidden_and_mode_equal_the_defaults() -> None:
    assert settings("--hidden", "500", "--mode", "unified") == settings()


# ---------------------------------------------------------------------------------------------
# Real data


@pytest.mark.data
@pytest.mark.skipif(not REAL_DATA_DIR, reason="set MEPROP_DATA_DIR to the folder with mnist/")
@pytest.mark.parametrize(
    ("k", "threshold"),
    # One epoch of 40 minibatches: dense backprop passes 80%; meProp, where a minibatch
    # updates only 30 of 500 hidden units, starts slower (about 72-79% here).
    [("0", 80.0), ("30", 60.0)],
)
def test_real_mnist_one_epoch(k: str, threshold: float, cache_dir: Path, tmp_path: Path) -> None:
    argv = ["--data-dir", str(REAL_DATA_DIR), "--out", str(tmp_path), "--epochs", "1"]
    argv += ["--limit-train", "2000", "--k", k, "--devices", "1", "--timing-batches", "5"]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["train_size"] == 2000 and results["config"]["test_size"] == 10000
    assert results["best"]["test_acc"] > threshold


# ---------------------------------------------------------------------------------------------
# --sparse-update


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "shape"),
    # per-example: 8 rows x k = 2 columns span at most 16 of 64 units, so the compact blocks
    # hold the union of the rows' columns (not every column).
    [("unified", ["--hidden", "16", "--k", "4"]), ("per-example", ["--hidden", "64", "--k", "2"])],
)
def test_cli_sparse_update_run(
    mode: str, shape: list[str], tiny_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = tiny_args(tiny_dir, out, "--mode", mode, *shape, "--sparse-update")
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and len(results["epochs"]) == 2
    assert results["config"]["sparse_update"] is True and results["config"]["mode"] == mode
    for record in results["epochs"]:
        assert np.isfinite(record["loss"]) and record["steps"] == N_TRAIN // 8
        for field in ("forward_s", "backward_s", "update_s"):
            assert record["timing"][field] >= 0.0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]


def test_sparse_update_out_dir() -> None:
    args = cli.build_parser().parse_args(["--sparse-update"])
    out = cli.default_out(settings("--sparse-update"), args)
    assert out == Path("runs/mnist-k30-unified-sparse-h500x2-adam-b50-s0")
