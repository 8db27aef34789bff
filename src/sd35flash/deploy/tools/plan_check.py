"""Check the planner's activation formulas against measured peaks.

``python -m sd35flash.deploy.tools.plan_check [--full] [--json OUT]``

Measurement: ``torch.distributed._tools.mem_tracker.MemTracker``, torch's own memory tracker, which
follows every tensor storage through the dispatcher and records the peak of live bytes. Activation
peak = peak total - parameters - buffers (inputs count as activations, as in the formulas). Three
settings:

* ``toy``: the default toy teacher's transformer and VAE decoder (``ToyConfig()``), float32, run for
  real on the CPU;
* ``mid``: a mid-size random SD3 transformer (12 layers x 768 wide, dual attention in 4 layers,
  ~330M parameters; again without dual attention) at 512 px and the real SD3 VAE decoder at 256 px,
  float32, run for real; its peak RSS growth during a first forward (sampled every millisecond from
  ``/proc/self/statm``) is reported beside it as a second opinion -- allocator-dependent (freed
  blocks are reused, so later forwards and earlier temporaries blur it);
* ``--full`` adds the SD3.5 Medium and Large transformers (bf16, 1024 px) and the SD3 VAE at
  1024 px, run under ``FakeTensorMode`` -- shapes and storages without memory or
  compute, so the peak of an 8B model can be traced on a laptop.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from sd35flash.plan.architecture import (
    GIB,
    load_architecture,
    transformer_activation_elements,
    vae_decode_activation_elements,
)

__all__ = ["measure_activation_peak", "rss_peak_growth", "run_checks"]


def measure_activation_peak(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                            call: Callable[..., Any]) -> int:
    """Peak live bytes of ``call(module, *inputs)`` beyond ``module``'s parameters and buffers."""
    from torch.distributed._tools.mem_tracker import MemTracker

    weights = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    tracker = MemTracker()
    tracker.track_external(module, *inputs)
    with tracker, torch.no_grad():
        call(module, *inputs)
    snap = tracker.get_tracker_snapshot("peak")
    total = sum(v["Total"] for v in snap.values())
    return int(total - weights)


def rss_peak_growth(fn: Callable[[], Any], interval: float = 0.001) -> int:
    """Largest growth of the process's resident set while ``fn()`` runs (Linux ``/proc/self/statm``)."""
    import os

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base = rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        with torch.no_grad():
            fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], rss())
    return peak[0] - base


def _transformer_inputs(cfg: dict[str, Any], resolution: int, text_tokens: int, batch: int, dtype, vae_scale: int = 8):
    side = resolution // vae_scale
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, cfg["in_channels"], side, side, generator=g).to(dtype), torch.full((batch,), 500.0),
            torch.randn(batch, text_tokens, cfg["joint_attention_dim"], generator=g).to(dtype),
            torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(dtype))


def _call_transformer(m, x, t, e, p):
    return m(hidden_states=x, timestep=t, encoder_hidden_states=e, pooled_projections=p, return_dict=False)[0]


def _call_decoder(m, z):
    return m.decode(z, return_dict=False)[0]


def _row(setting: str, part: str, resolution: int, batch: int, dtype: torch.dtype, predicted: int, measured: int,
         **extra: Any) -> dict[str, Any]:
    return {"setting": setting, "part": part, "resolution": resolution, "batch": batch,
            "dtype": str(dtype).split(".")[-1],
            "predicted_gib": predicted / GIB, "measured_gib": measured / GIB,
            "error": (predicted - measured) / measured if measured else None, **extra}


def check_transformer(setting: str, cfg: dict[str, Any], resolution: int, text_tokens: int, batch: int,
                      dtype: torch.dtype, fake: bool = False, rss: bool = False, vae_scale: int = 8) -> dict[str, Any]:
    from diffusers import SD3Transformer2DModel

    predicted = transformer_activation_elements(cfg, resolution, text_tokens, batch, vae_scale) * (
        torch.finfo(dtype).bits // 8)
    mode = _fake_mode() if fake else _nullcontext()
    with mode:
        model = _build(lambda: SD3Transformer2DModel.from_config(cfg), dtype).eval()
        inputs = _transformer_inputs(cfg, resolution, text_tokens, batch, dtype, vae_scale)
        extra = {}
        if rss and not fake:  # first, before freed activations are left in the heap
            extra["rss_growth_gib"] = rss_peak_growth(lambda: _call_transformer(model, *inputs)) / GIB
        measured = measure_activation_peak(model, inputs, _call_transformer)
    params = sum(p.numel() for p in model.parameters())
    return _row(setting, "transformer", resolution, batch, dtype, predicted, measured, params=params, **extra)


def check_vae(setting: str, cfg: dict[str, Any], resolution: int, dtype: torch.dtype, fake: bool = False,
              rss: bool = False) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    predicted = vae_decode_activation_elements(cfg, resolution, 1) * (torch.finfo(dtype).bits // 8)
    scale = 2 ** (len(cfg["block_out_channels"]) - 1)
    mode = _fake_mode() if fake else _nullcontext()
    with mode:
        vae = _build(lambda: AutoencoderKL.from_config(cfg), dtype).eval()
        z = torch.randn(1, cfg["latent_channels"], resolution // scale, resolution // scale).to(dtype)
        extra = {}
        if rss and not fake:  # first, before freed activations are left in the heap
            extra["rss_growth_gib"] = rss_peak_growth(lambda: _call_decoder(vae, z)) / GIB
        measured = measure_activation_peak(vae, (z,), _call_decoder)
    return _row(setting, "vae_decode", resolution, 1, dtype, predicted, measured, **extra)


def _build(fn: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
    """Build with ``dtype`` as the default dtype (parameters and buffers created in it directly)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return fn()
    finally:
        torch.set_default_dtype(old)


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


MID_TRANSFORMER = dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=12,
                       attention_head_dim=64, num_attention_heads=12, joint_attention_dim=4096,
                       caption_projection_dim=768, pooled_projection_dim=2048, pos_embed_max_size=96,
                       dual_attention_layers=[0, 1, 2, 3], qk_norm="rms_norm")


def run_checks(full: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Predicted vs measured activation peaks (see the module docstring)."""
    from sd35flash.models.toy import ToyConfig, build_transformer, build_vae

    rows: list[dict[str, Any]] = []

    def log(row: dict[str, Any]) -> None:
        rows.append(row)
        if progress:
            err = row["error"]
            print(f"{row['setting']:<11} {row['part']:<11} {row['resolution']:>5} px b{row['batch']} {row['dtype']:<8} "
                  f"predicted {row['predicted_gib'] * 1024:9.2f} MiB  measured {row['measured_gib'] * 1024:9.2f} MiB  "
                  f"error {err:+.1%}"
                  + (f"  rss {row['rss_growth_gib'] * 1024:.1f} MiB" if "rss_growth_gib" in row else ""),
                  flush=True)

    toy = ToyConfig()
    tr_cfg = dict(build_transformer(toy).config)
    vae_cfg = dict(build_vae(toy).config)
    for batch in (1, 2):
        log(check_transformer("toy", tr_cfg, toy.image_size, 2 * toy.text_max_length, batch, torch.float32,
                              vae_scale=toy.vae_scale_factor))
    log(check_vae("toy", vae_cfg, toy.image_size, torch.float32))
    sd35 = load_architecture("sd35-medium")
    for batch in (1, 2):
        log(check_transformer("mid", MID_TRANSFORMER, 512, 333, batch, torch.float32, rss=True))
    no_dual = {**MID_TRANSFORMER, "dual_attention_layers": []}  # the MLP moment of a plain block (as Large)
    log(check_transformer("mid-nodual", no_dual, 512, 333, 1, torch.float32))
    log(check_vae("mid", sd35.configs["vae"], 256, torch.float32, rss=True))
    if full:
        for name in ("sd35-medium", "sd35-large"):
            cfg = load_architecture(name).configs["transformer"]
            log(check_transformer(name, cfg, 1024, 333, 1, torch.bfloat16, fake=True))
        log(check_vae("sd35", sd35.configs["vae"], 1024, torch.bfloat16, fake=True))
    return rows


def check_cli(doc: str, full_help: str, checks: Callable[..., list[dict]], argv: list[str] | None) -> int:
    """The command line both formula checks share: ``--full`` and ``--json OUT``; prints the largest
    relative error and writes ``{"checks": rows, "max_abs_error": worst}``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--full", action="store_true", help=full_help)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    rows = checks(full=args.full)
    worst = max(abs(r["error"]) for r in rows)
    print(f"largest error {worst:.1%} over {len(rows)} checks")
    if args.json_out:
        from sd35flash.io import atomic_write_json

        atomic_write_json(args.json_out, {"checks": rows, "max_abs_error": worst})
    return 0


def main(argv: list[str] | None = None) -> int:
    return check_cli(__doc__, "also SD3.5 Medium/Large under FakeTensorMode (minutes)", run_checks, argv)


if __name__ == "__main__":
    raise SystemExit(main())
