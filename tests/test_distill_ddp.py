"""Two gloo processes (torchrun) give the student one process gives with the same global batch (full and LoRA mode),
through every stage (the smoke preset includes split-timestep branches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

SETTINGS = {"batch_size": 4, "trajectory": {"steps": 1, "batch_size": 4}, "runtime": {"device": "cpu", "num_threads": 1}}
RUNS = {"full": {**SETTINGS, "student": {"steps": 2}},
        "lora": {**SETTINGS, "student": {"steps": 1}, "split": {"steps": 1}, "mode": "lora", "lora": {"rank": 4, "alpha": 4.0}}}

# each rank distills every run of RUNS in turn, into OUT/<run>
SCRIPT = """
import json
import sys
from pathlib import Path
from sd35flash.config import merge
from sd35flash.distill.config import load_distill_config
from sd35flash.distill.run import distill
for name, over in json.loads(sys.argv[3]).items():
    distill(merge(load_distill_config("smoke"), over), sys.argv[1], Path(sys.argv[2]) / name, progress=False)
"""


def _close(fa: dict, fb: dict, what: str) -> None:
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.allclose(fa[k], fb[k], atol=1e-5, rtol=1e-4), (what, k, (fa[k] - fb[k]).abs().max())


@pytest.mark.timeout(600)
def test_two_processes_match_one(smoke_teacher, tmp_path, monkeypatch):
    """One torchrun launch (2 ranks) distills both runs; the one-process students are trained in this
    process, with the same settings and trajectory cache."""
    from sd35flash.config import merge
    from sd35flash.distill.config import load_distill_config
    from sd35flash.distill.run import distill

    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    monkeypatch.setenv("SD35FLASH_CACHE", str(cache))
    threads = torch.get_num_threads()
    try:
        for name, over in RUNS.items():
            distill(merge(load_distill_config("smoke"), over), str(smoke_teacher), one / name, progress=False)
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, SD35FLASH_CACHE=str(cache), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--no-python", sys.executable, "-c", SCRIPT, str(smoke_teacher), str(two), json.dumps(RUNS)],
                         capture_output=True, text=True, env=env, timeout=500)
    assert res.returncode == 0, res.stderr[-6000:]

    # full mode: the student and both split branches trained, and the two runs agree
    a = StableDiffusion3Pipeline.from_pretrained(one / "full").transformer.state_dict()
    b = StableDiffusion3Pipeline.from_pretrained(two / "full").transformer.state_dict()
    teacher = StableDiffusion3Pipeline.from_pretrained(smoke_teacher).transformer.state_dict()
    assert any(not torch.equal(a[k], teacher[k]) for k in a)  # the student did train
    _close(a, b, "transformer")
    for sub in ("transformer_branch0", "transformer_branch1"):  # stage 2 trained the same branches
        fa, fb = (load_file(str(d / "full" / sub / "diffusion_pytorch_model.safetensors")) for d in (one, two))
        assert any(not torch.equal(fa[k], teacher[k]) for k in fa)
        _close(fa, fb, sub)

    # lora mode: the adapter views are what DDP wraps; the student adapter and the folded transformers agree
    for sub, name in (("transformer", "diffusion_pytorch_model.safetensors"),
                      ("transformer_branch0", "diffusion_pytorch_model.safetensors"),
                      ("student_lora", "pytorch_lora_weights.safetensors")):
        fa, fb = (load_file(str(d / "lora" / sub / name)) for d in (one, two))
        _close(fa, fb, sub)
    lora = load_file(str(one / "lora" / "student_lora" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())  # the adapter trained
