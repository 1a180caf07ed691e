"""How many programs a tagging run compiles: one training program per length bucket, whatever
the chunking, and one evaluation program for every evaluation length."""

from pathlib import Path

from experiments import loop
from experiments.corpora.conll import Sentence
from experiments.loop import programs
from experiments.tagging.features import Vocabularies
from experiments.tagging.task import DataFiles, TaggerSettings, TaggingData, TaggingTask
from tests.experiments.tagging.toy import toy_sentences


def _long(sentences: list[Sentence]) -> Sentence:
    """The sentences joined into one (a longer sentence for a longer bucket)."""
    return Sentence(
        tuple(w for s in sentences for w in s.words), tuple(t for s in sentences for t in s.tags)
    )


def test_one_training_program_per_bucket(tmp_path, monkeypatch):
    short = toy_sentences(10, 0)  # 5 to 7 words: the bucket of 8
    longer = [_long([s, s, s]) for s in toy_sentences(6, 1) if len(s.words) == 6]
    train = short + longer
    settings = TaggerSettings(
        hidden=8, k=2, word_dim=4, feature_dim=2, min_count=1, batch_size=2, eval_batch_size=4
    )
    vocab = Vocabularies.build(train, settings.features, settings.min_count)
    files = DataFiles(Path("train"), None, Path("test"))
    data = TaggingData(train, short[:3] + longer[:1], short[3:5], vocab, files)
    task = TaggingTask(data, settings)
    buckets = task.buckets["train"]
    # Two buckets (8 and 18), of 5 steps (chunks of 2, 2 and 1) and at least 1.
    assert [b.length for b in buckets] == [8, 18] and len(buckets[0]) == 10
    eval_lengths = {b.length for split in ("dev", "test") for b in task.buckets[split]}

    compiled: list[str] = []
    original = programs.Programs.compiled

    def counting(self, name, *args, **static):
        fn, seconds = original(self, name, *args, **static)
        if seconds > 0:
            compiled.append(name)
        return fn, seconds

    monkeypatch.setattr(programs.Programs, "compiled", counting)
    # Chunks of 2 steps: every odd bucket also has a chunk of 1 step, no new program.
    cfg = loop.TrainConfig(out=tmp_path, epochs=1, devices=1, chunk_steps=2, timing_batches=0)
    result = loop.train(task, cfg, log=lambda _: None)

    assert result.status == "complete"
    assert result.history[0]["steps"] == sum((len(b) + 1) // 2 for b in buckets)
    assert compiled.count("train_chunk") == len(buckets)
    assert len(eval_lengths) == 2 and compiled.count("evaluate") == 1
