"""Two gloo processes (torchrun) give the student one process gives with the same global batch (full and LoRA mode),
through every stage (the smoke preset includes split-timestep branches). The one-process reference trains in
this process; the two ranks in one torchrun launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

SETTINGS = {"batch_size": 4, "trajectory": {"steps": 1, "batch_size": 4},
            "runtime": {"device": "cpu", "num_threads": 1}}
FULL = {**SETTINGS, "student": {"steps": 2}}
LORA = {**SETTINGS, "student": {"steps": 1}, "split": {"steps": 1}, "mode": "lora", "lora": {"rank": 4, "alpha": 4.0}}

SCRIPT = """
import json
import sys
from pathlib import Path
from sd35flash.config import merge
from sd35flash.distill.config import load_distill_config
from sd35flash.distill.run import distill
distill(merge(load_distill_config("smoke"), json.loads(sys.argv[3])), sys.argv[1], Path(sys.argv[2]), progress=False)
"""


def _one_and_two(settings: dict, teacher: Path, tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """The student folders of one process (trained here) and of two torchrun ranks, with one cache."""
    from sd35flash.config import merge
    from sd35flash.distill.config import load_distill_config
    from sd35flash.distill.run import distill

    cache, one, two = tmp_path / "cache", tmp_path / "one", tmp_path / "two"
    monkeypatch.setenv("SD35FLASH_CACHE", str(cache))
    threads = torch.get_num_threads()
    try:
        distill(merge(load_distill_config("smoke"), settings), str(teacher), one, progress=False)
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, SD35FLASH_CACHE=str(cache), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--no-python", sys.executable, "-c", SCRIPT, str(teacher), str(two), json.dumps(settings)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-6000:]
    return one, two


def _close(fa: dict, fb: dict, what: str) -> None:
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.allclose(fa[k], fb[k], atol=1e-5, rtol=1e-4), (what, k, (fa[k] - fb[k]).abs().max())


@pytest.mark.timeout(400)
def test_two_processes_match_one(smoke_teacher, tmp_path, monkeypatch):
    one, two = _one_and_two(FULL, smoke_teacher, tmp_path, monkeypatch)
    a = StableDiffusion3Pipeline.from_pretrained(one).transformer.state_dict()
    b = StableDiffusion3Pipeline.from_pretrained(two).transformer.state_dict()
    teacher = StableDiffusion3Pipeline.from_pretrained(smoke_teacher).transformer.state_dict()
    assert any(not torch.equal(a[k], teacher[k]) for k in a)  # the student did train
    _close(a, b, "transformer")
    for sub in ("transformer_branch0", "transformer_branch1"):  # stage 2 trained the same branches
        fa, fb = (load_file(str(d / sub / "diffusion_pytorch_model.safetensors")) for d in (one, two))
        assert any(not torch.equal(fa[k], teacher[k]) for k in fa)
        _close(fa, fb, sub)


@pytest.mark.timeout(400)
def test_lora_two_processes_match_one(smoke_teacher, tmp_path, monkeypatch):
    """``mode: lora`` under DDP: the adapter views are what DDP wraps; two processes give the student
    adapter and the folded transformers one process gives."""
    one, two = _one_and_two(LORA, smoke_teacher, tmp_path, monkeypatch)
    for sub, name in (("transformer", "diffusion_pytorch_model.safetensors"),
                      ("transformer_branch0", "diffusion_pytorch_model.safetensors"),
                      ("student_lora", "pytorch_lora_weights.safetensors")):
        fa, fb = (load_file(str(d / sub / name)) for d in (one, two))
        _close(fa, fb, sub)
    lora = load_file(str(one / "student_lora" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())  # the adapter trained
