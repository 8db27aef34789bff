"""Memory planning arithmetic: parameter counts, weight formats and activation formulas of SD3
pipelines (``architecture``), and the training-memory planner (``train``). Below both ``distill/``
(which refuses a run that will not fit) and ``deploy/tools/`` (`sd35flash plan`, the GPU benches).
"""
