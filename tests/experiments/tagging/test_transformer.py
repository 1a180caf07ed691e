"""The Transformer tagger (``--model transformer``): model, meProp through sparsify, CLI."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.tagging.cli import build_parser, default_out, resolve_files, settings_from_args
from experiments.tagging.model import init_params, token_loss
from experiments.tagging.transformer import TransformerTagger, sparse_apply
from tests.experiments.tagging.toy import run_main, toy_sentences, write_conll2000

TINY = ["--layers", "1", "--d-model", "16", "--heads", "2", "--batch-size", "4"]
TINY += ["--epochs", "2", "--timing-batches", "0", "--devices", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("conll2000")
    return {
        "train": write_conll2000(d / "train.txt", toy_sentences(60, 0)),
        "test": write_conll2000(d / "test.txt", toy_sentences(12, 1)),
    }


def _model() -> TransformerTagger:
    return TransformerTagger(
        vocab_size=30, feature_sizes=(5, 7), num_tags=6, layers=2, d_model=16, heads=2
    )


def _batch(seed: int = 0, time: int = 8):
    rng = np.random.default_rng(seed)
    words = jnp.asarray(rng.integers(2, 30, (3, time)), jnp.int32)
    features = jnp.asarray(rng.integers(0, 5, (3, time, 2)), jnp.int32)
    lengths = jnp.asarray([time, 5, 2], jnp.int32)
    tags = jnp.asarray(rng.integers(0, 6, (3, time)), jnp.int32)
    mask = (jnp.arange(time)[None] < lengths[:, None]).astype(jnp.float32)
    return words, features, lengths, tags, mask


# ---------------------------------------------------------------------------------------------
# The model


def test_padding_changes_no_real_token():
    """Padded keys are masked out: whatever sits past a sentence's end (other ids, more
    padding) leaves the logits of its real tokens as they were."""
    model = _model()
    variables = init_params(model, jax.random.key(0))
    words, features, lengths, _, mask = _batch()
    logits = model.apply(variables, words, features, lengths)
    other = jnp.where(mask > 0, words, 7)
    wider = jnp.pad(other, ((0, 0), (0, 4)), constant_values=9)
    wider_features = jnp.pad(features, ((0, 0), (0, 4), (0, 0)))
    logits2 = model.apply(variables, wider, wider_features, lengths)
    for row, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(logits2[row, :n], logits[row, :n], rtol=1e-5, atol=1e-5)


def test_too_long_a_batch_is_refused():
    model = _model().clone(max_length=6)
    words, features, lengths, _, _ = _batch()
    with pytest.raises(ValueError, match="padded length 8 exceeds the Transformer's 6"):
        model.init(jax.random.key(0), words, features, lengths)


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_meprop_keeps_k_columns_of_the_projections(mode):
    """sparsify's backward: the attention (query, key, value, output) and MLP kernels'
    gradients keep at most k output columns (unified: k for the batch), the forward pass is
    bit-identical, and the output layer, whose input is the unchanged forward, gets the dense
    gradient."""
    model, k = _model(), 3
    variables = init_params(model, jax.random.key(1))
    words, features, lengths, tags, mask = _batch(1)
    dense_apply, sparse = model.apply, sparse_apply(model, k, k, mode)
    out = sparse(variables, words, features, lengths, True)
    assert bool(jnp.all(out == dense_apply(variables, words, features, lengths, True)))

    def grads(apply_fn):
        def loss(params):
            logits = apply_fn({"params": params}, words, features, lengths, True)
            return token_loss(logits, tags, mask)[0]

        return jax.grad(loss)(variables["params"])

    dense, meprop = grads(dense_apply), grads(sparse)
    for block in ("block_0", "block_1"):
        attention, g = meprop[block]["attention"], meprop[block]
        # Output columns: the feature axes after the input's one, or (the attention's output
        # projection, which contracts heads and head_dim) its last axis.
        kernels = {
            "query": np.asarray(attention["query"]["kernel"]).reshape(16, -1),
            "value": np.asarray(attention["value"]["kernel"]).reshape(16, -1),
            "out": np.asarray(attention["out"]["kernel"]).reshape(-1, 16),
            "mlp_in": np.asarray(g["mlp_in"]["kernel"]),
            "mlp_out": np.asarray(g["mlp_out"]["kernel"]),
        }
        for name, columns in kernels.items():
            touched = int(np.sum(np.any(columns != 0, axis=0)))
            width = columns.shape[1]
            if mode == "unified":
                assert 0 < touched <= k, (block, name, touched)
            else:  # per token: k each, together fewer than all columns here
                assert 0 < touched < width, (block, name, touched)
        full = np.asarray(dense[block]["mlp_in"]["kernel"])
        assert np.sum(np.any(full != 0, axis=0)) == full.shape[1]
    np.testing.assert_allclose(
        meprop["output"]["kernel"], dense["output"]["kernel"], rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Command line


def _settings(argv):
    args = build_parser().parse_args([str(a) for a in argv])
    return args, settings_from_args(args, 1)


def test_flags_reach_the_settings_and_name_the_run(corpus):
    files = ["--train-file", corpus["train"], "--test-file", corpus["test"]]
    args, s = _settings(["--model", "transformer", *files])
    assert (s.architecture, s.layers, s.d_model, s.heads) == ("transformer", 2, 256, 4)
    assert (s.k, s.k_attn, s.k_mlp) == (32, 32, 32)  # d/8 by default
    name = default_out(s, resolve_files(args), args).name
    assert name == "tag-train-tx-L2-d256-h4-k32-unified-adam-b8-s0"
    args, s = _settings(["--model", "transformer", "--k", 16, "--k-mlp", 0, *files])
    assert (s.k_attn, s.k_mlp) == (16, 0)
    assert "-ka16-km0-" in default_out(s, resolve_files(args), args).name
    args, s = _settings(["--model", "transformer", "--k", 0, *files])
    assert default_out(s, resolve_files(args), args).name.startswith(
        "tag-train-tx-L2-d256-h4-dense"
    )
    # The LSTM keeps its defaults, names and vocab.json fields.
    args, s = _settings(files)
    assert (s.architecture, s.hidden, s.k) == ("lstm", 500, 10)
    assert default_out(s, resolve_files(args), args).name.startswith("tag-train-k10-unified-h500")
    assert "architecture" not in s.model_json()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "transformer", "--hidden", 64], "--hidden is an LSTM flag"),
        (["--model", "transformer", "--bidirectional"], "--bidirectional is an LSTM flag"),
        (["--model", "transformer", "--mesimp"], "--mesimp is an LSTM flag"),
        (["--model", "transformer", "--error-feedback"], "--error-feedback is an LSTM flag"),
        (["--model", "transformer", "--sparse-update"], "--sparse-update"),
        (["--model", "transformer", "--heads", 3], "--d-model 256 must be divisible by --heads 3"),
        (["--model", "transformer", "--layers", 0], "--layers must be >= 1"),
        (["--model", "transformer", "--k", 256], "--k 256 must be smaller than --d-model 256"),
        (["--model", "transformer", "--k-mlp", 300], "--k-mlp 300 must be smaller"),
        (["--model", "transformer", "--k-attn", -1], "--k-attn must be >= 0"),
        (["--d-model", 64], "--d-model is a Transformer flag"),
        (["--k-attn", 4], "--k-attn is a Transformer flag"),
        (["--model", "gru"], "invalid choice: 'gru'"),
    ],
)
def test_bad_flags_name_the_flag(corpus, tmp_path, capsys, argv, needle):
    files = ["--train-file", corpus["train"], "--test-file", corpus["test"]]
    with pytest.raises(SystemExit) as exit_info:
        run_main([*files, *argv, "--out", tmp_path / "run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 2  # the message and the pointer to --help
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 4])
def test_tiny_run_records_the_model_and_predicts(corpus, tmp_path, capsys, k):
    out = tmp_path / "run"
    files = ["--train-file", corpus["train"], "--test-file", corpus["test"]]
    argv = [*files, "--model", "transformer", *TINY, "--k", k, "--lr", "0.01", "--out", out]
    assert run_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and len(results["epochs"]) == 2
    cfg = results["config"]
    assert cfg["model"] == "transformer" and (cfg["k_attn"], cfg["k_mlp"]) == (k, k)
    assert (cfg["layers"], cfg["d_model"], cfg["heads"]) == (1, 16, 2)
    converted = {layer["path"]: layer["k"] for layer in cfg["sparsified"]}
    if k:
        for path in ("query", "key", "value", "out"):
            assert converted[f"block_0/attention/{path}"] == k
        assert converted["block_0/mlp_in"] == k and converted["block_0/mlp_out"] == k
        assert converted["input"] == 0 and converted["output"] == 0
    else:
        assert cfg["sparsified"] == []
    assert results["epochs"][1]["loss"] < results["epochs"][0]["loss"]
    # A toy language a two-epoch Transformer learns far past always answering the top tag.
    assert results["best"]["test_acc"] > 60.0
    capsys.readouterr()
    tagged = tmp_path / "tagged.txt"
    argv = ["--predict", corpus["test"], "--out", out, "--predict-output", tagged]
    assert run_main(argv) == 0
    said = capsys.readouterr().out
    assert "agreement with the tags" in said and tagged.is_file()
