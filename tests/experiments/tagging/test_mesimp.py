"""Tests for meSimp in the LSTM tagger: the shrunk LSTM computes the same function on its
kept units, a resumed run repeats a straight one, and ``--mesimp``/``--export`` on a toy
corpus (results.json sizes, the stock Flax export)."""

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
from experiments.loop.programs import init_state
from experiments.tagging import simplify
from experiments.tagging.features import Vocabularies
from experiments.tagging.predict import predict_file, predict_tags
from experiments.tagging.task import DataFiles, TaggerSettings, TaggingData, TaggingTask
from meprop_jax import mesimp
from tests.experiments.tagging.toy import run_main, toy_sentences, write_conll2000
from tests.helpers import persistent_compilation_cache

HIDDEN, K = 32, 3


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with persistent_compilation_cache(tmp_path_factory.getbasetemp() / "jax-cache"):
        yield


def toy_task(**kw: Any) -> TaggingTask:
    """Toy sentences of 6-8 tokens: one length bucket, so one training program shape."""
    base = dict(hidden=HIDDEN, k=K, batch_size=4, eval_batch_size=8, mesimp=True)
    settings = TaggerSettings(**{**base, **kw})
    train, dev, test = toy_sentences(24, 0), toy_sentences(6, 1), toy_sentences(6, 2)
    vocab = Vocabularies.build(train, settings.features, settings.min_count)
    files = DataFiles(Path("train"), Path("dev"), Path("test"))
    return TaggingTask(TaggingData(train, dev, test, vocab, files), settings)


def test_task_carries_the_lstm_record_as_model_state() -> None:
    task = toy_task()
    variables = jax.eval_shape(task.init, jax.random.key(0))  # shapes only: no compile
    assert set(variables) == {"params", mesimp.COLLECTION}  # no taps: the loop makes them
    record = variables[mesimp.COLLECTION]["lstm"]
    assert record["mask"].shape == record["hits"].shape == (HIDDEN,)
    assert task.state_collections == (mesimp.COLLECTION,)
    assert task.mesimp.hidden == ("lstm",)
    plain = toy_task(mesimp=False)
    assert plain.schedule is None and plain.state_collections == ()
    assert mesimp.COLLECTION not in jax.eval_shape(plain.init, jax.random.key(0))


def test_shrunk_lstm_computes_the_masked_function() -> None:
    """After a prune, the logits of the full-width LSTM with the pruned units masked equal
    those of the shrunk (smaller, padded) LSTM: a unit ties its four gates, its recurrent
    rows and columns and its output row."""
    task = toy_task()
    tx = optax.adam(1e-2)
    # One program, not the initialisers' operations compiled one by one.
    state = jax.jit(lambda key: init_state(task, tx, key))(jax.random.key(0))
    record = state.params[mesimp.COLLECTION]
    hits = np.zeros(HIDDEN, np.int32)
    kept = np.array([1, 4, 5, 9, 17, 20, 30])
    hits[kept] = 5
    record = {"lstm": {**record["lstm"], "hits": jnp.asarray(hits), "examples": jnp.int32(10)}}
    state = state._replace(params={**state.params, mesimp.COLLECTION: record})
    log: list[str] = []
    shrunk, events = task.schedule(state, 1, 1, 4, log.append)
    assert events == [{"epoch": 1, "prune": 1, "sizes": [7], "widths": [16]}]
    assert log == ["epoch 1 prune 1: hidden sizes 32 -> 7 (padded 16)"]
    params = shrunk.params["params"]
    assert params["lstm"]["hi"]["kernel"].shape == (16, 16)
    assert params["lstm"]["ii"]["kernel"].shape[1] == 16
    assert params["output"]["kernel"].shape[0] == 16
    assert shrunk.opt_state[0].mu["params"]["lstm"]["hf"]["kernel"].shape == (16, 16)
    np.testing.assert_array_equal(
        np.asarray(shrunk.params[mesimp.COLLECTION]["lstm"]["mask"]), [1] * 7 + [0] * 9
    )
    # The unpruned network, masked to the kept units at its full width.
    masked = mesimp.prune(record)
    full = {**state.params, mesimp.COLLECTION: masked}
    batch = jax.tree.map(lambda a: a[0], task.eval_groups("dev")[0])
    args = (batch["words"], batch["features"], batch["lengths"], False)
    logits_full = jax.jit(task.model_for(full).apply, static_argnums=4)(full, *args)
    shrunk_apply = jax.jit(task.model_for(shrunk.params).apply, static_argnums=4)
    logits_shrunk = shrunk_apply(shrunk.params, *args)
    np.testing.assert_allclose(np.asarray(logits_shrunk), np.asarray(logits_full), atol=1e-5)
    # ... and differ from the unmasked network's: the prune did change the function.
    logits_all = jax.jit(task.model.apply, static_argnums=4)(state.params, *args)
    assert np.max(np.abs(np.asarray(logits_all) - np.asarray(logits_full))) > 1e-3


def _config(out: Path, **kw: Any) -> loop.TrainConfig:
    base = dict(epochs=3, devices=1, lr=1e-2, timing_batches=0, chunk_steps=2, progress=False)
    return loop.TrainConfig(out=out, **{**base, **kw})


def _numbers(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    drop = ("timing", "train_wall_s", "eval_s", "probe_s", "compile_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in history]


def test_resumed_run_repeats_a_straight_one(tmp_path: Path) -> None:
    """Stopped after the first (pruning) epoch, the checkpoint holds the shrunk LSTM and its
    record; resuming rebuilds the model at that width and ends where a straight run does.

    Slow (about 30 s of CPU): three runs compile the LSTM's training and evaluation programs
    at two widths (the compilation cache shares them between the runs)."""
    task = toy_task(mesimp_threshold=0.3, mesimp_cycle=1)
    quiet = lambda _: None
    straight = loop.train(task, _config(tmp_path / "straight"), log=quiet)
    first = loop.train(task, _config(tmp_path / "split"), max_epochs_this_run=1, log=quiet)
    assert first.status == "stopped"
    resumed = loop.train(task, _config(tmp_path / "split", resume=True), log=quiet)
    assert resumed.status == "complete"
    assert _numbers(resumed.history) == _numbers(straight.history)
    prunes = straight.history[0]["events"]
    assert prunes and prunes[-1]["widths"] == [16] and prunes[-1]["sizes"][0] < HIDDEN
    assert straight.history[1]["events"] == []  # the odd cycle does not prune
    assert jax.tree.all(jax.tree.map(np.array_equal, resumed.state.params, straight.state.params))


def test_cli_mesimp_writes_sizes_and_a_stock_flax_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Slow (about 20 s of CPU): a whole run through the command line, then the export."""
    train = write_conll2000(tmp_path / "train.txt", toy_sentences(24, 0))
    test = write_conll2000(tmp_path / "test.txt", toy_sentences(6, 2))
    out, export = tmp_path / "run", tmp_path / "export"
    code = run_main(
        ["--train-file", train, "--test-file", test, "--out", out, "--hidden", HIDDEN,
         "--k", K, "--batch-size", 4, "--devices", 1, "--epochs", 3, "--lr", 0.01,
         "--timing-batches", 0, "--mesimp", "--mesimp-cycle", 1, "--mesimp-threshold", 0.3,
         "--mesimp-prunes-per-epoch", 2, "--export", export]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["mesimp"]
    assert results["config"]["mesimp"] and results["config"]["chunk_steps"] == 3  # 6 steps / 2
    (size,) = entry["final_sizes"]
    assert 1 <= size < HIDDEN and entry["final_widths"] == [mesimp.padded_width(size, HIDDEN)]
    prunes = entry["prunes"]
    assert {e["epoch"] for e in prunes} == {1, 3}  # epoch 2: odd cycle
    assert [e["prune"] for e in prunes if e["epoch"] == 1] == [1, 2]
    sizes = [e["sizes"][0] for e in prunes]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == size
    assert all(e["widths"] == [mesimp.padded_width(e["sizes"][0], HIDDEN)] for e in prunes)
    # The export: a stock flax.linen tagger of the surviving size, tagging as the trained one.
    model, variables = simplify.load_export(export)
    assert model.hidden == size
    assert variables["params"]["lstm"]["hi"]["kernel"].shape == (size, size)
    assert entry["same_test_predictions"] == entry["test_tokens"] > 0
    assert entry["export_test_acc"] == pytest.approx(results["epochs"][-1]["test_acc"])
    vocab = Vocabularies.from_json(json.loads((out / "vocab.json").read_text()))
    encoded = [vocab.encode(s) for s in toy_sentences(6, 2)]
    gold = np.concatenate([e.tags for e in encoded])
    stock = np.concatenate(predict_tags(model, variables, encoded, 8))
    assert 100.0 * np.mean(stock == gold) == pytest.approx(entry["export_test_acc"])
    # --predict restores the best epoch at its own (shrunk) width and tags as it did.
    sentences, tokens, accuracy, epoch = predict_file(out, test, tmp_path / "tagged.txt")
    assert (sentences, tokens) == (6, len(gold))
    assert accuracy == pytest.approx(results["epochs"][epoch - 1]["test_acc"])
    printed = capsys.readouterr().out
    assert "epoch 1 prune 1: hidden sizes 32 -> " in printed
    assert f"meSimp: LSTM size {size} (padded {entry['final_widths'][0]})" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mesimp", "--k", "0"], "--mesimp needs meProp hidden layers: --k >= 1"),
        (["--mesimp", "--bidirectional"], "--mesimp shrinks the one-way LSTM"),
        (["--mesimp", "--mesimp-threshold", "1"], "--mesimp-threshold must be in (0, 1)"),
        (["--mesimp", "--chunk-steps", "5"], "drop --chunk-steps"),
        (["--export", "x"], "--export needs --mesimp"),
    ],
)
def test_bad_flags_name_the_flag(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        run_main(["--train-file", "t", "--out", tmp_path / "run", "--devices", "1", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
