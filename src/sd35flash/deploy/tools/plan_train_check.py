"""Check the training planner's activation formulas against measured peaks.

``python -m sd35flash.deploy.tools.plan_train_check [--full] [--json OUT]``

One forward + backward of a random SD3 transformer (loss: mean square of the output), measured with
``torch.distributed._tools.mem_tracker.MemTracker`` as ``deploy/tools/plan_check.py`` does for inference:
peak live bytes beyond the weights (activations, gradients of activations and parameter gradients)
against :func:`sd35flash.plan.train.train_pass_bytes`, for full fine-tuning, LoRA adapters
(peft, rank 8, the planner's target layers) and a frozen module that passes gradients to its input,
each with and without gradient checkpointing. ``mid``: 8 layers x 384 wide, 2 dual-attention
layers, 1024 image + 77 text tokens, float32, run for real on the CPU (about a minute). ``--full``
adds SD3.5 Medium at 1024 px in bf16 under ``FakeTensorMode`` (shapes without memory).
"""

from __future__ import annotations

from typing import Any

import torch

from sd35flash.deploy.tools.plan_check import _build, _fake_mode, _nullcontext, _transformer_inputs, check_cli
from sd35flash.plan.architecture import GIB, load_architecture
from sd35flash.plan.train import LORA_TARGETS, train_pass_bytes

__all__ = ["MID_TRAIN", "check_train_pass", "measure_train_peak", "run_checks"]

MID_TRAIN = dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=8, attention_head_dim=64,
                 num_attention_heads=6, joint_attention_dim=512, caption_projection_dim=384, pooled_projection_dim=256,
                 pos_embed_max_size=32, dual_attention_layers=[0, 1], qk_norm="rms_norm")


class _NoHook:
    def remove(self) -> None:
        return None


def measure_train_peak(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Peak live bytes of ``mean(model(*inputs)^2).backward()`` beyond the weights and inputs."""
    from torch.distributed._tools.mem_tracker import MemTracker

    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    tracker = MemTracker()
    for p in model.parameters():  # MemTracker hooks every parameter's gradient; frozen ones have none
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    tracker.track_external(model, *inputs)
    x, t, e, pooled = inputs
    with tracker:
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=e, pooled_projections=pooled,
                    return_dict=False)[0]
        out.float().pow(2).mean().backward()
    snap = tracker.get_tracker_snapshot("peak")
    total = sum(v["Total"] for v in snap.values())
    inp = sum(i.numel() * i.element_size() for i in inputs)
    return int(total - weights - inp)


def _prepare(model: torch.nn.Module, kind: str, checkpointing: bool, rank: int) -> torch.nn.Module:
    if kind == "lora":
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS)))
    elif kind == "frozen":
        model.requires_grad_(False)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def check_train_pass(setting: str, cfg: dict[str, Any], resolution: int, text_tokens: int, batch: int, kind: str,
                     checkpointing: bool, dtype: torch.dtype = torch.float32, rank: int = 8,
                     fake: bool = False) -> dict[str, Any]:
    """Predicted vs measured peak of one training pass (see the module docstring)."""
    from diffusers import SD3Transformer2DModel

    act_bytes = torch.finfo(dtype).bits // 8
    with _fake_mode() if fake else _nullcontext():
        model = _prepare(_build(lambda: SD3Transformer2DModel.from_config(cfg), dtype), kind, checkpointing, rank)
        inputs = _transformer_inputs(cfg, resolution, text_tokens, batch, dtype)
        if kind == "frozen":
            inputs = (inputs[0].requires_grad_(True), *inputs[1:])
        grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        first = sum(p.numel() * 4 for p in model.transformer_blocks[0].parameters() if p.requires_grad)
        measured = measure_train_peak(model, inputs)
    predicted = train_pass_bytes(cfg, resolution, text_tokens, batch, kind, checkpointing, act_bytes, grads, rank,
                                 first_block_grad_bytes=first)["peak"]
    return {"setting": setting, "kind": kind, "checkpointing": checkpointing, "resolution": resolution, "batch": batch,
            "dtype": str(dtype).split(".")[-1], "predicted_gib": predicted / GIB, "measured_gib": measured / GIB,
            "error": (predicted - measured) / measured}


def run_checks(full: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    rows = []
    cases = [("mid", MID_TRAIN, 512, 77, torch.float32, False)]
    if full:
        cases.append(("sd35-medium", load_architecture("sd35-medium").configs["transformer"], 1024, 333,
                      torch.bfloat16, True))
    for setting, cfg, res, tokens, dtype, fake in cases:
        for kind in ("full", "lora", "frozen"):
            for ck in (False, True):
                row = check_train_pass(setting, cfg, res, tokens, 1, kind, ck, dtype, fake=fake)
                rows.append(row)
                if progress:
                    print(f"{setting:<12} {kind:<7} {'checkpointing' if ck else 'no checkpoint':<14} predicted "
                          f"{row['predicted_gib'] * 1024:9.1f} MiB  measured {row['measured_gib'] * 1024:9.1f} MiB  "
                          f"error {row['error']:+.1%}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    return check_cli(__doc__, "also SD3.5 Medium at 1024 px under FakeTensorMode", run_checks, argv)


if __name__ == "__main__":
    raise SystemExit(main())
