"""Training data that is not the shapes world's own: prompt sources (``.txt`` / ``.jsonl`` /
``.parquet`` / shapes) and their rank-sharded, epoch-seeded order (:mod:`.prompts`)."""
