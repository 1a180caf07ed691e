"""Tests of experiments.loop.programs: chunk planning and the training step."""

import itertools
from typing import Any

import jax
import numpy as np
import pytest

from experiments.loop import indexed, programs
from experiments.loop.config import make_optimizer, make_sparse_optimizer
from experiments.loop.task import IndexedGroup, TrainState
from tests.experiments.loop.toy import CLASSES, ToyTask


def test_chunk_plan_covers_every_step_once() -> None:
    key = jax.random.key(0)
    plan = programs.chunk_plan([7, 3], 3, key)
    covered = sorted((g, s + i) for g, s, n in plan for i in range(n))
    assert covered == [(0, i) for i in range(7)] + [(1, i) for i in range(3)]
    assert all(n <= 3 for _, _, n in plan)
    assert programs.chunk_plan([7, 3], 3, key) == plan  # deterministic
    assert programs.chunk_plan([25], 0, key) == [(0, 0, 3), (0, 3, 3), (0, 6, 3), (0, 9, 3),
                                                 (0, 12, 3), (0, 15, 3), (0, 18, 3), (0, 21, 3),
                                                 (0, 24, 1)]  # fmt: skip


def test_evaluate_sums_correct_count_and_extra_counts() -> None:
    """Evaluation sums every ``correct_<name>`` beside ``correct`` and ``count``."""

    def loss_fn(params: Any, batch: Any, key: Any, train: bool) -> Any:
        x = batch["x"]
        return params * x.sum(), {"correct": x[0], "count": x[1], "correct_las": x[2]}

    group = {"x": np.array([[1.0, 2.0, 0.5], [3.0, 4.0, 1.5]], np.float32)}
    prog = programs.Programs(loss_fn, make_optimizer("sgd", 0.1))
    sums = jax.jit(prog.evaluate)(np.float32(0.5), group, jax.random.key(0))
    assert {k: float(v) for k, v in sums.items()} == {
        "loss": 0.5 * 3.5 * 2.0 + 0.5 * 8.5 * 4.0,
        "correct": 4.0,
        "count": 6.0,
        "correct_las": 2.0,
    }


def test_compiler_options_reach_xla() -> None:
    """A task's ``compiler_options`` are XLA's: an unknown one is refused by the compiler,
    and a known one compiles a program that computes the same sums."""

    def loss_fn(params: Any, batch: Any, key: Any, train: bool) -> Any:
        x = batch["x"]
        return params * x.sum(), {"correct": x[0], "count": x[1]}

    group = {"x": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    args = (np.float32(0.5), group, jax.random.key(0))
    bogus = programs.Programs(loss_fn, make_optimizer("sgd", 0.1), None, {"xla_no_such": 1})
    with pytest.raises(Exception, match="xla_no_such"):
        bogus.compiled("evaluate", *args)
    level1 = programs.Programs(
        loss_fn, make_optimizer("sgd", 0.1), None, {"xla_backend_optimization_level": 1}
    )
    fn, seconds = level1.compiled("evaluate", *args)
    assert seconds > 0.0
    assert float(fn(*args)["correct"]) == 4.0


def test_xla_flags_win_over_a_tasks_compiler_options() -> None:
    options = {"xla_backend_optimization_level": 1, "xla_cpu_enable_fast_math": False}
    flags = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"
    assert programs.without_xla_flags(options, flags) == {"xla_cpu_enable_fast_math": False}
    assert programs.without_xla_flags(options, "") == options


def _steps(task: ToyTask, tx: Any, n: int) -> list[TrainState]:
    """The loop's own training step, run ``n`` times on the first flat minibatches."""
    prog = programs.Programs(task.loss_fn, tx)
    state = programs.init_state(task, tx, jax.random.key(0))
    group = task.train_groups(1, jax.random.key(1))[0]
    step = jax.jit(prog._step)
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
    states = _steps(task, make_sparse_optimizer("adam", 1e-2), 2)
    for before, after in itertools.pairwise(states):
        hidden = (before.params["params"]["Dense_0"], after.params["params"]["Dense_0"])
        assert 0 < _changed_columns(hidden[0]["kernel"], hidden[1]["kernel"]) <= task.k
        assert np.all(np.asarray(hidden[0]["bias"]) != np.asarray(hidden[1]["bias"]))
        out = (before.params["params"]["Dense_1"], after.params["params"]["Dense_1"])
        assert _changed_columns(out[0]["kernel"], out[1]["kernel"]) == CLASSES
    dense = _steps(ToyTask(), make_optimizer("adam", 1e-2), 2)
    kernels = [s.params["params"]["Dense_0"]["kernel"] for s in dense]
    assert _changed_columns(kernels[1], kernels[2]) > task.k


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_sparse_step_equals_masked_dense_step_without_momentum(name: str) -> None:
    """For SGD and AdaGrad a zero gradient moves nothing, so the compact step trains exactly
    the masked dense step's model (up to float reassociation)."""
    sparse = _steps(ToyTask(sparse_update=True), make_sparse_optimizer(name, 0.1, 0.5), 3)
    dense = _steps(ToyTask(), make_optimizer(name, 0.1, 0.5), 3)
    leaves = jax.tree.leaves(sparse[-1].params), jax.tree.leaves(dense[-1].params)
    for got, want in zip(*leaves, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _indexed_group() -> tuple[dict[str, np.ndarray], IndexedGroup]:
    table = {"x": np.arange(12, dtype=np.float32).reshape(6, 2), "y": np.arange(6, dtype=np.int32)}
    return table, IndexedGroup(table, np.array([[5, 0, 2], [1, 1, 3]], np.int32))


def test_indexed_group_minibatches_are_its_table_rows() -> None:
    table, group = _indexed_group()
    assert programs.group_steps(group) == 2 and programs.batch_size(group) == 3
    batch = jax.jit(indexed.minibatch)(group, np.int32(1))
    np.testing.assert_array_equal(batch["x"], table["x"][[1, 1, 3]])
    np.testing.assert_array_equal(batch["y"], [1, 1, 3])
    whole = indexed.gathered(group)
    np.testing.assert_array_equal(whole["x"], table["x"][group.index])


def test_put_groups_sends_a_table_once() -> None:
    """The same table object is sent once (by the groups of one epoch, and by later epochs,
    which send their index only); another object with equal values is sent again."""
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    table, group = _indexed_group()
    sent: dict[int, Any] = {}
    first, second = programs.put_groups(
        [IndexedGroup(table, group.index[:, :2]), IndexedGroup(table, group.index[:, 1:])],
        mesh,
        sent,
    )
    assert second.table["x"] is first.table["x"] and len(sent) == 1
    (again,) = programs.put_groups([IndexedGroup(table, group.index[:, 1:])], mesh, sent)
    assert again.table["x"] is first.table["x"] and len(sent) == 1
    np.testing.assert_array_equal(again.index, group.index[:, 1:])
    assert again.index.sharding.spec == jax.sharding.PartitionSpec(None, "data")
    copy = {k: v.copy() for k, v in table.items()}
    _, other = programs.put_groups(
        [IndexedGroup(table, group.index[:, :2]), IndexedGroup(copy, group.index[:, :2])],
        mesh,
        sent,
    )
    assert other.table["x"] is not first.table["x"] and len(sent) == 2
    np.testing.assert_array_equal(other.table["x"], table["x"])
    # Without the cache, every call sends the table.
    alone = programs.put_batches(IndexedGroup(table, group.index[:, :2]), mesh)
    assert alone.table["x"] is not first.table["x"]
    np.testing.assert_array_equal(alone.table["x"], table["x"])


@pytest.mark.parametrize(
    ("table", "index", "message"),
    [
        ({"x": np.zeros((4, 2))}, np.array([[0, 4]]), r"in \[0, 4\).*got 0\.\.4"),
        ({"x": np.zeros((4, 2))}, np.array([[-1, 0]]), r"in \[0, 4\)"),
        ({"x": np.zeros((4, 2))}, np.array([0, 1]), r"\[steps, batch\] integers; got int64 \(2,\)"),
        ({"x": np.zeros((4, 2))}, np.array([[0.0, 1.0]]), r"integers; got float64"),
        (
            {"x": np.zeros((4, 2)), "y": np.zeros(3)},
            np.array([[0, 1]]),
            r"equal rows; got row counts \[3, 4\]",
        ),
    ],
    ids=["past-the-end", "negative", "one-axis", "floats", "ragged-table"],
)
def test_bad_indexed_group_named(table: Any, index: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        programs.group_steps(IndexedGroup(table, index))


def test_put_groups_lets_go_of_tables_no_longer_returned() -> None:
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    table, group = _indexed_group()
    sent: dict[int, Any] = {}
    first = programs.put_groups([group], mesh, sent)
    again = programs.put_groups([IndexedGroup(table, group.index[::-1])], mesh, sent)
    assert again[0].table["x"] is first[0].table["x"] and list(sent) == [id(table)]
    for _ in range(3):  # a task that builds its table anew every epoch
        fresh = {k: v.copy() for k, v in table.items()}
        programs.put_groups([IndexedGroup(fresh, group.index)], mesh, sent)
        assert list(sent) == [id(fresh)]
    plain = programs.put_groups([{"x": np.zeros((2, 3, 1))}], mesh, sent)
    assert plain[0]["x"].shape == (2, 3, 1) and not sent
