"""Text conditioning shared by training and deployment.

- :mod:`.encoder`: the text-encoder fingerprint, a per-prompt embedding cache, freeing the encoders;
- :mod:`.store`: the sharded prompt-embedding store that ``sd35flash prepare`` writes and
  distillation reads.
"""
