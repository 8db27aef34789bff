"""Blind pairwise user studies of text-to-image models.

- :mod:`.folder`: the study folder (manifest, images, secrets) and its path rules;
- :mod:`.create`: ``study create``, every model draws every prompt with the same seeds;
- :mod:`.db`: the SQLite vote store (WAL) and per-annotator assignment of pairs;
- :mod:`.app`: the FastAPI web app and its HTTP API (``study serve``);
- :mod:`.ratings`: Bradley-Terry / ELO-scale scores, bootstrap CIs, agreement;
- :mod:`.results`: ``study results``, the JSON and HTML report with the compute plot;
- :mod:`.oracle`: a simulated annotator that votes with the shapes-world judge;
- :mod:`.commands`: the ``sd35flash study`` command line.
"""
