"""Corpus readers and writers shared by the language tasks (CoNLL-2000, CoNLL-X, CoNLL-U)."""
