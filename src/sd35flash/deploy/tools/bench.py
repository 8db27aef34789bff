"""``sd35flash bench``: latency, memory, weight size and quality of a model under device presets.

Method (one row per preset, plus a ``teacher`` row with ``--teacher``):

1. **Prepare** (in the parent process, not measured): for a preset that quantizes the transformer
   or T5, load the model under the preset (running the sensitivity scan when it has an error
   budget) and save the quantized transformer / T5 with ``quantize.save_quantized`` under
   ``<work>/<preset>/``.
2. **Measure** in a fresh subprocess per row (``python -m sd35flash.deploy.tools.bench --worker``), so
   no row inherits the memory of another: load the model under the preset (from the prepared
   checkpoints: the full-precision transformer is never materialised), then
   - encode: every prompt of the run through the text encoders, cold (the disk cache is off);
     the time of each timed batch's prompts is kept; then the encoders are freed if the preset
     says so;
   - one warm-up batch of ``num_images`` images, then ``runs`` timed batches (denoise + VAE
     decode from the encoded prompts);
   - ``seconds_per_image`` = median over runs of ``(encode + denoise + decode) / num_images``;
   - ``transformer_seconds_per_step`` = total transformer forward time of the timed runs (CUDA
     synchronised) / (runs * steps): one sampling step of the whole batch of ``num_images``
     (``2 * num_images`` rows with CFG);
   - ``peak_memory_gib``: on the CPU the process's peak resident set (``VmHWM`` in
     ``/proc/self/status``, which starts afresh at ``exec``; ``ru_maxrss`` elsewhere), read after
     the timed runs and before the evaluation; ``baseline_rss_gib`` is the resident set after the
     imports, before loading (Python + torch + libraries), and ``model_memory_gib`` the difference.
     On a GPU, ``torch.cuda.max_memory_allocated`` (``peak_rss_gib`` is reported beside it);
   - ``weights_gib``: the weights the preset holds: file size of the saved quantized checkpoints
     and of the ONNX graphs (onnx backend), plus parameters x bytes of every other component it
     loads (T5 not counted when off);
   - ``alignment`` (overall, with ``alignment_by_category``) and ``fd_effnet`` from
     ``evaluate.evaluator.evaluate`` on the first ``eval_images`` specs of the test split, with
     the same encoder and resolution.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...errors import UserError

__all__ = ["BenchRequest", "ROW_KEYS", "run_bench"]

#: Keys every row of the JSON has.
ROW_KEYS = ("seconds_per_image", "transformer_seconds_per_step", "peak_memory_gib", "weights_gib", "alignment",
            "fd_effnet")
SPLIT = "test"
GIB = 2**30


@dataclass
class BenchRequest:
    model: str
    presets: list[str]
    json_out: str
    teacher: str | None = None
    teacher_steps: int = 28
    teacher_preset: str = "reference-fp32"
    steps: int | None = None
    guidance: float | None = None
    num_images: int = 4
    runs: int = 3
    eval_images: int = 100
    fd: bool = True
    device: str = "auto"
    work: str | None = None
    progress: bool = True


@dataclass
class _Job:
    """One measured row, handed to the worker subprocess as JSON."""

    model: str
    preset: str
    steps: int | None
    guidance: float | None
    num_images: int
    runs: int
    eval_images: int
    fd: bool
    device: str
    folder: str
    checkpoints: dict[str, str] = field(default_factory=dict)
    prepare: dict = field(default_factory=dict)


# -- memory probes -------------------------------------------------------------------------------

def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_gib() -> float | None:
    kib = _status_kib("VmRSS")
    return kib / 2**20 if kib is not None else None


def peak_rss_gib() -> float:
    """Peak resident set of this process: ``VmHWM`` (Linux), else ``ru_maxrss``."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GIB if sys.platform == "darwin" else peak / 2**20


# -- parent side ---------------------------------------------------------------------------------

def _prepare(model: str, preset_name: str, folder: Path, device, progress: bool) -> tuple[dict[str, str], dict]:
    """Quantize and save what the preset quantizes; returns ({component: checkpoint}, info)."""
    import gc

    from ..runtime.pipeline import load_deployed
    from ..runtime.presets import get_preset
    from ..runtime.quantize import get_method, save_quantized

    preset = get_preset(preset_name)
    needs_t5 = preset.t5 == "int8"
    if not get_method(preset.quantization).library and not needs_t5:
        return {}, {}
    dp = load_deployed(model, preset, device=device, embed_cache=False, progress=progress)
    ckpts: dict[str, str] = {}
    t0 = time.perf_counter()
    if get_method(preset.quantization).library:
        path = folder / "transformer"
        save_quantized(dp.pipe.transformer, path, preset.quantization, dp.kept_layers,
                       extra={"sensitivity": dp.sensitivity, "preset": preset.name})
        ckpts["transformer"] = str(path)
    if needs_t5 and dp.pipe.text_encoder_3 is not None:
        path = folder / "text_encoder_3"
        save_quantized(dp.pipe.text_encoder_3, path, "int8-weight", extra={"preset": preset.name})
        ckpts["text_encoder_3"] = str(path)
    info = {"kept_layers": dp.kept_layers, "quantized_layers": len(dp.quantized_layers),
            "sensitivity": ({k: v for k, v in dp.sensitivity.items() if k != "layer_error"}
                            if dp.sensitivity else None),
            "save_seconds": time.perf_counter() - t0}
    del dp
    gc.collect()
    return ckpts, info


def _run_worker(job: _Job) -> dict:
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    job_file = folder / "job.json"
    out_file = folder / "row.json"
    out_file.unlink(missing_ok=True)
    from ...io import atomic_write_json

    atomic_write_json(job_file, asdict(job))
    cmd = [sys.executable, "-m", "sd35flash.deploy.tools.bench", "--worker", str(job_file), "--out", str(out_file)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0 or not out_file.is_file():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise UserError(f"bench of preset {job.preset} failed: {last.removeprefix('sd35flash: error: ')}")
    return json.loads(out_file.read_text())


def run_bench(req: BenchRequest) -> dict:
    """Measure every preset (and the teacher) and write ``req.json_out`` atomically."""
    from ...io import atomic_write_json
    from ..runtime.pipeline import resolve_device
    from ..runtime.presets import check_runnable, get_preset

    if not req.presets:
        raise UserError("--presets is empty; pass comma-separated names, e.g. laptop-8bit-no-t5,desktop-16bit-t5")
    device = resolve_device(req.device)
    rows_wanted = [(name, req.model, req.steps, req.guidance) for name in req.presets]
    if req.teacher:
        rows_wanted.append(("teacher", req.teacher, req.teacher_steps, None))
    for name, *_ in rows_wanted:  # every name is checked before any work starts
        check_runnable(get_preset(req.teacher_preset if name == "teacher" else name), device)
    for m in {req.model, req.teacher} - {None}:
        if not Path(m).is_dir():
            raise UserError(f"model folder {m} does not exist; bench needs local SD3 pipeline folders")
    json_out = Path(req.json_out)
    work = Path(req.work) if req.work else json_out.with_suffix("").with_name(json_out.stem + ".work")
    result: dict = {"model": req.model, "device": str(device), "split": SPLIT, "num_images": req.num_images,
                    "runs": req.runs, "eval_images": req.eval_images, "work": str(work),
                    "method": "one subprocess per row; see sd35flash/deploy/bench.py", "presets": {}}
    for name, model, steps, guidance in rows_wanted:
        preset = req.teacher_preset if name == "teacher" else name
        folder = work / name
        ckpts, info = _prepare(model, preset, folder, device, req.progress)
        job = _Job(model=model, preset=preset, steps=steps, guidance=guidance, num_images=req.num_images,
                   runs=req.runs, eval_images=req.eval_images, fd=req.fd, device=str(device), folder=str(folder),
                   checkpoints=ckpts, prepare=info)
        if req.progress:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
        row = _run_worker(job)
        if name == "teacher":
            result["teacher"] = {"model": model, **row}
        else:
            result["presets"][name] = row
    atomic_write_json(req.json_out, result, "bench JSON")
    return result


# -- worker side ---------------------------------------------------------------------------------

class _TransformerTimer:
    """Total forward time of a module (CUDA-synchronised), via forward hooks."""

    def __init__(self, module, device) -> None:
        import torch

        self.total = 0.0
        self.calls = 0
        self.active = False
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self._t0 = 0.0
        self.handles = []
        if isinstance(module, torch.nn.Module):
            self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        if self.active:
            self._sync()
            self._t0 = time.perf_counter()

    def _post(self, *_):
        if self.active:
            self._sync()
            self.total += time.perf_counter() - self._t0
            self.calls += 1


def _weights_gib(dp, checkpoints: dict[str, str]) -> float:
    from ..runtime.quantize import WEIGHTS_FILE, weight_bytes

    total = 0
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if name == "text_encoder_3" and not dp.use_t5:
            continue
        if name in checkpoints:
            total += (Path(checkpoints[name]) / WEIGHTS_FILE).stat().st_size
            continue
        module = getattr(dp.pipe, name, None)
        if module is not None:  # an onnxruntime module (the onnx backend) counts its graph files
            file_bytes = getattr(module, "file_bytes", None)
            total += file_bytes if file_bytes is not None else weight_bytes(module)
    return total / GIB


def measure(job: _Job) -> dict:
    """One row (see the module docstring); runs inside the worker subprocess."""
    import torch

    from ...evaluate.evaluator import EvalRequest, evaluate
    from ...models.sampling_settings import resolve_sampling
    from ...sampling import encode_prompts, generate
    from ...world import canonical_prompt, split_specs
    from ..runtime.pipeline import load_deployed
    from ..runtime.presets import get_preset

    baseline = current_rss_gib()
    preset = get_preset(job.preset)
    t0 = time.perf_counter()
    dp = load_deployed(job.model, preset, device=job.device, embed_cache=False, progress=False,
                       quantized_transformer=job.checkpoints.get("transformer"),
                       quantized_t5=job.checkpoints.get("text_encoder_3"))
    load_seconds = time.perf_counter() - t0
    pipe = dp.pipe
    dev = torch.device(job.device)
    weights = _weights_gib(dp, job.checkpoints)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    schedule, steps, guidance = resolve_sampling(pipe, job.model, job.steps, job.guidance)
    n, runs = job.num_images, job.runs
    timed_specs = split_specs(SPLIT, n * (runs + 1), seed=1)
    batches = [[canonical_prompt(s) for s in timed_specs[r * n : (r + 1) * n]] for r in range(runs + 1)]
    eval_prompts = [canonical_prompt(s) for s in split_specs(SPLIT, job.eval_images, seed=0)]

    with torch.inference_mode():
        encode_seconds = []
        for batch in batches:  # cold encoder timing, per batch
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            encode_prompts(pipe, batch, use_t5=dp.use_t5, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            encode_seconds.append(time.perf_counter() - t0)
        everything = [p for b in batches for p in b] + eval_prompts + ([""] if guidance > 1.0 else [])
        dp.encoder.preload(everything)  # then frees the encoders if the preset says so

        timer = _TransformerTimer(pipe.transformer, dev)
        gen_seconds = []
        for r, batch in enumerate(batches):
            timer.active = r > 0
            seeds = [10_000 * r + i for i in range(n)]
            t0 = time.perf_counter()
            generate(pipe, batch, seeds, schedule, guidance=guidance, batch_size=n, encoder=dp.encoder,
                     height=dp.size, width=dp.size)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            gen_seconds.append(time.perf_counter() - t0)
        for h in timer.handles:
            h.remove()
    peak_rss = peak_rss_gib()
    peak = torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else peak_rss
    per_image = [(e + g) / n for e, g in zip(encode_seconds[1:], gen_seconds[1:])]
    row = {
        "seconds_per_image": statistics.median(per_image),
        "transformer_seconds_per_step": (timer.total / (runs * (len(schedule) - 1))) if timer.calls else None,
        "peak_memory_gib": peak,
        "weights_gib": weights,
        "encode_seconds_per_prompt": statistics.median(encode_seconds[1:]) / n,
        "denoise_decode_seconds_per_image": statistics.median(gen_seconds[1:]) / n,
        "peak_rss_gib": peak_rss,
        "baseline_rss_gib": baseline,
        "model_memory_gib": (peak_rss - baseline) if baseline is not None and dev.type != "cuda" else None,
        "load_seconds": load_seconds,
        "steps": steps,
        "guidance": guidance,
        "resolution": dp.size,
        "use_t5": dp.use_t5,
        "kept_layers": dp.kept_layers,
        "quantized_layers": len(dp.quantized_layers),
        "preset": preset.to_dict(),
        "prepare": job.prepare,
        "torch_threads": torch.get_num_threads(),
    }
    ev = evaluate(EvalRequest(model=job.model, steps=job.steps, guidance=job.guidance, split=SPLIT,
                              num_images=job.eval_images, batch_size=n, use_t5=dp.use_t5, fd=job.fd,
                              device=job.device),
                  Path(job.folder) / "eval.json", pipe=pipe, progress=False, encoder=dp.encoder, size=dp.size,
                  extra={"preset": preset.to_dict()})
    row["alignment"] = ev["alignment"]["overall"]
    row["alignment_by_category"] = ev["alignment"]
    row["fd_effnet"] = ev.get("fd_effnet")
    row["eval_json"] = str(Path(job.folder) / "eval.json")
    return row


def _worker_main(argv: list[str]) -> int:
    import argparse

    from ...io import atomic_write_json  # importing sd35flash also quiets torchao's import logs

    p = argparse.ArgumentParser(prog="sd35flash.deploy.tools.bench")
    p.add_argument("--worker", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    job = _Job(**json.loads(Path(args.worker).read_text()))
    try:
        row = measure(job)
    except UserError as e:
        print(f"sd35flash: error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(args.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
