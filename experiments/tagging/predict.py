"""Tagging files with a trained run (``--predict``)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import loop
from experiments.common import mesimp as mesimp_loop
from experiments.corpora.conll import MISSING_TAG, read_untagged, write_tagged
from experiments.loop.checkpoints import CHECKPOINT_DIR
from experiments.tagging.batching import batch_arrays, bucket_ladder, bucketize
from experiments.tagging.features import VOCAB_FILE, Encoded, Vocabularies
from experiments.tagging.model import Tagger, init_params
from experiments.tagging.task import DEFAULT_EVAL_BATCH, TaggerSettings
from meprop_jax import mesimp as mesimp_lib

__all__ = ["load_run", "predict_file", "predict_tags"]


def predict_tags(
    model: Tagger, params: Any, sentences: Sequence[Encoded], batch_size: int = DEFAULT_EVAL_BATCH
) -> list[np.ndarray]:
    """The predicted tag ids of every sentence, in order (bucketed and batched inside)."""
    n_feat = len(model.feature_sizes)
    apply = jax.jit(lambda p, w, f, n: jnp.argmax(model.apply(p, w, f, n, False), axis=-1))
    out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(sentences)
    ladder = bucket_ladder([len(s.words) for s in sentences], batch_size)
    for bucket in bucketize(sentences, n_feat, ladder):
        arrays = batch_arrays(bucket, batch_size)
        preds = np.concatenate(
            [
                np.asarray(apply(params, w, f, n))
                for w, f, n in zip(
                    arrays["words"], arrays["features"], arrays["lengths"], strict=True
                )
            ]
        )
        for row, i in enumerate(bucket.index):
            out[i] = preds[row, : len(sentences[i].words)].astype(np.int32)
    return out


def load_run(run: Path) -> tuple[Vocabularies, Tagger, Any, int]:
    """The vocabularies, model and parameters saved in a run folder.

    Takes the best-dev epoch's parameters if that checkpoint is still kept, otherwise the
    latest checkpoint's; a meSimp run's model has the LSTM width of that checkpoint.

    Returns:
      ``(vocab, model, params, epoch)``.

    Raises:
      loop.ConfigError: no vocabulary file or no checkpoint in ``run``.
    """
    vocab_path = run / VOCAB_FILE
    if not vocab_path.is_file():
        raise loop.ConfigError(f"--out {run}: no {VOCAB_FILE} there (not a tagging run folder?)")
    try:
        data = json.loads(vocab_path.read_text())
        vocab = Vocabularies.from_json(data)
        settings = TaggerSettings(**data["model"], features=vocab.feature_names)
    except (ValueError, KeyError, TypeError) as exc:
        raise loop.ConfigError(f"--out {run}: unreadable {VOCAB_FILE}: {exc}") from exc
    best = None
    results = run / loop.RESULTS_FILE
    if results.is_file():
        best = (json.loads(results.read_text()).get("best") or {}).get("epoch")
    model = settings.model(vocab)
    if settings.mesimp:  # the saved epoch's LSTM is smaller, and its record has no taps
        (width,), best = mesimp_loop.saved_widths(
            run, best, (settings.hidden,), loop.RESULTS_FILE, CHECKPOINT_DIR
        )
        model = settings.model(vocab, hidden=width)
    # Shapes only: compiling the initialisers would cost more than the whole prediction.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    shapes = {name: tree for name, tree in shapes.items() if name != mesimp_lib.TAP_COLLECTION}
    template = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes
    )
    params, epoch = loop.restore_params(run, template, epoch=best)
    return vocab, model, params, epoch


def predict_file(
    run: Path, path: Path, output: Path, fmt: str = "auto", tag_column: str = "xpos"
) -> tuple[int, int, float | None, int]:
    """Tags ``path`` with the run's model and writes ``output`` in the same format.

    The input is anything :func:`experiments.corpora.conll.read_untagged` reads: CoNLL-2000,
    CoNLL-X/U with or without tags (``_``) in the tag column, or plain text (one token a
    line, a blank line between sentences, written back as ``word TAG`` lines). The tag
    column is replaced; every other column and comment line is kept.

    Returns:
      ``(sentences, tokens, accuracy, epoch)``: accuracy (%) against the tags the file
      already had (None when it had none), and the epoch whose parameters were used.
    """
    vocab, model, params, epoch = load_run(run)
    sentences, fmt = read_untagged(path, fmt, tag_column)
    encoded = [vocab.encode(s) for s in sentences]
    preds = predict_tags(model, params, encoded)
    tags = [[vocab.tags.items[int(t)] for t in p] for p in preds]
    write_tagged(output, sentences, tags, fmt, tag_column)
    tokens = sum(len(s.words) for s in sentences)
    pairs = [
        (gold, tag)
        for s, t in zip(sentences, tags, strict=True)
        for gold, tag in zip(s.tags, t, strict=True)
        if gold != MISSING_TAG
    ]
    accuracy = 100.0 * sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    return len(sentences), tokens, accuracy, epoch
