"""Tests for the shared training loop, experiments.train, on a tiny synthetic task.

The toy task has two batch groups of different shapes with padding, like a length-bucketed
tagger: flat examples ``[steps, batch, F]`` and two-token sequences ``[steps, batch, 2, F]``.
"""

import dataclasses
import itertools
import json
import os
import signal
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import meprop_jax
from experiments.loop import core as loop
from tests.helpers import persistent_compilation_cache

FEATURES, CLASSES, HIDDEN = 6, 3, 16
METRICS = ("epoch", "loss", "dev_acc", "test_acc", "dev_loss", "test_loss", "steps")


class ToyModel(nn.Module):
    k: int
    mode: str
    sparse_update: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = meprop_jax.Dense(HIDDEN, k=self.k, mode=self.mode, sparse_update=self.sparse_update)
        x = nn.relu(dense(x))
        return meprop_jax.Dense(CLASSES)(x)


def toy_split(seed: int, n_flat: int, n_seq: int) -> dict[str, np.ndarray]:
    """Inputs with labels from a fixed linear teacher (learnable); a third of the tokens of
    the sequences are padding."""
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(99).normal(size=(FEATURES, CLASSES))
    flat = rng.normal(size=(n_flat, FEATURES)).astype(np.float32)
    seq = rng.normal(size=(n_seq, 2, FEATURES)).astype(np.float32)
    seq_mask = np.ones((n_seq, 2), np.float32)
    seq_mask[::3, 1] = 0.0
    return {
        "flat_x": flat,
        "flat_y": np.argmax(flat @ teacher, -1).astype(np.int32),
        "seq_x": seq,
        "seq_y": np.argmax(seq @ teacher, -1).astype(np.int32),
        "seq_mask": seq_mask,
    }


def stack(x: np.ndarray, y: np.ndarray, mask: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """``[n, ...]`` -> ``[steps, batch, ...]``, padding the last minibatch with mask 0."""
    steps = -(-len(x) // batch)
    pad = steps * batch - len(x)

    def padded(a: np.ndarray) -> np.ndarray:
        a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
        return a.reshape(steps, batch, *a.shape[1:])

    return {"x": padded(x), "y": padded(y), "mask": padded(mask)}


@dataclasses.dataclass(frozen=True, eq=False)
class ToyTask:
    """A :class:`experiments.train.Task` with two batch groups; ``stop`` is requested while
    the minibatches of ``stop_epoch`` are built (a signal arriving mid-epoch)."""

    k: int = 4
    mode: str = "unified"
    batch: int = 8
    stop: loop.StopFlag | None = None
    stop_epoch: int = 0
    sparse_update: bool = False
    name: str = "toy"

    def model(self) -> ToyModel:
        return ToyModel(self.k, self.mode, self.sparse_update)

    def _split(self, name: str) -> dict[str, np.ndarray]:
        seed, n_flat, n_seq = {"train": (0, 44, 20), "dev": (1, 20, 12), "test": (2, 20, 12)}[name]
        return toy_split(seed, n_flat, n_seq)

    def _groups(self, d: dict[str, np.ndarray], order: Any = None) -> list[dict[str, np.ndarray]]:
        fo = np.arange(len(d["flat_x"])) if order is None else order[0]
        so = np.arange(len(d["seq_x"])) if order is None else order[1]
        flat_mask = np.ones(len(d["flat_x"]), np.float32)
        return [
            stack(d["flat_x"][fo], d["flat_y"][fo], flat_mask[fo], self.batch),
            stack(d["seq_x"][so], d["seq_y"][so], d["seq_mask"][so], self.batch),
        ]

    def init(self, key: jax.Array) -> Any:
        keys = jax.random.split(key)
        x = jnp.zeros((1, FEATURES), jnp.float32)
        return self.model().init({"params": keys[0], "meprop": keys[1]}, x)

    def loss_fn(self, params: Any, batch: Any, key: jax.Array, train: bool) -> Any:
        logits = self.model().apply(params, batch["x"], rngs={"meprop": key})
        mask = batch["mask"]
        count = jnp.sum(mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        hits = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        return jnp.sum(ce * mask) / jnp.maximum(count, 1.0), {
            "correct": jnp.sum(hits * mask),
            "count": count,
        }

    def train_groups(self, epoch: int, key: jax.Array) -> list[dict[str, np.ndarray]]:
        if self.stop is not None and epoch == self.stop_epoch:
            self.stop.request(signal.SIGINT)
        d = self._split("train")
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
        return self._groups(
            d, (rng.permutation(len(d["flat_x"])), rng.permutation(len(d["seq_x"])))
        )

    def eval_groups(self, split: str) -> list[dict[str, np.ndarray]]:
        return self._groups(self._split(split))

    def config(self) -> dict[str, Any]:
        return {"k": self.k, "mode": self.mode, "batch": self.batch}


def config(out: Path, **kw: Any) -> loop.TrainConfig:
    base = {"epochs": 2, "devices": 1, "timing_batches": 0, "chunk_steps": 2, "progress": False}
    return loop.TrainConfig(out=out, **{**base, **kw})


def metrics(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The numbers a run computes (everything but the timings)."""
    return [{k: r[k] for k in METRICS} for r in history]


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A persistent XLA cache for this module: the runs below compile the same programs
    again and again (every ``train`` call builds fresh jitted closures)."""
    with persistent_compilation_cache(tmp_path_factory.getbasetemp() / "jax-cache"):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> loop.RunResult:
    """An uninterrupted 3-epoch run with timing probes."""
    out = tmp_path_factory.mktemp("reference")
    return loop.train(ToyTask(), config(out, epochs=3, timing_batches=3), log=quiet)


# ---------------------------------------------------------------------------------------------
# Whole runs


@pytest.mark.slow
def test_run_writes_results_and_plots(reference: loop.RunResult) -> None:
    results = json.loads((reference.out / "results.json").read_text())
    assert results["status"] == "complete"
    assert results["config"]["task"] == "toy"
    assert results["config"]["optimizer"] == "adam" and results["config"]["lr"] == 1e-3
    assert results["config"]["k"] == 4
    assert {"jax_version", "devices", "backend", "num_devices", "best", "mean_timing"} <= set(
        results
    )
    assert [r["epoch"] for r in results["epochs"]] == [1, 2, 3]
    for record in results["epochs"]:
        assert set(METRICS) <= set(record)
        assert 0.0 <= record["dev_acc"] <= 100.0 and 0.0 <= record["test_acc"] <= 100.0
        assert record["steps"] == 6 + 3
    best = results["best"]
    assert best == loop.best_epoch(results["epochs"])
    assert best["dev_acc"] == max(r["dev_acc"] for r in results["epochs"])
    # The teacher is linear, so three epochs must beat chance clearly.
    assert results["epochs"][-1]["loss"] < results["epochs"][0]["loss"]
    assert (reference.out / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    assert (reference.out / "timing.png").is_file()
    assert sorted(p.name for p in (reference.out / "checkpoints").iterdir()) == ["1", "2", "3"]


@pytest.mark.slow
def test_timing_breakdown_fields(reference: loop.RunResult) -> None:
    for record in reference.history:
        t = record["timing"]
        for field in ("forward_s", "backward_s", "update_s", "train_wall_s", "eval_s"):
            assert isinstance(t[field], float) and t[field] >= 0.0, field
        assert t["compile_s"] >= 0.0
        assert t["probe_steps"] == 3  # 3 of the 9 steps, in proportion: 2 flat + 1 sequence
        assert t["probe_forward_s"] > 0 and t["probe_forward_backward_s"] > 0
        assert t["probe_step_s"] > 0
    assert reference.history[0]["timing"]["compile_s"] > 0  # epoch 1 compiles the programs


@pytest.mark.slow
def test_same_seed_same_metrics(reference: loop.RunResult, tmp_path: Path) -> None:
    again = loop.train(ToyTask(), config(tmp_path, epochs=3), log=quiet)
    assert metrics(again.history) == metrics(reference.history)
    assert again.history[0]["timing"]["forward_s"] is None  # probes disabled
    other = loop.train(ToyTask(), config(tmp_path / "seed1", epochs=1, seed=1), log=quiet)
    assert metrics(other.history)[0] != metrics(reference.history)[0]


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted(reference: loop.RunResult, tmp_path: Path) -> None:
    first = loop.train(ToyTask(), config(tmp_path, epochs=3), max_epochs_this_run=1, log=quiet)
    assert first.status == "stopped" and len(first.history) == 1
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "stopped"
    second = loop.train(ToyTask(), config(tmp_path, epochs=3, resume=True), log=quiet)
    assert second.status == "complete"
    assert metrics(second.history) == metrics(reference.history)
    assert second.best == reference.best


@pytest.mark.slow
def test_interrupt_mid_epoch_keeps_last_complete_epoch(
    reference: loop.RunResult, tmp_path: Path
) -> None:
    stop = loop.StopFlag()
    # checkpoint_every=5: epoch 1 is only saved because of the interruption.
    cfg = config(tmp_path, epochs=3, checkpoint_every=5)
    lines: list[str] = []
    first = loop.train(ToyTask(stop=stop, stop_epoch=2), cfg, stop=stop, log=lines.append)
    assert first.status == "interrupted" and first.signum == signal.SIGINT
    assert len(first.history) == 1  # epoch 2 was abandoned, not half-saved
    assert any("abandoned" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    resumed = loop.train(ToyTask(), dataclasses.replace(cfg, resume=True), log=quiet)
    assert metrics(resumed.history) == metrics(reference.history)


@pytest.mark.slow
def test_eight_devices_match_one(reference: loop.RunResult, tmp_path: Path) -> None:
    assert jax.local_device_count() == 8
    run = loop.train(ToyTask(), config(tmp_path, epochs=3, devices=8), log=quiet)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_devices"] == 8 and len(results["devices"]) == 8
    for got, want in zip(run.history, reference.history, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["dev_loss"] == pytest.approx(want["dev_loss"], rel=1e-4)
        assert got["dev_acc"] == pytest.approx(want["dev_acc"], abs=1e-3)
        assert got["test_acc"] == pytest.approx(want["test_acc"], abs=1e-3)


@pytest.mark.slow
def test_random_mode_and_adagrad_with_clipping_run(tmp_path: Path) -> None:
    cfg = config(tmp_path, epochs=1, optimizer="adagrad", clip=5.0, devices=2, progress=True)
    run = loop.train(ToyTask(mode="random"), cfg, log=quiet)
    assert run.status == "complete" and np.isfinite(run.history[0]["loss"])
    assert run.history[0]["loss"] > 0


# ---------------------------------------------------------------------------------------------
# Refusals before training


def test_uneven_batch_over_devices_rejected(tmp_path: Path) -> None:
    with pytest.raises(loop.ConfigError, match=r"--batch-size 8 .*--devices"):
        loop.train(ToyTask(), config(tmp_path, devices=3), log=quiet)
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(loop.ConfigError, match=r"--batch-size 50.*multiple of 8.*--devices"):
        loop.check_divisible(50, 8)
    loop.check_divisible(48, 8)


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"epochs": 0}, "--epochs"),
        ({"epochs": -3}, "--epochs"),
        ({"lr": 0.0}, "--lr"),
        ({"clip": -1.0}, "--clip"),
        ({"devices": 9}, "--devices"),
        ({"devices": 0}, "--devices"),
        ({"timing_batches": -1}, "--timing-batches"),
        ({"checkpoint_every": 0}, "--checkpoint-every"),
        ({"resume": True, "overwrite": True}, "--resume"),
    ],
)
def test_bad_config_rejected(tmp_path: Path, change: dict[str, Any], flag: str) -> None:
    with pytest.raises(loop.ConfigError, match=flag):
        loop.train(ToyTask(), config(tmp_path, **change), log=quiet)
    assert not (tmp_path / "results.json").exists()


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(loop.ConfigError, match="--resume: no checkpoint"):
        loop.train(ToyTask(), config(tmp_path, resume=True), log=quiet)


@pytest.mark.slow
def test_existing_run_is_not_overwritten_silently(tmp_path: Path) -> None:
    loop.train(ToyTask(), config(tmp_path, epochs=1), log=quiet)
    with pytest.raises(loop.ConfigError, match=r"--resume.*--overwrite.*--out"):
        loop.train(ToyTask(), config(tmp_path, epochs=1), log=quiet)
    with pytest.raises(loop.ConfigError, match=r"--resume: .*seed \(0 there, 5 now\)"):
        loop.train(ToyTask(), config(tmp_path, epochs=2, seed=5, resume=True), log=quiet)
    with pytest.raises(loop.ConfigError, match=r"k \(4 there, 2 now\)"):
        loop.train(ToyTask(k=2), config(tmp_path, epochs=2, resume=True), log=quiet)
    fresh = loop.train(ToyTask(), config(tmp_path, epochs=1, overwrite=True), log=quiet)
    assert fresh.status == "complete"


# ---------------------------------------------------------------------------------------------
# Pieces


def test_signal_handler_sets_flag_and_restores() -> None:
    before = signal.getsignal(signal.SIGINT)
    flag = loop.StopFlag()
    with loop.handle_signals(flag):
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signum == signal.SIGTERM
        # The second signal would take the previous (default) route again.
        assert signal.getsignal(signal.SIGTERM) is not None
    assert signal.getsignal(signal.SIGINT) is before
    assert flag.requested


def test_chunk_plan_covers_every_step_once() -> None:
    key = jax.random.key(0)
    plan = loop._chunk_plan([7, 3], 3, key)
    covered = sorted((g, s + i) for g, s, n in plan for i in range(n))
    assert covered == [(0, i) for i in range(7)] + [(1, i) for i in range(3)]
    assert all(n <= 3 for _, _, n in plan)
    assert loop._chunk_plan([7, 3], 3, key) == plan  # deterministic
    assert loop._chunk_plan([25], 0, key) == [(0, 0, 3), (0, 3, 3), (0, 6, 3), (0, 9, 3),
                                             (0, 12, 3), (0, 15, 3), (0, 18, 3), (0, 21, 3),
                                             (0, 24, 1)]  # fmt: skip


def test_probe_counts_proportional() -> None:
    assert loop._probe_counts([1100], 100) == [100]
    assert loop._probe_counts([40], 100) == [40]
    assert loop._probe_counts([60, 30, 10], 10) == [6, 3, 1]
    assert loop._probe_counts([99, 1], 10) == [10, 1]


def test_best_epoch_first_of_ties() -> None:
    history = [
        {"epoch": 1, "dev_acc": 90.0, "test_acc": 89.0},
        {"epoch": 2, "dev_acc": 95.0, "test_acc": 93.0},
        {"epoch": 3, "dev_acc": 95.0, "test_acc": 94.0},
    ]
    assert loop.best_epoch(history) == {"epoch": 2, "dev_acc": 95.0, "test_acc": 93.0}
    assert loop.best_epoch([]) is None


def test_adagrad_is_the_papers() -> None:
    """w -= lr * g / sqrt(sum g^2 + 1e-6), accumulator from 0; clipping first."""
    tx = loop.make_optimizer("adagrad", 0.1, clip=5.0)
    params = jnp.zeros(2)
    state = tx.init(params)
    grads = jnp.array([10.0, 0.5])
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = tx.update(grads, state, params)
    clipped = np.array([5.0, 0.5])
    np.testing.assert_allclose(updates, -0.1 * clipped / np.sqrt(clipped**2 + 1e-6), rtol=1e-6)
    assert loop.TrainConfig(out=Path("x"), optimizer="adagrad").learning_rate == 0.1
    assert loop.TrainConfig(out=Path("x"), optimizer="sgd", lr=0.5).learning_rate == 0.5


def test_resume_command() -> None:
    cmd = loop.resume_command("experiments.mnist", ["--k", "20", "--overwrite"], Path("runs/a b"))
    assert cmd == "python -m experiments.mnist --k 20 --out 'runs/a b' --resume"
    cmd = loop.resume_command("experiments.mnist", ["--out", "r", "--resume"], Path("r"))
    assert cmd == "python -m experiments.mnist --out r --resume"


# ---------------------------------------------------------------------------------------------
# --sparse-update: compact gradients and column-sparse optimizers


def sparse_config(out: Path, **kw: Any) -> loop.TrainConfig:
    return config(out, sparse_update=True, **kw)


@pytest.fixture(scope="module")
def sparse_reference(tmp_path_factory: pytest.TempPathFactory) -> loop.RunResult:
    """An uninterrupted 3-epoch compact run (lazy Adam) with timing probes."""
    out = tmp_path_factory.mktemp("sparse-reference")
    return loop.train(
        ToyTask(sparse_update=True), sparse_config(out, epochs=3, timing_batches=3), log=quiet
    )


@pytest.mark.slow
def test_sparse_update_run_times_and_resumes_exactly(
    sparse_reference: loop.RunResult, reference: loop.RunResult, tmp_path: Path
) -> None:
    results = json.loads((sparse_reference.out / "results.json").read_text())
    assert results["status"] == "complete" and results["config"]["sparse_update"] is True
    assert results["epochs"][-1]["loss"] < results["epochs"][0]["loss"]
    for record in sparse_reference.history:
        t = record["timing"]
        assert t["probe_steps"] == 3 and t["probe_step_s"] > 0
        assert t["probe_forward_backward_s"] > 0 and t["update_s"] >= 0.0
    # Lazy Adam is not the authors' dense Adam: the runs differ.
    assert metrics(sparse_reference.history) != metrics(reference.history)
    assert sparse_reference.state.taps is not None
    assert isinstance(sparse_reference.state.opt_state, meprop_jax.optim.SparseState)

    task = ToyTask(sparse_update=True)
    first = loop.train(task, sparse_config(tmp_path, epochs=3), max_epochs_this_run=1, log=quiet)
    assert first.status == "stopped"
    # The settings are compared before the (differently shaped) optimizer state is read.
    with pytest.raises(loop.ConfigError, match=r"sparse_update \(True there, False now\)"):
        loop.train(ToyTask(), config(tmp_path, epochs=3, resume=True), log=quiet)
    second = loop.train(task, sparse_config(tmp_path, epochs=3, resume=True), log=quiet)
    assert metrics(second.history) == metrics(sparse_reference.history)
    got, want = second.state, sparse_reference.state
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sparse_update_needs_taps(tmp_path: Path) -> None:
    with pytest.raises(loop.ConfigError, match=r"--sparse-update: .*no compact-gradient taps"):
        loop.train(ToyTask(k=0, sparse_update=True), sparse_config(tmp_path), log=quiet)
    assert not (tmp_path / "results.json").exists()


def _steps(task: ToyTask, tx: Any, n: int) -> list[loop.TrainState]:
    """The loop's own training step, run ``n`` times on the first flat minibatches."""
    programs = loop._Programs(task.loss_fn, tx)
    state = loop._init_state(task, tx, jax.random.key(0))
    group = task.train_groups(1, jax.random.key(1))[0]
    step = jax.jit(programs._step)
    states = [state]
    for i in range(n):
        batch = jax.tree.map(lambda a, i=i: a[i], group)
        state, _ = step(state, batch, jax.random.key(2 + i))
        states.append(state)
    return states


def _changed_columns(before: Any, after: Any) -> int:
    return int(np.sum(np.any(np.asarray(before) != np.asarray(after), axis=0)))


def test_sparse_step_moves_selected_columns_only() -> None:
    """The loop's compact Adam step changes at most k columns of the hidden kernel per step
    (lazy), while the dense output layer and the biases are updated as usual; the masked
    dense Adam step keeps moving earlier columns through its momentum."""
    task = ToyTask(sparse_update=True)
    states = _steps(task, loop.make_sparse_optimizer("adam", 1e-2), 2)
    for before, after in itertools.pairwise(states):
        hidden = (before.params["params"]["Dense_0"], after.params["params"]["Dense_0"])
        assert 0 < _changed_columns(hidden[0]["kernel"], hidden[1]["kernel"]) <= task.k
        assert np.all(np.asarray(hidden[0]["bias"]) != np.asarray(hidden[1]["bias"]))
        out = (before.params["params"]["Dense_1"], after.params["params"]["Dense_1"])
        assert _changed_columns(out[0]["kernel"], out[1]["kernel"]) == CLASSES
    dense = _steps(ToyTask(), loop.make_optimizer("adam", 1e-2), 2)
    kernels = [s.params["params"]["Dense_0"]["kernel"] for s in dense]
    assert _changed_columns(kernels[1], kernels[2]) > task.k


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_sparse_step_equals_masked_dense_step_without_momentum(name: str) -> None:
    """For SGD and AdaGrad a zero gradient moves nothing, so the compact step trains exactly
    the masked dense step's model (up to float reassociation)."""
    sparse = _steps(ToyTask(sparse_update=True), loop.make_sparse_optimizer(name, 0.1, 0.5), 3)
    dense = _steps(ToyTask(), loop.make_optimizer(name, 0.1, 0.5), 3)
    leaves = jax.tree.leaves(sparse[-1].params), jax.tree.leaves(dense[-1].params)
    for got, want in zip(*leaves, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
