"""POS tagging with a meProp LSTM, trained by the shared loop (``python -m experiments.tagging``).

The model is the paper's POS tagger: every token is a 50-dimensional word embedding plus seven
20-dimensional feature embeddings (190 inputs), fed to a one-layer LSTM of ``--hidden`` 500
units (``meprop_jax.LSTMCell``: the gate pre-activation gradient keeps ``--k`` entries per gate
at every time step) and a dense softmax output layer over the tags (never sparsified, as in the
paper). ``--bidirectional`` adds a second LSTM reading the sentence right to left; the two
outputs are concatenated. Optional inverted dropout (``--dropout``) acts on the 190 inputs and
on the LSTM outputs.

``--model transformer`` replaces the LSTM with a Transformer encoder of stock Flax layers
(:mod:`~experiments.tagging.transformer`): the same 190 inputs projected to ``--d-model`` 256,
learned positions, ``--layers`` 2 pre-LayerNorm blocks of ``--heads`` 4 with an MLP 4 x
``--d-model``, padded keys masked out of attention, and the same dense output layer. meProp
comes from :func:`meprop_jax.sparsify`: ``--k`` (default 32) for the attention projections
(query, key, value, output) and the MLP layers, ``--k-attn`` / ``--k-mlp`` to set them apart.
The results record says which model trained (``config.model``) and what ``sparsify_report``
said of every layer (``config.sparsified``).

Vocabularies (all built from the training sentences, saved in ``<out>/vocab.json``):

* words: lowercased, every digit replaced by ``0``; forms seen fewer than ``--min-count``
  (default 2) times map to ``<unk>``, in training too, so the ``<unk>`` embedding is learned;
* the seven features (:data:`FEATURES`), each value with its own ``<unk>`` under the same
  ``--min-count`` rule. The default set, :data:`DEFAULT_FEATURES`:

  - ``caps``: capitalisation pattern of the raw word: ``lower``, ``init`` (first letter
    upper case, no other), ``upper`` (two or more letters, all upper case), ``mixed``, or
    ``none`` (no letters);
  - ``digit``: ``none`` (no digit), ``number`` (only digits and ``, . - / :``), or ``some``;
  - ``hyphen``: whether the word contains ``-``;
  - ``prefix2``, ``suffix2``, ``suffix3``: first two, last two and last three characters of
    the normalised word;
  - ``next``: the normalised *next* word (``</s>`` at the end), thresholded like the words.

  The paper does not list its seven features. The last one is our choice: the one-way LSTM
  sees only the words to the left, and English tags often hinge on the next word ("that
  the" vs "that is", "fined by" vs "was fined"). ``--features caps,digit,hyphen,prefix2,
  suffix2,suffix3,length`` gives a purely word-internal set (``length``: the word length,
  1-7, ``8-9``, ``10+``).
* tags: the training tags. A dev or test token whose tag never occurs in training can never
  be predicted: it counts as an error (and adds nothing to the loss).

Batching: sentences are grouped by length into at most six buckets whose lengths are chosen
from the training sentences to waste the fewest LSTM steps on padding
(:func:`~experiments.tagging.batching.bucket_ladder`; a longer dev or test sentence gets the
next power of two), padded to the bucket length and cut into minibatches of ``--batch-size``
sentences; the last minibatch of a bucket is filled up with empty sentences. Each bucket is
one batch group of the shared loop (:mod:`experiments.loop`), which interleaves their chunks
in a random order; sentences are shuffled within their bucket every epoch, deterministically
from (``--seed``, epoch). Every bucket length is one more compiled training program, so few
buckets keep compilation short. Evaluation runs one minibatch per call, every minibatch padded
to one length, so that dev and test share a single program; its LSTM loop stops at each
minibatch's longest sentence, so the padding costs no LSTM step. The programs compile at XLA's
backend optimization level 2 (``TaggingTask.compiler_options``) instead of its default 3,
about a fifth faster and no slower to run. Padded positions carry mask 0: they are left out
of the loss and the accuracy, and the LSTMs get the true lengths (``seq_lengths``), so the
backward LSTM starts at each sentence's last word and padding changes no prediction.

Defaults: Adam, lr 1e-3 (AdaGrad: 0.01, the paper's POS value); minibatches of 8 sentences
(the paper used 1); meProp unified top-k with k = 10 per gate (2% of the 500 units; the paper
used k = 5 with per-example selection); no dropout (the paper's Table 1); 15 epochs, the
best-dev epoch reported; no timing probes (``--timing-batches 20`` adds forward/backward/
update estimates, at the price of three more compiled programs per bucket). ``--k 0`` is
ordinary backprop. Why 8 sentences: after one epoch of CoNLL-2000 (two CPU cores, default features),
minibatches of 32 reach 95.0% dev with ordinary backprop and 89.9% with k = 10 in 14-18 s of
training; minibatches of 8 reach 96.5% and 96.1% in about 50 s. meProp, whose updates are
sparse, needs the extra updates most.

Corpora (``--corpus``, files under ``--data-dir`` or ``$MEPROP_DATA_DIR``):

* ``conll2000`` (the default when no ``--train-file`` is given): ``conll2000/train.txt.gz``
  and ``conll2000/test.txt.gz``; it has no dev file, so the last 10% of the training
  sentences are held out as dev (:func:`experiments.corpora.conll.split_dev`);
* ``ptb-dep-sample``: ``ptb-dep-sample/{train,dev,test}.conllx.gz`` (gold POSTAG column).

``--train-file``/``--dev-file``/``--test-file`` name files directly (any format of
:mod:`experiments.corpora.conll`) and override the corpus's. ``--predict FILE --out RUN`` tags
``FILE`` with the parameters saved in the run folder ``RUN`` (the best-dev epoch if its
checkpoint is still kept, otherwise the latest) and writes it in its own format: CoNLL-2000,
CoNLL-X/U (tagged, or with ``_`` in the tag column), or plain text with one token a line and
a blank line between sentences (written back as ``word TAG`` lines). ``--resume`` refuses a
run made with other settings or vocabularies before writing anything into it.

Modules: :mod:`~experiments.tagging.features` (word features, vocabularies),
:mod:`~experiments.tagging.batching` (buckets, minibatches), :mod:`~experiments.tagging.model`
(the :class:`~experiments.tagging.model.Tagger`), :mod:`~experiments.tagging.transformer`
(the Transformer tagger), :mod:`~experiments.tagging.task` (settings,
data, the loop's task), :mod:`~experiments.tagging.predict` (``--predict``) and
:mod:`~experiments.tagging.cli` (the flags).

Examples:
  MEPROP_DATA_DIR=../shared/data python -m experiments.tagging --epochs 1 --limit-train 500
  python -m experiments.tagging --corpus ptb-dep-sample --k 0        # ordinary backprop
  python -m experiments.tagging --predict test.txt --out runs/tag-conll2000-k10-unified-...
"""
