"""Tests for meSimp in the parser: the shrunk hidden layer computes the same function on its
kept units (training logits and the decoder's precomputed tables), a resumed run repeats a
straight one, and ``--mesimp``/``--export`` on a toy treebank (results.json sizes, the stock
Flax export, the parse-speed pass at a shrunk width)."""

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
from experiments.corpora.treebank import read_treebank
from experiments.loop.programs import init_state
from experiments.parsing import main as parsing
from experiments.parsing import simplify
from experiments.parsing.model import Vocabularies, fast_logits, hidden_tables
from experiments.parsing.task import ParserSettings, ParsingData, ParsingTask, make_examples
from meprop_jax import mesimp
from tests.experiments.parsing.test_cli import write_toy
from tests.helpers import persistent_compilation_cache

HIDDEN, K = 32, 3


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with persistent_compilation_cache(tmp_path_factory.getbasetemp() / "jax-cache"):
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("toy")
    return {
        "train": write_toy(d / "train.conllu", 24, 0),
        "dev": write_toy(d / "dev.conllu", 4, 1),
        "test": write_toy(d / "test.conllu", 4, 2),
    }


def toy_task(toy: dict[str, Path], **kw: Any) -> ParsingTask:
    base = dict(hidden=HIDDEN, k=K, batch_size=32, eval_batch_size=4, mesimp=True)
    settings = ParserSettings(**{**base, **kw})
    train, dev, test = (read_treebank(toy[s], "auto", "auto") for s in ("train", "dev", "test"))
    vocab = Vocabularies.build(train, settings.min_count)
    data = ParsingData(train, dev, test, vocab, make_examples(train, vocab), {})
    return ParsingTask(data, settings)


def test_shrunk_hidden_layer_computes_the_masked_function(toy: dict[str, Path]) -> None:
    """After a prune, the full-width parser with the pruned units masked and the shrunk
    (smaller, padded) one give the same training logits and the same decoder scores."""
    task = toy_task(toy)
    # One program, not the initialisers' operations compiled one by one.
    state = jax.jit(lambda key: init_state(task, optax.adam(1e-2), key))(jax.random.key(0))
    assert set(state.params) == {"params", mesimp.COLLECTION}
    record = state.params[mesimp.COLLECTION]
    hits = np.zeros(HIDDEN, np.int32)
    hits[[0, 3, 7, 8, 21, 31]] = 5
    record = {"hidden": {**record["hidden"], "hits": jnp.asarray(hits), "examples": jnp.int32(10)}}
    state = state._replace(params={**state.params, mesimp.COLLECTION: record})
    log: list[str] = []
    shrunk, events = task.schedule(state, 1, 1, 4, log.append)
    assert events == [{"epoch": 1, "prune": 1, "sizes": [6], "widths": [16]}]
    assert log == ["epoch 1 prune 1: hidden sizes 32 -> 6 (padded 16)"]
    assert shrunk.params["params"]["hidden"]["kernel"].shape[1] == 16
    assert shrunk.params["params"]["output"]["kernel"].shape[0] == 16
    assert shrunk.opt_state[0].nu["params"]["hidden"]["bias"].shape == (16,)
    full = {**state.params, mesimp.COLLECTION: mesimp.prune(record)}
    features = jnp.asarray(task.data.examples.features[:16])
    model_full, model_shrunk = task.model_for(full), task.model_for(shrunk.params)
    assert (model_full.hidden, model_shrunk.hidden) == (HIDDEN, 16)
    logits_full = model_full.apply(full, features, False)
    logits_shrunk = model_shrunk.apply(shrunk.params, features, False)
    np.testing.assert_allclose(np.asarray(logits_shrunk), np.asarray(logits_full), atol=1e-5)
    # The decoder's scorer (precomputed tables, the mask applied) agrees at both widths.
    for model, variables in ((model_full, full), (model_shrunk, shrunk.params)):
        tables = hidden_tables(model, variables)
        fast = fast_logits(model, variables, tables, features)
        np.testing.assert_allclose(np.asarray(fast), np.asarray(logits_full), atol=1e-4)
    # ... and the unmasked network's differ: the prune did change the function.
    logits_all = task.model.apply(state.params, features, False)
    assert np.max(np.abs(np.asarray(logits_all) - np.asarray(logits_full))) > 1e-4


def _config(out: Path, **kw: Any) -> loop.TrainConfig:
    base = dict(epochs=3, devices=1, lr=1e-2, timing_batches=0, chunk_steps=3, progress=False)
    return loop.TrainConfig(out=out, **{**base, **kw})


def _numbers(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    drop = ("timing", "train_wall_s", "eval_s", "probe_s", "compile_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in history]


def test_resumed_run_repeats_a_straight_one(toy: dict[str, Path], tmp_path: Path) -> None:
    """Stopped after the first (pruning) epoch, resuming rebuilds the parser at the shrunk
    width and ends where a straight run does. Slow (several seconds of CPU): three runs."""
    task = toy_task(toy, mesimp_threshold=0.3, mesimp_cycle=1)
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
    toy: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole run through the command line (slow: about 10 s of CPU), the export, and the
    parse-speed pass, which restores the best epoch at its own (shrunk) width."""
    out, export = tmp_path / "run", tmp_path / "export"
    code = parsing.main(
        [str(a) for a in (
            "--train-file", toy["train"], "--dev-file", toy["dev"], "--test-file", toy["test"],
            "--out", out, "--hidden", HIDDEN, "--k", K, "--batch-size", 32, "--devices", 1,
            "--epochs", 3, "--lr", 0.01, "--timing-batches", 0, "--mesimp",
            "--mesimp-cycle", 1, "--mesimp-threshold", 0.3, "--mesimp-prunes-per-epoch", 3,
            "--export", export,
        )]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["mesimp"]
    (size,) = entry["final_sizes"]
    assert 1 <= size < HIDDEN and entry["final_widths"] == [mesimp.padded_width(size, HIDDEN)]
    prunes = entry["prunes"]
    assert {e["epoch"] for e in prunes} == {1, 3}
    steps = -(-results["config"]["train_examples"] // 32)
    assert results["config"]["chunk_steps"] == -(-steps // 3)
    sizes = [e["sizes"][0] for e in prunes]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == size
    assert all(e["widths"] == [mesimp.padded_width(e["sizes"][0], HIDDEN)] for e in prunes)
    # The stock export scores every configuration as the trained parser does.
    model, variables = simplify.load_export(export)
    assert model.hidden == size and variables["params"]["hidden"]["kernel"].shape[1] == size
    assert entry["same_test_heads"] == entry["test_tokens"] > 0
    assert entry["export_test_uas"] == pytest.approx(entry["trained_test_uas"])
    assert entry["trained_test_uas"] == pytest.approx(results["epochs"][-1]["test_uas"])
    task = toy_task(toy)
    final = task.model.clone(hidden=entry["final_widths"][0])
    final_vars, _ = loop.restore_params(out, simplify._abstract(final), epoch=3)
    vocab = Vocabularies.from_json(json.loads((out / "vocab.json").read_text()))
    features = jnp.asarray(make_examples(task.data.train, vocab).features[:20])
    np.testing.assert_allclose(
        np.asarray(model.apply(variables, features)),
        np.asarray(final.apply(final_vars, features, False)),
        rtol=1e-5,
        atol=1e-4,
    )
    # --predict and the parse-speed pass restore the best epoch at its own width.
    _, best_model, _, epoch = parsing.load_run(out)
    assert epoch == results["best"]["epoch"]
    assert best_model.hidden == simplify.saved_width(out, HIDDEN, epoch)[0]
    assert results["parse"]["test_uas"] == pytest.approx(results["best"]["test_uas"])
    printed = capsys.readouterr().out
    assert "epoch 1 prune 1: hidden sizes 32 -> " in printed
    assert f"meSimp: hidden size {size} (padded {entry['final_widths'][0]})" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mesimp", "--k", "0"], "--mesimp needs meProp hidden layers: --k >= 1"),
        (["--mesimp", "--kdim"], "--mesimp needs a meProp hidden layer: drop --kdim"),
        (["--mesimp", "--mesimp-cycle", "0"], "--mesimp-cycle must be >= 1"),
        (["--export", "x"], "--export needs --mesimp"),
    ],
)
def test_bad_flags_name_the_flag(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        parsing.main(
            ["--train-file", "t", "--out", str(tmp_path / "run"), "--devices", "1", *extra]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
