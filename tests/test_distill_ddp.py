"""Two gloo processes (torchrun) give the student one process gives with the same global batch (full and LoRA mode),
through every stage (the smoke preset includes split-timestep branches)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

SCRIPT = """
import sys
from pathlib import Path
from sd35flash.config import merge
from sd35flash.distill.config import load_distill_config
from sd35flash.distill.run import distill
cfg = merge(load_distill_config("smoke"), {"batch_size": 4, "trajectory": {"steps": 1, "batch_size": 4},
            "student": {"steps": 2}, "runtime": {"device": "cpu", "num_threads": 1}})
distill(cfg, sys.argv[1], Path(sys.argv[2]), progress=False)
"""


def _run(cmd: list[str], cache) -> None:
    env = dict(os.environ, SD35FLASH_CACHE=str(cache), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-6000:]


@pytest.mark.timeout(400)
def test_two_processes_match_one(smoke_teacher, tmp_path):
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-c", SCRIPT, str(smoke_teacher), str(one)], cache)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
          sys.executable, "-c", SCRIPT, str(smoke_teacher), str(two)], cache)
    a = StableDiffusion3Pipeline.from_pretrained(one).transformer.state_dict()
    b = StableDiffusion3Pipeline.from_pretrained(two).transformer.state_dict()
    teacher = StableDiffusion3Pipeline.from_pretrained(smoke_teacher).transformer.state_dict()
    assert any(not torch.equal(a[k], teacher[k]) for k in a)  # the student did train
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    from safetensors.torch import load_file

    for sub in ("transformer_branch0", "transformer_branch1"):  # stage 2 trained the same branches
        fa, fb = (load_file(str(d / sub / "diffusion_pytorch_model.safetensors")) for d in (one, two))
        assert any(not torch.equal(fa[k], teacher[k]) for k in fa)
        for k in fa:
            assert torch.allclose(fa[k], fb[k], atol=1e-5, rtol=1e-4), (sub, k, (fa[k] - fb[k]).abs().max())


LORA_SCRIPT = SCRIPT.replace('"student": {"steps": 2},', '"student": {"steps": 1}, "split": {"steps": 1}, "mode": "lora", '
                             '"lora": {"rank": 4, "alpha": 4.0},')


@pytest.mark.timeout(400)
def test_lora_two_processes_match_one(smoke_teacher, tmp_path):
    """``mode: lora`` under DDP: the adapter views are what DDP wraps; two processes give the student
    adapter and the folded transformers one process gives."""
    assert LORA_SCRIPT != SCRIPT
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-c", LORA_SCRIPT, str(smoke_teacher), str(one)], cache)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
          sys.executable, "-c", LORA_SCRIPT, str(smoke_teacher), str(two)], cache)
    from safetensors.torch import load_file

    for sub, name in (("transformer", "diffusion_pytorch_model.safetensors"),
                      ("transformer_branch0", "diffusion_pytorch_model.safetensors"),
                      ("student_lora", "pytorch_lora_weights.safetensors")):
        fa, fb = (load_file(str(d / sub / name)) for d in (one, two))
        assert fa.keys() == fb.keys()
        for k in fa:
            assert torch.allclose(fa[k], fb[k], atol=1e-5, rtol=1e-4), (sub, k, (fa[k] - fb[k]).abs().max())
    lora = load_file(str(one / "student_lora" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())  # the adapter trained
