"""Evaluation: image-quality metrics (Frechet distance in EfficientNet-Lite0 space, ...).

Submodules are imported explicitly (``from sd35flash.evaluate.fd import FDScorer``); this package
file stays import-free so that loading one metric never pulls in the others' heavy dependencies.
"""
