"""Mixed-precision quantization: a per-layer sensitivity scan under an output-error budget.

Calibration: the transformer inputs ``(x_t, t, c)`` the model actually sees while sampling a fixed
prompt set with its own schedule, captured by a forward hook (at most ``max_calls`` steps, evenly
spread over the schedule), and the unquantized model's outputs ``y`` on them.

Error of a model variant ``q`` on that batch (relative L2, over all captured calls):

    err(q) = sqrt(sum_i ||q(x_i) - y_i||^2) / sqrt(sum_i ||y_i||^2)

Scan: for every ``nn.Linear`` ``l``, quantize only ``l`` and measure ``err`` (its sensitivity).
Then keep the ``k`` most sensitive layers in their original precision and quantize the rest, with
``k`` the smallest count whose ``err <= budget``, found by bisection on ``k`` (the error is taken
to fall as more layers are kept: ``log2(#layers)`` evaluations instead of one per layer). The kept
layers are reported, most sensitive first; a loose budget keeps none, a budget of 0 keeps all.

Cost: one calibration pass per Linear layer plus the bisection. The result is cached by
``deploy/runtime/pipeline.py`` per transformer fingerprint, method and budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .quantize import GROUP_SIZE, check_supported, get_method, linear_names, quantize_linear, set_submodule

__all__ = ["Calibration", "SensitivityReport", "capture_calibration", "relative_error", "sensitivity_scan"]


@dataclass
class Calibration:
    """Captured transformer calls: keyword arguments of ``transformer(...)`` (tensors, detached)."""

    calls: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def outputs(self, model: nn.Module) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [model(**kw, return_dict=False)[0].float() for kw in self.calls]


def capture_calibration(pipe, prompts: Sequence[str], schedule: Sequence[float], guidance: float = 1.0,
                        seed: int = 0, max_calls: int = 4, use_t5: bool = True, encoder=None) -> Calibration:
    """Sample ``prompts`` with ``schedule`` and record the transformer inputs of up to ``max_calls``
    steps (evenly spaced, first and last included)."""
    from ...sampling import generate

    seen: list[dict[str, torch.Tensor]] = []

    def hook(_module, args, kwargs):
        seen.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate(pipe, list(prompts), [seed + i for i in range(len(prompts))], schedule, guidance=guidance,
                 use_t5=use_t5, batch_size=len(prompts), encoder=encoder)
    finally:
        handle.remove()
    if len(seen) > max_calls:
        idx = sorted({round(i * (len(seen) - 1) / (max_calls - 1)) for i in range(max_calls)}) if max_calls > 1 else [0]
        seen = [seen[i] for i in idx]
    return Calibration(seen)


def relative_error(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """``sqrt(sum ||o - r||^2) / sqrt(sum ||r||^2)`` over matching output tensors."""
    num = sum(float((o.detach().float() - r.detach().float()).pow(2).sum()) for o, r in zip(outputs, reference))
    den = sum(float(r.detach().float().pow(2).sum()) for r in reference)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


@dataclass
class SensitivityReport:
    method: str
    budget: float
    layer_error: dict[str, float]  # error with only this layer quantized
    kept: list[str]  # left unquantized, most sensitive first
    error_all_quantized: float
    error_final: float
    num_linear: int

    def to_dict(self) -> dict:
        return asdict(self)


def sensitivity_scan(model: nn.Module, method: str, calib: Calibration, budget: float,
                     group_size: int = GROUP_SIZE, progress: bool = True) -> SensitivityReport:
    """Quantize ``model`` in place with ``method``, keeping the most sensitive ``nn.Linear`` layers
    unquantized until the calibration error is within ``budget`` (see the module docstring)."""
    if budget < 0:
        raise ValueError("the error budget must be >= 0")
    p = next(model.parameters())
    check_supported(method, p.device)
    if get_method(method).library == "":
        return SensitivityReport(method, budget, {}, [], 0.0, 0.0, 0)
    names = linear_names(model)
    original = {n: model.get_submodule(n) for n in names}
    reference = calib.outputs(model)
    quantized: dict[str, nn.Module] = {}
    sens: dict[str, float] = {}
    for n in tqdm(names, desc=f"sensitivity ({method})", disable=not progress, leave=False):
        q = quantize_linear(original[n], method, group_size, copy_first=True)
        quantized[n] = q
        set_submodule(model, n, q)
        sens[n] = relative_error(calib.outputs(model), reference)
        set_submodule(model, n, original[n])
    for n in names:
        set_submodule(model, n, quantized[n])
    err_all = relative_error(calib.outputs(model), reference)
    order = sorted(names, key=lambda n: sens[n], reverse=True)

    def error_keeping(k: int) -> float:
        for i, n in enumerate(order):
            set_submodule(model, n, original[n] if i < k else quantized[n])
        return relative_error(calib.outputs(model), reference)

    k = 0
    if err_all > budget:  # bisection: err(lo) > budget >= err(hi); err(len) = 0
        lo, hi = 0, len(order)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if error_keeping(mid) <= budget:
                hi = mid
            else:
                lo = mid
        k = hi
    err = error_keeping(k)  # also leaves the model in its final state
    kept = order[:k]
    return SensitivityReport(method, budget, sens, kept, err_all, err, len(names))
