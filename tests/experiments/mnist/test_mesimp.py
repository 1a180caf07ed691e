"""Tests for meSimp in the MNIST experiment: the record wiring of the MLP, the schedule,
shrinking, the export to a stock Flax MLP, resume equality and the flags."""

import doctest
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import loop
from experiments.common import mesimp as mesimp_loop
from experiments.loop.programs import Programs, init_state, state_hooks
from experiments.mnist import cli, simplify
from experiments.mnist.data import Mnist
from experiments.mnist.task import MnistSettings, MnistTask, batchify
from meprop_jax import mesimp
from tests.helpers import persistent_compilation_cache

FEATURES, HIDDEN, K = 12, 32, 3


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with persistent_compilation_cache(tmp_path_factory.getbasetemp() / "jax-cache"):
        yield


def teacher_data(n_train: int = 96, n_eval: int = 40) -> Mnist:
    """Labels from a fixed linear teacher of the pixels, so the MLP learns something."""
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(FEATURES, 10))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.random((n, FEATURES), dtype=np.float32)
        return x, np.argmax((x - 0.5) @ teacher, 1).astype(np.int32)

    return Mnist(*split(n_train), *split(n_eval), *split(n_eval), "teacher")


def settings(**kw: Any) -> MnistSettings:
    base = dict(hidden=HIDDEN, layers=2, k=K, mode="per_example", batch_size=8, mesimp=True)
    return MnistSettings(**{**base, **kw})


def test_module_doctests() -> None:
    result = doctest.testmod(mesimp_loop)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------- record


def _top_k_rows(g: np.ndarray, k: int) -> np.ndarray:
    """``[rows, units]`` bool: each row's k largest |g| (rows of zeros select nothing)."""
    order = np.argsort(-np.abs(g), axis=1, kind="stable")[:, :k]
    selected = np.zeros(g.shape, bool)
    np.put_along_axis(selected, order, True, axis=1)
    return selected & np.any(g != 0, axis=1, keepdims=True)


def _reference_counts(variables: Any, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """NumPy meProp backward of the 2-hidden-layer MLP (mean cross-entropy, per-example
    top-k after each ReLU derivative): each layer's hits per unit and examples counted."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    x, y, mask = (np.asarray(batch[n]) for n in ("x", "y", "mask"))
    y0 = x @ p["hidden_0"]["kernel"] + p["hidden_0"]["bias"]
    h0 = np.maximum(y0, 0)
    y1 = h0 @ p["hidden_1"]["kernel"] + p["hidden_1"]["bias"]
    h1 = np.maximum(y1, 0)
    logits = h1 @ p["output"]["kernel"] + p["output"]["bias"]
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    dlogits = (prob - np.eye(10)[y]) * mask[:, None] / mask.sum()
    dy1 = (dlogits @ p["output"]["kernel"].T) * (y1 > 0)
    sel1 = _top_k_rows(dy1, K)
    dy0 = ((dy1 * sel1) @ p["hidden_1"]["kernel"].T) * (y0 > 0)
    sel0 = _top_k_rows(dy0, K)
    # Ties at zero would make the selection ambiguous: every counted row has > k non-zeros.
    for dy in (dy0, dy1):
        nonzero = np.sum(dy != 0, axis=1)
        assert np.all((nonzero == 0) | (nonzero > K))
    return [
        (sel.sum(0), int(np.any(dy != 0, axis=1).sum())) for sel, dy in ((sel0, dy0), (sel1, dy1))
    ]


def test_one_training_step_adds_a_hand_computed_record() -> None:
    data = teacher_data()
    task = MnistTask(data, settings())
    tx = optax.adam(1e-3)
    state = jax.jit(lambda key: init_state(task, tx, key))(jax.random.key(0))
    assert set(state.params) == {"params", "mesimp"}  # the taps are not part of the state
    # The optimizer sees the parameters only.
    assert jax.tree.structure(state.opt_state[0].mu) == jax.tree.structure(
        {"params": state.params["params"]}
    )
    batch = jax.tree.map(lambda a: a[0], batchify(data.train_x, data.train_y, 8))
    batch["mask"][-2:] = 0.0  # padding rows are not counted
    programs = Programs(task.loss_fn, tx, state_hooks(task))
    new, _ = jax.jit(programs._step)(state, batch, jax.random.key(1))
    expected = _reference_counts(state.params, batch)
    for name, (hits, examples) in zip(("hidden_0", "hidden_1"), expected, strict=True):
        record = new.params["mesimp"][name]
        np.testing.assert_array_equal(np.asarray(record["hits"]), hits)
        assert int(record["examples"]) == examples == 6
        np.testing.assert_array_equal(np.asarray(record["mask"]), np.ones(HIDDEN))
    assert int(np.sum(new.params["mesimp"]["hidden_0"]["hits"])) == 6 * K
    # The parameters did move, and the step count of Adam with them.
    assert int(new.opt_state[0].count) == 1
    assert not np.allclose(new.params["params"]["hidden_0"]["bias"], 0.0)


# -------------------------------------------------------------------------------- schedule


def test_cycle_schedule() -> None:
    pruning = [e for e in range(1, 21) if mesimp_loop.prunes_in(e, 5)]
    assert pruning == [*range(1, 6), *range(11, 16)]
    assert [e for e in range(1, 21) if mesimp_loop.resets_moments(e, 5)] == [1, 6, 11, 16]
    assert [e for e in range(1, 7) if mesimp_loop.prunes_in(e, 1)] == [1, 3, 5]


def _trained_state(task: MnistTask, steps: int = 3) -> loop.TrainState:
    tx = optax.adam(1e-2)
    state = jax.jit(lambda key: init_state(task, tx, key))(jax.random.key(0))
    programs = Programs(task.loss_fn, tx, state_hooks(task))
    group = batchify(task.data.train_x, task.data.train_y, 8)
    step = jax.jit(programs._step)
    for i in range(steps):
        state, _ = step(state, jax.tree.map(lambda a, i=i: a[i], group), jax.random.key(i))
    return state


def test_schedule_resets_moments_at_cycle_starts_and_prunes_in_even_cycles() -> None:
    task = MnistTask(teacher_data(), settings(mesimp_threshold=0.3, mesimp_cycle=2))
    schedule = task.schedule
    state = _trained_state(task)
    mu = state.opt_state[0].mu["params"]["hidden_0"]["kernel"]
    assert np.any(np.asarray(mu) != 0)
    log: list[str] = []
    # Epoch 2 (0-based 1): inside the first cycle: no reset before it, and it prunes.
    same, events = schedule(state, 2, 0, 4, log.append)
    assert events == [] and same is state
    # Epoch 3 starts cycle 1 (odd): moments zeroed, the step count kept, no prune after chunks.
    reset, events = schedule(state, 3, 0, 4, log.append)
    assert events == []
    assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(reset.opt_state[0].mu)) and all(
        not np.any(np.asarray(a)) for a in jax.tree.leaves(reset.opt_state[0].nu)
    )
    assert int(reset.opt_state[0].count) == int(state.opt_state[0].count) == 3
    same, events = schedule(state, 3, 1, 4, log.append)
    assert events == [] and same is state and log == []
    # Epoch 5 starts cycle 2 (even): after a chunk the record is pruned and the layers shrink.
    record = state.params["mesimp"]
    pruned, events = schedule(state, 5, 1, 4, log.append)
    keep = mesimp.keep_sets(mesimp.prune(record, 0.3))
    sizes = [int(np.sum(keep[n])) for n in ("hidden_0", "hidden_1")]
    assert sizes[0] < HIDDEN and sizes[1] < HIDDEN  # threshold 0.3 > k / hidden
    widths = [mesimp.padded_width(s, HIDDEN) for s in sizes]
    assert events == [{"epoch": 5, "prune": 1, "sizes": sizes, "widths": widths}]
    assert log == [
        f"epoch 5 prune 1: hidden sizes {HIDDEN},{HIDDEN} -> {sizes[0]},{sizes[1]} "
        f"(padded {widths[0]},{widths[1]})"
    ]
    params = pruned.params["params"]
    assert params["hidden_0"]["kernel"].shape == (FEATURES, widths[0])
    assert params["hidden_1"]["kernel"].shape == (widths[0], widths[1])
    assert params["output"]["kernel"].shape == (widths[1], 10)
    assert pruned.opt_state[0].mu["params"]["hidden_1"]["kernel"].shape == (widths[0], widths[1])
    assert int(pruned.params["mesimp"]["hidden_0"]["examples"]) == 0  # the count restarts


def test_shrink_keeps_the_function_of_the_masked_network() -> None:
    """The loss of a batch with the pruned units masked (full width) equals its loss after
    the shrink (smaller layers): the surviving network is unchanged."""
    task = MnistTask(teacher_data(), settings(mesimp_threshold=0.3, mesimp_cycle=1))
    state = _trained_state(task)
    masked = {**state.params, "mesimp": mesimp.prune(state.params["mesimp"], 0.3)}
    shrunk, _ = task.schedule(state, 1, 1, 8, lambda _: None)
    assert task.widths(shrunk.params) < task.widths(state.params)
    batch = jax.tree.map(lambda a: a[0], batchify(task.data.dev_x, task.data.dev_y, 40))
    key = jax.random.key(0)
    loss_masked, aux_masked = task.loss_fn(masked, batch, key, False)
    loss_shrunk, aux_shrunk = task.loss_fn(shrunk.params, batch, key, False)
    np.testing.assert_allclose(float(loss_shrunk), float(loss_masked), rtol=1e-5)
    assert float(aux_shrunk["correct"]) == float(aux_masked["correct"])
    # ... and it differs from the unpruned network's (the prune did something).
    loss_full, _ = task.loss_fn(state.params, batch, key, False)
    assert abs(float(loss_full) - float(loss_masked)) > 1e-4


# ------------------------------------------------------------------- runs: export, resume


def _config(out: Path, **kw: Any) -> loop.TrainConfig:
    base = dict(epochs=4, devices=1, lr=1e-2, timing_batches=0, chunk_steps=3, progress=False)
    return loop.TrainConfig(out=out, **{**base, **kw})


def _numbers(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "timing"} for r in history]


def test_resumed_run_repeats_a_straight_one(tmp_path: Path) -> None:
    task = MnistTask(teacher_data(), settings(mesimp_threshold=0.3, mesimp_cycle=1))
    straight = loop.train(task, _config(tmp_path / "straight"), log=lambda _: None)
    first = loop.train(task, _config(tmp_path / "split"), max_epochs_this_run=2, log=print)
    assert first.status == "stopped" and len(first.history) == 2
    resumed = loop.train(task, _config(tmp_path / "split", resume=True), log=lambda _: None)
    assert resumed.status == "complete"
    assert _numbers(resumed.history) == _numbers(straight.history)
    # The network did shrink before the checkpoint, so the template was rebuilt at its widths.
    prunes = [e for e in straight.history[0]["events"]]
    assert prunes and prunes[-1]["widths"] != [HIDDEN, HIDDEN]
    assert straight.history[1]["events"] == []  # the odd cycle does not prune
    assert jax.tree.all(jax.tree.map(np.array_equal, resumed.state.params, straight.state.params))


def test_cli_exports_a_stock_flax_mlp_that_predicts_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = teacher_data()
    monkeypatch.setattr(cli, "load_data", lambda s: data)
    out, export = tmp_path / "run", tmp_path / "export"
    args = [
        "--out", str(out), "--hidden", str(HIDDEN), "--k", str(K), "--mode", "per-example",
        "--batch-size", "8", "--devices", "1", "--epochs", "3", "--lr", "0.01",
        "--timing-batches", "0", "--mesimp", "--mesimp-cycle", "1",
        "--mesimp-threshold", "0.3", "--export", str(export),
    ]  # fmt: skip
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["mesimp"]
    sizes = entry["final_sizes"]
    assert all(1 <= s < HIDDEN for s in sizes)
    assert entry["prunes"][-1]["sizes"] == sizes
    assert [e["epoch"] for e in entry["prunes"]] == [1] * 6 + [3] * 6  # 12 steps, chunks of 2
    config = json.loads((export / "config.json").read_text())
    assert config["hidden_sizes"] == sizes and config["activation"] == "relu"
    assert config["layers"] == ["hidden_0", "hidden_1", "output"]
    model, variables = simplify.load_export(export)
    assert variables["params"]["hidden_1"]["kernel"].shape == tuple(sizes)
    stock = np.asarray(jnp.argmax(model.apply(variables, data.test_x), -1))
    # The trained model, from its last checkpoint, at its padded widths.
    task = MnistTask(data, settings(mesimp_threshold=0.3, mesimp_cycle=1, mode="per-example"))
    trained_vars = simplify._final_variables(task, out, tuple(entry["final_widths"]))
    logits = task.settings.model(tuple(entry["final_widths"])).apply(
        trained_vars, data.test_x, False
    )
    np.testing.assert_array_equal(stock, np.asarray(jnp.argmax(logits, -1)))
    np.testing.assert_allclose(model.apply(variables, data.test_x), logits, atol=1e-5)
    assert entry["same_test_predictions"] == entry["test_size"] == len(data.test_y)
    expected_acc = 100.0 * float(np.mean(stock == data.test_y))
    assert entry["export_test_acc"] == pytest.approx(expected_acc)
    assert entry["export_test_acc"] == pytest.approx(results["epochs"][-1]["test_acc"])
    assert f"exported stock MLP test {expected_acc:.2f}%" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mesimp", "--mesimp-threshold", "1"], "--mesimp-threshold must be in (0, 1)"),
        (["--mesimp", "--mesimp-threshold", "0"], "--mesimp-threshold must be in (0, 1)"),
        (["--mesimp", "--mesimp-cycle", "0"], "--mesimp-cycle must be >= 1"),
        (["--mesimp", "--mesimp-prunes-per-epoch", "0"], "--mesimp-prunes-per-epoch must be"),
        (["--mesimp", "--k", "0"], "--mesimp needs meProp hidden layers: --k >= 1"),
        (["--mesimp", "--kdim"], "--mesimp needs meProp hidden layers: drop --kdim"),
        (["--mesimp", "--sparse-update"], "--mesimp does not combine with --sparse-update"),
        (["--mesimp", "--error-feedback"], "--mesimp does not combine with --error-feedback"),
        (["--mesimp", "--chunk-steps", "5"], "drop --chunk-steps"),
        (["--mesimp-cycle", "3"], "--mesimp-cycle needs --mesimp"),
        (["--export", "x"], "--export needs --mesimp"),
    ],
)
def test_bad_flags_name_the_flag(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--out", str(tmp_path / "run"), "--k", "10", "--devices", "1", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
