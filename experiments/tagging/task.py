"""Settings, data loading and the tagging task of the shared loop."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments import loop
from experiments.common import feedback_flags
from experiments.common import mesimp as mesimp_loop
from experiments.common.files import recorded_path
from experiments.common.state_hooks import StateHooks
from experiments.corpora.conll import DataError, Sentence, read_tagged, split_dev
from experiments.tagging.batching import MIN_BUCKET, batch_arrays, bucket_ladder, bucketize
from experiments.tagging.features import DEFAULT_FEATURES, VOCAB_FILE, Vocabularies
from experiments.tagging.model import Tagger, init_params, token_loss
from experiments.tagging.transformer import TransformerTagger, layer_report, sparse_apply
from meprop_jax import AdaptiveK
from meprop_jax import mesimp as mesimp_lib

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_BATCH",
    "DEFAULT_EVAL_BATCH",
    "DEFAULT_K",
    "DEFAULT_TRANSFORMER_K",
    "DataFiles",
    "TaggerSettings",
    "TaggingData",
    "TaggingTask",
    "load_data",
]

DEFAULT_BATCH = 8
DEFAULT_EVAL_BATCH = 64
DEFAULT_K = 10
#: The Transformer's default k: d_model / 8 of the default width 256.
DEFAULT_TRANSFORMER_K = 32
#: ``--model`` choices; the first is the default.
ARCHITECTURES = ("lstm", "transformer")


@dataclasses.dataclass(frozen=True)
class TaggerSettings:
    """The tagger's own settings (validated; see :func:`settings_from_args`).

    ``architecture`` picks the model: ``"lstm"`` (``hidden``, ``k`` per gate, ``bidirectional``
    and meSimp/feedback/adaptive k) or ``"transformer"`` (``layers``, ``d_model``, ``heads``;
    ``k_attn`` and ``k_mlp`` for meProp through ``sparsify``, ``k`` their common value).
    """

    architecture: str = "lstm"
    hidden: int = 500
    k: int = DEFAULT_K
    mode: str = "unified"
    dropout: float = 0.0
    bidirectional: bool = False
    word_dim: int = 50
    feature_dim: int = 20
    features: tuple[str, ...] = DEFAULT_FEATURES
    min_count: int = 2
    batch_size: int = DEFAULT_BATCH
    eval_batch_size: int = DEFAULT_EVAL_BATCH
    limit_train: int | None = None
    mesimp: bool = False
    mesimp_threshold: float = mesimp_lib.DEFAULT_THRESHOLD
    mesimp_cycle: int = mesimp_loop.DEFAULT_CYCLE
    mesimp_prunes_per_epoch: int = mesimp_loop.DEFAULT_PRUNES_PER_EPOCH
    feedback: float = 0.0
    adaptive: AdaptiveK | None = None
    layers: int = 2
    d_model: int = 256
    heads: int = 4
    k_attn: int = 0
    k_mlp: int = 0
    kernel_layout: str = "in_out"

    @property
    def transformer(self) -> bool:
        return self.architecture == "transformer"

    def model(self, vocab: Vocabularies, hidden: int | None = None) -> Tagger | TransformerTagger:
        """The tagger these settings describe, sized for ``vocab``; ``hidden`` overrides the
        LSTM width (meSimp's shrunk cell)."""
        if self.transformer:
            return TransformerTagger(
                vocab_size=len(vocab.words),
                feature_sizes=tuple(len(v) for v in vocab.features),
                num_tags=len(vocab.tags),
                layers=self.layers,
                d_model=self.d_model,
                heads=self.heads,
                dropout=self.dropout,
                word_dim=self.word_dim,
                feature_dim=self.feature_dim,
            )
        return Tagger(
            vocab_size=len(vocab.words),
            feature_sizes=tuple(len(v) for v in vocab.features),
            num_tags=len(vocab.tags),
            hidden=self.hidden if hidden is None else hidden,
            k=self.k,
            mode=self.mode.replace("-", "_"),
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            word_dim=self.word_dim,
            feature_dim=self.feature_dim,
            record=self.mesimp,
            feedback=self.feedback,
            adaptive=self.adaptive,
            kernel_layout=self.kernel_layout,
        )

    def model_json(self) -> dict[str, Any]:
        """The fields that shape the model (stored with the vocabularies)."""
        d = dataclasses.asdict(self)
        if self.transformer:
            fields = ["architecture", "layers", "d_model", "heads", "k", "k_attn", "k_mlp"]
            fields += ["mode", "dropout", "word_dim", "feature_dim"]
            return {k: d[k] for k in fields}
        # The LSTM's fields as before the Transformer came: older runs' vocab.json still match.
        fields = ["hidden", "k", "mode", "dropout", "bidirectional", "word_dim", "feature_dim"]
        # Only when on, so that the vocab.json of other runs (and their --resume) is unchanged.
        fields += ["mesimp"] if self.mesimp else []
        fields += ["kernel_layout"] if self.kernel_layout != "in_out" else []
        return {k: d[k] for k in fields}


@dataclasses.dataclass(frozen=True)
class DataFiles:
    """Where the three splits come from; ``dev`` None: hold out 10% of train."""

    train: Path
    dev: Path | None
    test: Path
    format: str = "auto"
    tag_column: str = "xpos"
    corpus: str | None = None


@dataclasses.dataclass(frozen=True)
class TaggingData:
    """The three splits, read, and the training vocabularies."""

    train: list[Sentence]
    dev: list[Sentence]
    test: list[Sentence]
    vocab: Vocabularies
    files: DataFiles


def load_data(files: DataFiles, settings: TaggerSettings) -> TaggingData:
    """Reads the splits (dev held out from train when there is no dev file), applies
    ``limit_train`` and builds the vocabularies from the training sentences."""
    train = read_tagged(files.train, files.format, files.tag_column)
    if files.dev is None:
        if len(train) < 2:
            raise DataError(f"{files.train}: need at least 2 sentences to hold out a dev set")
        train, dev = split_dev(train, 0.1)
    else:
        dev = read_tagged(files.dev, files.format, files.tag_column)
    test = read_tagged(files.test, files.format, files.tag_column)
    if settings.limit_train is not None:
        train = train[: settings.limit_train]
    vocab = Vocabularies.build(train, settings.features, settings.min_count)
    return TaggingData(train, dev, test, vocab, files)


def _pad_time(a: np.ndarray, length: int) -> np.ndarray:
    """``a [steps, batch, time, ...]`` zero-padded to ``time = length``; ``[steps, batch]``
    arrays (the lengths) as they are."""
    if a.ndim < 3:
        return a
    pad = [(0, 0)] * a.ndim
    pad[2] = (0, length - a.shape[2])
    return np.pad(a, pad)


@dataclasses.dataclass(eq=False)
class TaggingTask(StateHooks):
    """POS tagging as a :class:`experiments.loop.Task`.

    Training: one batch group per length bucket (at most :data:`~.batching.MAX_BUCKETS`,
    chosen from the training lengths by :func:`~.batching.bucket_ladder`). Evaluation: one
    group per minibatch, bucket by bucket, every one padded to :attr:`eval_length`, so that
    dev and test share one compiled program (the model's evaluation loop stops at each
    batch's longest sentence, so the extra padding costs no LSTM step).
    """

    data: TaggingData
    settings: TaggerSettings
    name: str = "tagging"
    #: XLA's backend optimization level 2 instead of its default 3: the training programs
    #: compile about a fifth faster and train as fast (level 1 compiles no faster than 2).
    compiler_options: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"xla_backend_optimization_level": 2}
    )

    def __post_init__(self) -> None:
        vocab, n_feat, s = self.data.vocab, len(self.settings.features), self.settings
        self.model = s.model(vocab)
        #: ``model.apply``; for the Transformer with meProp, its ``sparsify`` version.
        self.apply_fn = self.model.apply
        if s.transformer:
            self.apply_fn = sparse_apply(self.model, s.k_attn, s.k_mlp, s.mode.replace("-", "_"))
        train_lengths = [len(s.words) for s in self.data.train]
        self.ladder = bucket_ladder(train_lengths, self.settings.batch_size)
        self.buckets = {
            split: bucketize([vocab.encode(s) for s in sentences], n_feat, self.ladder)
            for split, sentences in (
                ("train", self.data.train),
                ("dev", self.data.dev),
                ("test", self.data.test),
            )
        }
        #: The one padded length of every evaluation minibatch.
        self.eval_length = max(
            (b.length for split in ("dev", "test") for b in self.buckets[split]),
            default=MIN_BUCKET,
        )

    # meSimp (see experiments.tagging.simplify): the LSTM cell's record is model state.
    @property
    def mesimp(self) -> mesimp_loop.MesimpSchedule | None:
        """The meSimp hooks (the LSTM cell, then the output layer), or None."""
        s = self.settings
        if not s.mesimp:
            return None
        layers = ("lstm", "output")
        return mesimp_loop.MesimpSchedule(layers, s.mesimp_threshold, s.mesimp_cycle, lstm=True)

    def model_for(self, params: Any) -> Tagger:
        """The tagger at the LSTM width of ``params`` (it shrinks under meSimp)."""
        if not self.settings.mesimp:
            return self.model
        (width,) = mesimp_loop.record_widths(params[mesimp_lib.COLLECTION], ("lstm",))
        return self.model if width == self.model.hidden else self.model.clone(hidden=width)

    def init(self, key: jax.Array) -> Any:
        """Flax-default initial parameters (with meSimp, and the record without its taps,
        which the loop makes each step)."""
        variables = init_params(self.model, key)
        if self.settings.mesimp:
            variables = {k: v for k, v in variables.items() if k != mesimp_lib.TAP_COLLECTION}
        if self.settings.adaptive is not None:
            variables = feedback_flags.stats_from_init(variables)
        return variables

    def loss_fn(
        self, params: Any, batch: Mapping[str, jax.Array], key: jax.Array, train: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean token cross-entropy over the real tokens; correct and count as aux."""
        k_dropout, k_meprop = jax.random.split(key)
        apply_fn = self.apply_fn if self.settings.transformer else self.model_for(params).apply
        logits = apply_fn(
            params,
            batch["words"],
            batch["features"],
            batch["lengths"],
            train,
            rngs={"dropout": k_dropout, "meprop": k_meprop},
        )
        return token_loss(logits, batch["tags"], batch["mask"])

    def train_groups(self, epoch: int, key: jax.Array) -> list[dict[str, np.ndarray]]:
        """One group per bucket, its sentences shuffled by ``key`` (seed and epoch)."""
        del epoch  # the key already depends on it
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        return [
            batch_arrays(b, self.settings.batch_size, rng.permutation(len(b)))
            for b in self.buckets["train"]
        ]

    def eval_groups(self, split: str) -> list[dict[str, np.ndarray]]:
        """One group per minibatch of ``split`` (``[1, batch, ...]`` arrays, padded to
        :attr:`eval_length`), bucket by bucket, in file order within a bucket."""
        groups = []
        for bucket in self.buckets[split]:
            arrays = batch_arrays(bucket, self.settings.eval_batch_size)
            arrays = {k: _pad_time(a, self.eval_length) for k, a in arrays.items()}
            steps = len(arrays["words"])
            groups += [{k: a[i : i + 1] for k, a in arrays.items()} for i in range(steps)]
        return groups

    def config(self) -> dict[str, Any]:
        """The settings plus the data files and sizes."""
        d, f = self.data, self.data.files
        settings = dataclasses.asdict(self.settings)
        settings["features"] = list(self.settings.features)
        settings["model"] = settings.pop("architecture")
        return {
            **settings,
            "sparsified": self.layer_report(),
            "corpus": f.corpus,
            # Relative to the data folder: a record names no machine's folders.
            "train_file": recorded_path(f.train),
            "dev_file": recorded_path(f.dev),
            "test_file": recorded_path(f.test),
            "format": f.format,
            "tag_column": f.tag_column,
            "train_sentences": len(d.train),
            "train_tokens": sum(len(s.words) for s in d.train),
            "dev_sentences": len(d.dev),
            "test_sentences": len(d.test),
            "word_vocab": len(d.vocab.words),
            "num_tags": len(d.vocab.tags),
        }

    def layer_report(self) -> list[dict[str, Any]]:
        """The Transformer's candidate layers and their ``k`` (``sparsify_report``, at a
        training batch's shape); empty for the LSTM and for dense training."""
        if not self.settings.transformer:
            return []
        shapes = jax.eval_shape(functools.partial(init_params, self.model), jax.random.key(0))
        variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
        arrays = batch_arrays(self.buckets["train"][0], self.settings.batch_size)
        args = (arrays["words"][0], arrays["features"][0], arrays["lengths"][0], True)
        return layer_report(self.apply_fn, variables, args)

    def vocab_json(self) -> dict[str, Any]:
        """What ``vocab.json`` holds: the vocabularies and the model settings."""
        return {**self.data.vocab.to_json(), "model": self.settings.model_json()}

    def check_resume(self, out: Path) -> None:
        """Refuses to resume the run in ``out`` when its ``vocab.json`` differs from this
        task's (other ``--min-count``, ``--features``, ``--limit-train``, model flags or data):
        the saved embeddings are indexed by the saved vocabularies. Writes nothing.

        Raises:
          loop.ConfigError: naming what differs.
        """
        path = out / VOCAB_FILE
        if not path.is_file():
            return  # nothing saved to contradict; save_vocab writes it
        try:
            saved = json.loads(path.read_text())
        except ValueError as exc:
            raise loop.ConfigError(
                f"--resume: unreadable {path} ({exc}); pass --overwrite to start afresh"
            ) from exc
        current = self.vocab_json()
        if saved == current:
            return
        changed = [
            f"{key} ({saved.get(key)!r} there, {current[key]!r} now)"
            for key in ("min_count", "model")
            if saved.get(key) != current[key]
        ]
        if list(saved.get("features", {})) != list(current["features"]):
            changed.append(
                f"features ({list(saved.get('features', {}))!r} there, "
                f"{list(current['features'])!r} now)"
            )
        if not changed:
            changed.append("the vocabularies built from the training data (--limit-train or data)")
        raise loop.ConfigError(
            f"--resume: {out} was trained with other settings for {', '.join(changed)}"
        )

    def save_vocab(self, out: Path) -> Path:
        """Writes ``out/vocab.json`` (see :meth:`vocab_json`); an identical file is left as
        it is."""
        out.mkdir(parents=True, exist_ok=True)
        path = out / VOCAB_FILE
        text = json.dumps(self.vocab_json()) + "\n"
        if not (path.is_file() and path.read_text() == text):
            path.write_text(text)
        return path
