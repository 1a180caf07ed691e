"""Tests for training on several processes (experiments.loop.distributed): two CPU processes
on localhost, joined by ``jax.distributed`` with gloo collectives, against one process with
the same global batch and seed; and a killed process."""

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from experiments.common import ConfigError
from experiments.loop import checkpoints, distributed
from experiments.mnist import cli
from tests.experiments.mnist.test_cli import (
    N_TEST,
    REPO,
    SUBPROCESS_MAIN,
    write_tiny_mnist,
)
from tests.helpers import persistent_compilation_cache

# Every wait is bounded: a run of the tiny model takes well under a minute on an idle
# machine, these bounds leave room for a heavily loaded one.
RUN_TIMEOUT_S = 300
HEARTBEAT_S = 10
# Losses are float sums over the same global batch in another reduction layout; accuracies
# count examples, so they may differ by at most one example of the split.
LOSS_RTOL = 1e-5
DEV_SIZE = 5000
ACC_ATOL = {"dev_acc": 100.0 / DEV_SIZE, "test_acc": 100.0 / N_TEST}
LOSSES = ("loss", "dev_loss", "test_loss")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny IDX files and the JSON the subprocess needs to accept their shapes."""
    folder = tmp_path_factory.mktemp("tiny") / "mnist"
    specs = write_tiny_mnist(folder)
    return folder, json.dumps({k: [v.sha256, list(v.shape)] for k, v in specs.items()})


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One XLA cache for every subprocess of this module (they compile the same programs):
    the suite's own, so that a second run of the suite compiles none of them again."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax-cache")) as path:
        yield path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Unified meProp (or, with ``--k 0`` in ``extra``, backprop) on the tiny data: a global
    batch of 8 over two devices, so every step's top-k spans both processes' rows."""
    return [
        "--data-dir", str(data), "--out", str(out), "--hidden", "16", "--k", "4",
        "--mode", "unified", "--batch-size", "8", "--eval-batch-size", "40", "--lr", "0.01",
        "--epochs", "2", "--timing-batches", "0", "--chunk-steps", "4", *extra,
    ]  # fmt: skip


def launch(specs: str, args: Sequence[str], cache: Path, devices: int, log: Path) -> Any:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(devices),
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONUNBUFFERED": "1",
    }
    handle = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBPROCESS_MAIN, specs, *args],
        cwd=REPO,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
    )
    handle.close()
    return proc


@contextlib.contextmanager
def processes(procs: list[Any]) -> Iterator[list[Any]]:
    """Kills and reaps every process still running when the block ends."""
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def wait_all(procs: Sequence[Any], logs: Sequence[Path]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for proc, log in zip(procs, logs, strict=True):
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert proc.returncode == 0, log.read_text()[-3000:]


def group_args(port: int, process_id: int) -> list[str]:
    return [
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
        "--process-id", str(process_id), "--init-timeout", "120",
        "--heartbeat-timeout", str(HEARTBEAT_S),
    ]  # fmt: skip


def start_group(specs: str, args: Sequence[str], cache: Path, logs: Path) -> list[Any]:
    """Two processes of one device each, joined on a free loopback port."""
    port = free_port()
    return [
        launch(specs, [*args, *group_args(port, i)], cache, 1, logs / f"process{i}.log")
        for i in range(2)
    ]


def history(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "results.json").read_text())["epochs"]


def assert_same_history(got: Sequence[dict[str, Any]], want: Sequence[dict[str, Any]]) -> None:
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [1, 2]
    for g, w in zip(got, want, strict=True):
        assert g["steps"] == w["steps"]
        for name in LOSSES:
            np.testing.assert_allclose(g[name], w[name], rtol=LOSS_RTOL, err_msg=name)
        for name, atol in ACC_ATOL.items():
            np.testing.assert_allclose(g[name], w[name], rtol=0, atol=atol, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("k", ["4", "0"], ids=["unified", "backprop"])
def test_two_processes_match_one(
    k: str, tiny: tuple[Path, str], cache: Path, tmp_path: Path
) -> None:
    """Two processes x one device = one process x two devices, epoch by epoch; unified
    meProp's top-k is over the global batch. With meProp the two-process run stops after
    one epoch and resumes on two processes, and its first checkpoint also resumes on one
    process (orbax restores the replicated state into any process layout)."""
    data, specs = tiny
    one, two = tmp_path / "one", tmp_path / "two"
    (tmp_path / "logs").mkdir()
    epochs = ["--epochs", "1"] if k != "0" else []
    procs = [launch(specs, run_args(data, one, "--k", k), cache, 2, tmp_path / "one.log")]
    procs += start_group(specs, [*run_args(data, two, "--k", k), *epochs], cache, tmp_path / "logs")
    with processes(procs):
        wait_all(procs, [tmp_path / "one.log", *sorted((tmp_path / "logs").iterdir())])
    # Process 0 alone writes the log lines and the run's files.
    assert "epoch 1/" in (tmp_path / "logs" / "process0.log").read_text()
    assert "epoch 1/" not in (tmp_path / "logs" / "process1.log").read_text()
    reference = history(one)
    assert reference[-1]["loss"] < reference[0]["loss"]  # it learns: the numbers mean something
    if k == "0":
        assert_same_history(history(two), reference)
        return

    assert [r["epoch"] for r in history(two)] == [1]
    switched = tmp_path / "switched"
    shutil.copytree(two, switched)
    resume = ["--resume", "--epochs", "2"]
    procs = [launch(specs, [*run_args(data, switched), *resume], cache, 2, tmp_path / "sw.log")]
    procs += start_group(specs, [*run_args(data, two), *resume], cache, tmp_path / "logs")
    with processes(procs):
        wait_all(procs, [tmp_path / "sw.log", *sorted((tmp_path / "logs").iterdir())])
    assert_same_history(history(two), reference)
    assert_same_history(history(switched), reference)
    assert json.loads((two / "results.json").read_text())["devices"] != ["cpu:0", "cpu:1"]


@pytest.mark.slow
def test_killed_process_stops_the_other(tiny: tuple[Path, str], cache: Path, tmp_path: Path):
    """SIGKILL to process 1 mid-training: process 0 exits non-zero within the heartbeat
    bound, and no save it cut short looks like a checkpoint."""
    data, specs = tiny
    out = tmp_path / "run"
    args = [*run_args(data, out), "--epochs", "100000"]
    procs = start_group(specs, args, cache, tmp_path)
    log0 = tmp_path / "process0.log"
    with processes(procs):
        wait_for_first_epoch(procs, log0)
        killed_at = time.monotonic()
        procs[1].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=HEARTBEAT_S * 6)
        waited = time.monotonic() - killed_at
    print(f"process 0 exited with {procs[0].returncode} {waited:.1f}s after the kill")
    assert procs[0].returncode != 0
    assert waited < HEARTBEAT_S * 6
    # A save cut short stays under orbax's temporary name, which is never resumed from.
    folder = out / "checkpoints"
    for entry in folder.iterdir():
        if entry.name.isdigit():
            assert {p.name for p in entry.iterdir()} >= {"_CHECKPOINT_METADATA", "state", "meta"}
        else:
            assert entry.name.endswith("orbax-checkpoint-tmp"), entry
    latest = checkpoints.latest_checkpoint(folder)
    assert latest is None or (folder / str(latest) / "_CHECKPOINT_METADATA").is_file()


@pytest.mark.slow
def test_unreachable_coordinator_fails_in_bounded_time(
    tiny: tuple[Path, str], cache: Path, tmp_path: Path
) -> None:
    """Process 1 alone, nobody at the coordinator's port: it gives up after --init-timeout."""
    data, specs = tiny
    args = [*run_args(data, tmp_path / "run"), *group_args(free_port(), 1)]
    args[args.index("--init-timeout") + 1] = "5"
    log = tmp_path / "process1.log"
    with processes([launch(specs, args, cache, 1, log)]) as procs:
        procs[0].wait(timeout=RUN_TIMEOUT_S)
    assert procs[0].returncode != 0
    text = log.read_text()
    assert "joining the other processes (process 1 of 2" in text
    assert "DEADLINE_EXCEEDED" in text, text[-3000:]
    assert not (tmp_path / "run").exists()


def wait_for_first_epoch(procs: Sequence[Any], log0: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while "epoch 1/" not in log0.read_text():
        assert all(p.poll() is None for p in procs), log0.read_text()[-3000:]
        assert time.monotonic() < deadline, "the processes never finished an epoch"
        time.sleep(0.2)


@pytest.mark.slow
def test_ctrl_c_on_process_0_stops_both(tiny: tuple[Path, str], cache: Path, tmp_path: Path):
    """SIGINT reaches only process 0 (the foreground one): both stop at the same chunk
    boundary, exit with 130 and leave a checkpoint of the last completed epoch."""
    data, specs = tiny
    out = tmp_path / "run"
    procs = start_group(specs, [*run_args(data, out), "--epochs", "100000"], cache, tmp_path)
    with processes(procs):
        wait_for_first_epoch(procs, tmp_path / "process0.log")
        procs[0].send_signal(signal.SIGINT)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    logs = [(tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2)]
    assert [p.returncode for p in procs] == [130, 130], logs
    assert "--resume" in logs[0]
    latest = checkpoints.latest_checkpoint(out / "checkpoints")
    assert latest is not None and latest >= 1
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert [r["epoch"] for r in results["epochs"]] == list(range(1, latest + 1))


def parse(*flags: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["--epochs", "1", *flags])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--coordinator", "127.0.0.1:1234"], "need all of --coordinator"),
        (["--num-processes", "2", "--process-id", "0"], "need all of --coordinator"),
        (
            ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id must be in 0..1",
        ),
        (
            ["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
            "--coordinator must be HOST:PORT",
        ),
        (
            [
                "--coordinator",
                "h:1",
                "--num-processes",
                "2",
                "--process-id",
                "0",
                "--heartbeat-timeout",
                "0",
            ],
            "--heartbeat-timeout must be >= 1",
        ),
    ],
)
def test_bad_flags_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        distributed.setup_processes(parse(*flags))


def test_one_process_needs_no_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    launchers = ("SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri", "TPU_PROCESS_ADDRESSES")
    for name in (*launchers, "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup_processes(parse()) == 1
    one = ["--coordinator", "127.0.0.1:1", "--num-processes", "1", "--process-id", "0"]
    assert distributed.setup_processes(parse(*one)) == 1
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 1),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, 1),  # a batch script, outside srun
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-4]"}, 4),
        ({"OMPI_MCA_orte_hnp_uri": "1.2.3.4:5", "OMPI_COMM_WORLD_SIZE": "2"}, 2),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, 4),
    ],
)
def test_cluster_processes(env: dict[str, str], expected: int) -> None:
    assert distributed.cluster_processes(env) == expected


def test_auto_takes_no_other_flag() -> None:
    with pytest.raises(ConfigError, match="--coordinator auto takes neither"):
        distributed.setup_processes(parse("--coordinator", "auto", "--process-id", "0"))


def test_late_flags_are_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test process has used its devices already: joining now must fail with a clear
    message, not a traceback from deep inside JAX."""
    assert jax.devices()  # the backend is up, as in any test process
    flags = ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1"]
    with pytest.raises(ConfigError, match="start every process"):
        distributed.setup_processes(parse(*flags, "--init-timeout", "1"))


def test_put_global_batches_on_one_process_is_put_batches() -> None:
    from experiments.loop.programs import put_batches

    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    group = {"x": np.arange(2 * 8 * 3, dtype=np.float32).reshape(2, 8, 3)}
    got = distributed.put_global_batches(group, mesh)["x"]
    want = put_batches(group, mesh)["x"]
    assert got.sharding == want.sharding
    np.testing.assert_array_equal(np.asarray(got), group["x"])
    for a, b in zip(got.addressable_shards, want.addressable_shards, strict=True):
        assert a.index == b.index
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
