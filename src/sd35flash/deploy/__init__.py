"""Deployment, in three sub-packages of different kinds (see ``docs/ARCHITECTURE.md``, "deploy/"):

- ``runtime/``: the library that loads and runs a model under a device preset -- ``presets`` (the
  recipes), ``text_encoders`` (T5 on/off/int8; the embedding cache is ``text/``), ``quantize``
  (torchao / quanto methods, save and reload), ``sensitivity`` (mixed precision under an error
  budget), ``pipeline`` (load a model folder under a preset). It imports neither ``world/`` nor
  ``evaluate/``.
- ``export/``: ONNX export of the five networks and the onnxruntime backend the runtime can switch to.
- ``tools/``: measurements about deployment -- the memory planner (`sd35flash plan`) and its
  MemTracker checks, ``sd35flash bench`` and the GPU benchmarks. Tools may import anything below them.

``commands`` wires them to the CLI. Kept import-light: nothing here imports torch at package import.
"""
