"""Deployment runtime: device presets, text-encoder restructuring, transformer quantization, the
preset-aware loader and ``sd35flash bench``. See ``docs/ARCHITECTURE.md`` ("deploy/").

Modules: ``presets`` (the recipes), ``text_encoders`` (T5 on/off/int8; the embedding cache is ``text/``),
``quantize`` (torchao / quanto methods, save and reload), ``sensitivity`` (mixed precision under an
error budget), ``pipeline`` (load a model folder under a preset), ``bench`` (per-preset latency,
memory, size, quality), ``commands`` (CLI wiring). Kept import-light: nothing here imports torch.
"""
