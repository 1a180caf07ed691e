"""Tests for the loop's model-state collections (taps whose cotangents update a state every
step) and the per-chunk schedule hook, on the toy task."""

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.loop.driver import train
from tests.experiments.loop.toy import ToyTask, config, quiet

STEPS_PER_EPOCH = 6 + 3  # 44 flat examples and 20 sequences in minibatches of 8


@dataclasses.dataclass(frozen=True, eq=False)
class CountingToyTask(ToyTask):
    """The toy task with a model state that counts the training steps and the real items
    seen, through a zero tap whose cotangent is the step's item count, and a schedule that
    logs its calls and, at the start of epoch 2, doubles the output bias (a host-side edit
    of the state)."""

    state_collections: tuple[str, ...] = ("counter",)
    calls: list = dataclasses.field(default_factory=list)

    def init(self, key: jax.Array) -> Any:
        variables = super().init(key)
        counter = {"steps": jnp.zeros((), jnp.int32), "items": jnp.zeros((), jnp.float32)}
        return {**variables, "counter": counter}

    def state_taps(self, model_state: Any) -> Any:
        return {"counter_taps": jnp.zeros((), jnp.float32)}

    def fold_state(self, model_state: Any, tap_grads: Any) -> Any:
        counter = model_state["counter"]
        return {
            "counter": {
                "steps": counter["steps"] + 1,
                "items": counter["items"] + tap_grads["counter_taps"],
            }
        }

    def loss_fn(self, params: Any, batch: Any, key: jax.Array, train: bool) -> Any:
        variables = {k: v for k, v in params.items() if k not in ("counter", "counter_taps")}
        loss, aux = super().loss_fn(variables, batch, key, train)
        if "counter_taps" in params:  # training steps only; d loss / d tap = item count
            loss = loss + params["counter_taps"] * aux["count"]
        return loss, aux

    def schedule(self, state: Any, epoch: int, done: int, chunks: int, log: Any) -> Any:
        self.calls.append((epoch, done, chunks))
        if epoch == 2 and done == 0:
            params = state.params["params"]
            bias = params["Dense_1"]["bias"]
            new = {**params, "Dense_1": {**params["Dense_1"], "bias": 2 * bias + 1}}
            state = state._replace(params={**state.params, "params": new})
        return state, [{"epoch": epoch, "done": done}]


def _items(task: ToyTask, epochs: int) -> float:
    total = 0.0
    for epoch in range(1, epochs + 1):
        for group in task.train_groups(epoch, jax.random.key(0)):
            total += float(np.sum(group["mask"]))
    return total


def test_state_is_folded_every_step_and_kept_from_the_optimizer(tmp_path: Path) -> None:
    task = CountingToyTask()
    result = train(task, config(tmp_path / "run", epochs=2), log=quiet)
    counter = result.state.params["counter"]
    assert int(counter["steps"]) == 2 * STEPS_PER_EPOCH
    assert float(counter["items"]) == _items(task, 2)
    assert set(result.state.opt_state[0].mu) == {"params"}
    # chunk_steps 2: the flat group gives 3 chunks and the sequences 2, so 5 per epoch.
    assert task.calls == [(e, d, 5) for e in (1, 2) for d in range(6)]
    assert result.history[1]["events"] == [{"epoch": 2, "done": d} for d in range(6)]


def test_resume_keeps_the_state_and_repeats_the_run(tmp_path: Path) -> None:
    straight = train(CountingToyTask(), config(tmp_path / "a", epochs=3), log=quiet)
    train(CountingToyTask(), config(tmp_path / "b", epochs=3), max_epochs_this_run=1, log=quiet)
    resumed = train(CountingToyTask(), config(tmp_path / "b", epochs=3, resume=True), log=quiet)
    strip = [{k: v for k, v in r.items() if k != "timing"} for r in straight.history]
    assert [{k: v for k, v in r.items() if k != "timing"} for r in resumed.history] == strip
    assert int(resumed.state.params["counter"]["steps"]) == 3 * STEPS_PER_EPOCH
    same = jax.tree.map(np.array_equal, resumed.state.params, straight.state.params)
    assert all(jax.tree.leaves(same))
