"""``distill --sharding fsdp`` (FSDP2 per block) under torchrun with gloo on the CPU, ``--prepared``
(training from a ``prepare`` folder without text encoders) and ``--resolution``, on a tiny random
pipeline with the smallest schedule that passes through every stage (TG 1, DMD 1, split 1 steps;
the discriminator heads re-initialised after every critic update, sharded as they are under FSDP2).

* two FSDP2 processes, killed in the middle of a sharded checkpoint and resumed, export the student
  and branches one process gives; the export loads in stock diffusers; process 1 never opens the
  teacher's transformer weights (its shards are broadcast from process 0);
* a meta-built transformer filled by ``Sharded.materialise`` equals the whole one, non-persistent
  position table included; models loaded sharded equal models loaded whole (16-bit teacher);
* ``adamw8bit`` (torchao) steps FSDP2 shards with 8-bit moments and resumes exactly;
* a run from a ``prepare`` folder (fp32 embeddings and trajectories) logs the losses of live
  encoding and constructs no text encoder while it trains;
* bad input is a one-line error: fsdp with LoRA, a prepare folder of another teacher, a resolution
  the teacher cannot take.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd35flash.cli import main
from sd35flash.config import merge
from sd35flash.distill.config import load_distill_config
from sd35flash.distill.models import DistillModels
from sd35flash.distill.run import distill, work_dir
from sd35flash.distill.trajectory import teacher_identity

SUBS = ("transformer", "transformer_branch0", "transformer_branch1")
CFG = {"batch_size": 4, "trajectory": {"steps": 1, "batch_size": 4, "num_trajectories": 4, "teacher_steps": 4},
       "student": {"steps": 1}, "split": {"steps": 1}, "gan": {"reinit_prob": 1.0}, "probe_images": 0,
       "sample_every": 0, "checkpoint_every": 1, "runtime": {"device": "cpu", "num_threads": 1}}



def _record_weight_reads(folder: Path, log: Path) -> None:
    """From now on, append to ``log`` every weight file under ``folder`` this process opens: through
    Python's ``open`` (an audit hook) or safetensors' readers (``load_file``, ``safe_open``)."""
    import sys

    import safetensors
    import safetensors.torch

    root = str(folder)

    def note(path) -> None:
        path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if path.startswith(root) and path.endswith((".safetensors", ".bin")):
            with open(log, "a") as f:
                f.write(path + "\n")

    sys.addaudithook(lambda event, args: note(args[0]) if event == "open" and args else None)
    load_file, safe_open = safetensors.torch.load_file, safetensors.safe_open

    def logged_load_file(path, *a, **k):
        note(path)
        return load_file(path, *a, **k)

    def logged_safe_open(path, *a, **k):
        note(path)
        return safe_open(path, *a, **k)

    safetensors.torch.load_file, safetensors.safe_open = logged_load_file, logged_safe_open


def _worker(rank: int, port: int, kill: str | None, cfg, teacher: str, out: Path, resume: bool,
            reads: Path | None = None) -> None:
    """One of two processes of a gloo run, forked from the test process (no second import of torch,
    diffusers and sd35flash): the environment torchrun would give it, then ``distill``. ``reads``:
    a folder where each process records which teacher transformer weight files it opened."""
    import traceback

    from accelerate.state import AcceleratorState, PartialState

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    os.environ.pop("SD35FLASH_FAULT_KILL_AT", None)
    if kill:
        os.environ["SD35FLASH_FAULT_KILL_AT"] = kill
    AcceleratorState._reset_state(True)  # the parent's single-process state came along with the fork
    PartialState._reset_state()
    if reads is not None:
        _record_weight_reads(Path(teacher) / "transformer", reads / f"rank{rank}.txt")
    try:
        distill(cfg, teacher, out, progress=False, resume=resume)
    except BaseException:  # the exit code is what the parent reads
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _two_processes(cfg, teacher: Path, out: Path, resume: bool = False, kill: str | None = None,
                   reads: Path | None = None) -> list[int]:
    """Exit codes of a two-process gloo run of ``distill`` (forked; a process that dies takes the other down)."""
    return _fork_two(_worker, kill, cfg, str(teacher), out, resume, reads)


def _fork_two(target, *args) -> list[int]:
    """Exit codes of ``target(rank, port, *args)`` run in two forked processes."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=target, args=(r, port, *args)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 400
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):  # one died: the other waits in a collective
            time.sleep(2)
            break
        time.sleep(0.2)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Path:
    return tiny_dir


@pytest.mark.timeout(600)
def test_fsdp_two_processes_killed_and_resumed_match_one(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SD35FLASH_CACHE", str(cache))
    cfg = merge(load_distill_config("smoke"), {**CFG, "probe_images": 2, "probe_every": 1, "sample_every": 3})
    one = distill(cfg, str(tiny), tmp_path / "one", progress=False)

    fsdp = merge(cfg, {"sharding": "fsdp"})
    two = tmp_path / "two"
    reads = tmp_path / "reads"
    reads.mkdir()
    codes = _two_processes(fsdp, tiny, two, kill="checkpoint:2", reads=reads)
    assert codes == [-9, -9] and not two.exists(), codes  # both killed while writing checkpoint 2
    work = work_dir(fsdp, teacher_identity(str(tiny), None), "shapes", two)
    ckpts = sorted(p.name for p in (work / "checkpoints").iterdir())
    assert ckpts == ["ckpt-00000001", "ckpt-00000002.tmp"], ckpts
    sharded = work / "checkpoints" / "ckpt-00000001" / "sharded"
    assert {"ema-rank0.pt", "ema-rank1.pt", ".metadata"} <= {p.name for p in sharded.iterdir()}
    assert len(list(sharded.glob("*.distcp"))) == 2  # one file per process
    assert "sharded/ema-rank1.pt" in json.loads((sharded.parent / "manifest.json").read_text())["files"]

    assert _two_processes(fsdp, tiny, two, resume=True, reads=reads) == [0, 0]
    # only process 0 ever read the teacher's transformer weights (both runs); process 1's shards of
    # teacher, student and fake were broadcast from it
    weights = str(tiny / "transformer" / "diffusion_pytorch_model.safetensors")
    assert weights in (reads / "rank0.txt").read_text().splitlines()
    assert not (reads / "rank1.txt").exists(), (reads / "rank1.txt").read_text()
    teacher = load_file(str(tiny / "transformer" / "diffusion_pytorch_model.safetensors"))
    for sub in SUBS:
        a = load_file(str(one / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(two / sub / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() == teacher.keys()
        assert any(not torch.equal(a[k], teacher[k]) for k in a), sub  # it trained
        # Two processes reduce gradients in another order than one. Where a gradient is near zero,
        # Adam turns that rounding into a step of either sign, so single weights may differ by about
        # the learning rate (2.4e-6 measured with accelerate 1.15 / diffusers 0.42); a lost or doubled
        # step or a wrong shard changes the whole update. So: every weight within 1e-5, and the
        # difference a small fraction of the training change in norm.
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        dnorm = sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5
        moved = sum(((a[k] - teacher[k]) ** 2).sum().item() for k in a) ** 0.5
        assert diff <= 1e-5 and dnorm < 0.01 * moved, (sub, diff, dnorm, moved)

    # probes and the sample grid ran on the sharded weights: the numbers of one process
    assert (work / "samples" / "step0000003.png").is_file()
    works = (work, work_dir(cfg, teacher_identity(str(tiny), None), "shapes", one))
    probes = [{r["step"]: r["probe/pixel_std"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
               if "probe/pixel_std" in r} for w in works]
    assert sorted(probes[0]) == [0, 1, 2, 3]
    assert [probes[0][k] for k in range(4)] == pytest.approx([probes[1][k] for k in range(4)], rel=1e-5)

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(two)  # the gathered export is a stock pipeline
    b = load_file(str(two / "transformer" / "diffusion_pytorch_model.safetensors"))
    for k, v in pipe.transformer.state_dict().items():  # parity with one process is checked above
        assert torch.equal(v, b[k]), k
    assert json.loads((two / "sd35flash.json").read_text())["extra"]["world_size"] == 2


class _Blocks(torch.nn.Module):
    """Two 128 x 128 linear blocks (``transformer_blocks``, as ``Sharded`` looks for): each process's
    shard of a weight has 8192 elements, enough for torchao to keep its moments in 8 bits."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(128, 128) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            x = torch.tanh(block(x))
        return x


def _adamw8bit_worker(rank: int, port: int, folder: Path) -> None:
    """Train ``_Blocks`` sharded over two processes with ``adamw8bit`` for 3 steps, saving a sharded
    checkpoint after step 1; then a fresh model and optimiser load it and redo steps 2-3. Process 0
    writes both final weights and whether the moments were 8-bit to ``folder / "result.pt"``."""
    import traceback

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    try:
        from sd35flash.train.optim import make_optimizer
        from sd35flash.train.sharding import Sharded

        sharding = Sharded(Accelerator(cpu=True))

        def build():
            torch.manual_seed(0)
            model = sharding.shard(_Blocks())
            opt = make_optimizer(model.parameters(), 1e-2, "adamw8bit")
            sharding.state.modules.clear()
            sharding.state.optimizers.clear()
            sharding.prepare(model, opt)
            return model, opt

        def step(model, opt, k: int) -> None:
            x = torch.randn(4, 128, generator=torch.Generator().manual_seed(10 * k + rank))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

        model, opt = build()
        step(model, opt, 1)
        sharding.state.save(folder / "ckpt")
        step(model, opt, 2)
        step(model, opt, 3)
        straight = [p.full_tensor() for p in model.parameters()]
        moments = [opt.state[p]["exp_avg"] for p in model.parameters()]
        eight_bit = [type(m.to_local()).__name__ for m in moments]
        model, opt = build()
        sharding.state.load(folder / "ckpt")
        step(model, opt, 2)
        step(model, opt, 3)
        resumed = [p.full_tensor() for p in model.parameters()]
        eight_bit += [type(opt.state[p]["exp_avg"].to_local()).__name__ for p in model.parameters()]
        if rank == 0:
            torch.save({"straight": straight, "resumed": resumed, "kinds": eight_bit}, folder / "result.pt")
        torch.distributed.barrier()
    except BaseException:  # the exit code is what the parent reads
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_adamw8bit_on_fsdp2_shards_resumes_exactly(tmp_path):
    """torchao's ``AdamW8bit`` steps FSDP2's sharded parameters (8-bit moments of each process's
    shard), and a sharded checkpoint of it resumes exactly (gloo, two processes)."""
    assert _fork_two(_adamw8bit_worker, tmp_path) == [0, 0]
    out = torch.load(tmp_path / "result.pt", weights_only=False)
    assert out["kinds"].count("OptimState8bit") == 4  # both weights, straight and resumed (biases are too small)
    assert len(out["straight"]) == len(out["resumed"]) == 4
    for a, b in zip(out["straight"], out["resumed"]):
        assert torch.equal(a, b)


def test_materialise_fills_shards_from_process_0_and_rebuilds_buffers(tiny_pipeline):
    """A transformer built on the meta device and filled by ``Sharded.materialise`` (a group of one)
    equals the whole model it was filled from: parameters, the position table (a non-persistent
    buffer when ``pos_embed_max_size`` is unset, so not in the state dict: the constructor's values
    must survive ``to_empty``) and the output; a bf16 target gets the weights cast."""
    from accelerate import Accelerator
    from diffusers import SD3Transformer2DModel

    from sd35flash.distill.models import empty_transformer
    from sd35flash.train.sharding import Sharded

    config = {**dict(tiny_pipeline().transformer.config), "pos_embed_max_size": None}
    torch.manual_seed(0)
    whole = SD3Transformer2DModel.from_config(config).eval()
    full = whole.state_dict()
    assert "pos_embed.pos_embed" not in full and any(n == "pos_embed.pos_embed" for n, _ in whole.named_buffers())
    sharding = Sharded(Accelerator(cpu=True))
    try:
        model = sharding.materialise(empty_transformer(config), full, trainable=False)
        half = sharding.materialise(empty_transformer(config).to(torch.bfloat16), full, trainable=False)
        assert set(full) == set(whole.state_dict())  # left as it was
        buffers = dict(model.named_buffers())
        for name, b in whole.named_buffers():
            assert torch.equal(buffers[name], b), name
        from torch.distributed.tensor import DTensor

        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and not p.requires_grad, name
            assert torch.equal(p.full_tensor(), full[name]), name
            assert torch.equal(dict(half.named_parameters())[name].full_tensor(), full[name].bfloat16()), name
        side, ch = int(config["sample_size"]), int(config["in_channels"])
        x = torch.randn(1, ch, side, side)
        enc = torch.randn(1, 3, int(config["joint_attention_dim"]))
        pooled = torch.randn(1, int(config["pooled_projection_dim"]))
        t = torch.tensor([500.0])
        with torch.no_grad():
            ref = whole(x, enc, pooled, t, return_dict=False)[0]
            got = model(x, enc, pooled, t, return_dict=False)[0]
        assert torch.allclose(ref, got, atol=1e-6)
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_load_equals_whole_load_with_a_16bit_teacher(tiny):
    """``DistillModels`` loaded under FSDP2 (a group of one) with ``teacher_dtype: bf16``: student and
    fake shards hold the fp32 teacher weights the plain load copies, and the teacher, sharded by
    ``shard_teacher`` in bf16, gives the plain 16-bit teacher's velocity exactly."""
    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    from sd35flash.distill.models import CastTeacher
    from sd35flash.sampling import guided_velocity
    from sd35flash.train.sharding import Sharded

    ref = DistillModels.load(str(tiny), teacher_dtype="bf16")
    sharding = Sharded(Accelerator(cpu=True))
    try:
        models = DistillModels.load(str(tiny), teacher_dtype="bf16", sharding=sharding)
        for name in ("student", "fake"):
            whole = dict(getattr(ref, name).named_parameters())
            for k, p in getattr(models, name).named_parameters():
                assert p.requires_grad and p.dtype == torch.float32, (name, k)
                assert torch.equal(p.full_tensor() if isinstance(p, DTensor) else p, whole[k]), (name, k)
        models.shard_teacher(sharding)
        assert isinstance(models.teacher, CastTeacher) and models.pipe.transformer is models.teacher.inner
        assert all(isinstance(p, DTensor) and p.dtype == torch.bfloat16 for p in models.teacher.parameters())
        cond = ref.conditioner.full(["a red circle", "a blue square"], "cpu")
        uncond = ref.conditioner.uncond(2, "cpu")
        x = torch.randn((2, *ref.latent_shape()), generator=torch.Generator().manual_seed(1))
        t = torch.tensor([0.9, 0.5])
        with torch.no_grad():
            want = guided_velocity(ref.teacher, x, t, cond, uncond, 4.0)
            got = guided_velocity(models.teacher, x, t, cond, uncond, 4.0)
        assert torch.equal(want, got)
    finally:
        torch.distributed.destroy_process_group()


def _count_encoders(monkeypatch) -> list[str]:
    """Record every text-encoder construction (CLIP and T5 classes of transformers)."""
    import transformers

    made: list[str] = []
    for name in ("CLIPTextModelWithProjection", "T5EncoderModel", "CLIPTextModel"):
        cls = getattr(transformers, name)
        orig = cls.__init__

        def init(self, *a, _orig=orig, _name=name, **k):
            made.append(_name)
            _orig(self, *a, **k)

        monkeypatch.setattr(cls, "__init__", init)
    return made


@pytest.mark.timeout(300)
def test_prepared_store_gives_live_losses_without_encoders(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\na large green triangle\nthree small yellow squares\n")
    folder = tmp_path / "prep"
    assert main(["prepare", "--teacher", str(tiny), "--prompts", str(prompts), "--out", str(folder),
                 "--dtype", "fp32", "--no-progress", "--preset", "smoke", "--trajectories",
                 "--set", "trajectory.num_trajectories=4", "--set", "trajectory.teacher_steps=4"]) == 0
    cfg = merge(load_distill_config("smoke"), {**CFG, "split": {"steps": 0}, "probe_images": 2})
    live = distill(cfg, str(tiny), tmp_path / "live", prompts=str(file_copy(folder, tmp_path)), progress=False)

    from sd35flash.distill import trainer as trainer_mod

    made = _count_encoders(monkeypatch)
    during: list[int] = []
    run = trainer_mod.DistillTrainer.run

    def counted(self):
        out = run(self)
        during.append(len(made))
        return out

    monkeypatch.setattr(trainer_mod.DistillTrainer, "run", counted)
    from sd35flash.distill import run as run_mod

    built: list[Path] = []
    monkeypatch.setattr(run_mod, "load_or_build", lambda path, build: built.append(path))
    stored = distill(cfg, str(tiny), tmp_path / "stored", prompts=None, progress=False, prepared=folder)
    assert during == [0]  # no text encoder was built while training
    assert built == []  # the teacher trajectories came from the folder
    assert made  # export put the teacher's encoders into the folder
    metrics = []
    for out, src in ((live, str(file_copy(folder, tmp_path))), (stored, f"prepared:{folder.resolve()}")):
        work = work_dir(cfg, teacher_identity(str(tiny), None), src, out)
        metrics.append([json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()])
    assert [r["step"] for r in metrics[0]] == [r["step"] for r in metrics[1]]
    names = {k for r in metrics[0] for k in r if k.endswith("loss") or k.startswith("probe/")}
    assert {"tg/loss", "dmd/loss", "fake/loss", "probe/pixel_std"} <= names
    for ra, rb in zip(*metrics):
        for k in names & set(ra):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    for sub in ("transformer", "text_encoder", "text_encoder_3"):
        assert (stored / sub).is_dir()


def file_copy(folder: Path, tmp_path: Path) -> Path:
    """The prompt file ``prepare`` wrote (the live run reads the same prompts in the same order)."""
    dest = tmp_path / "prepared-prompts.jsonl"
    if not dest.exists():
        shutil.copy(folder / "prompts.jsonl", dest)
    return dest


def test_resolution_reaches_the_latent_shape(tiny, tiny_pipeline):
    native = tiny_pipeline()
    side = int(native.transformer.config.sample_size)
    scale = 2 ** (len(native.vae.config.block_out_channels) - 1)
    models = DistillModels.load(str(tiny), resolution=side * scale)
    assert models.latent_shape() == (int(native.transformer.config.in_channels), side, side)
    assert DistillModels.load(str(tiny)).latent_shape() == models.latent_shape()
    half = DistillModels.load(str(tiny), resolution=side * scale // 2)  # a smaller crop of the position table
    assert half.latent_shape() == (int(native.transformer.config.in_channels), side // 2, side // 2)


@pytest.mark.parametrize("args,match", [
    (["--sharding", "fsdp", "--mode", "lora"], "use --sharding ddp with --mode lora"),
    (["--resolution", "4096"], "--resolution 4096 is larger than"),
    (["--resolution", "36"], "must be a positive multiple of"),
    (["--prepared", "OTHER"], "was prepared for teacher"),
    (["--prepared", "OTHER", "--prompts", "shapes.txt"], "pass either --prompts or --prepared"),
])
def test_bad_input_is_one_line(tiny, tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.setenv("SD35FLASH_CACHE", str(tmp_path / "cache"))
    if "OTHER" in args:
        other = tmp_path / "other"
        shutil.copytree(tiny, other)
        prompts = tmp_path / "p.txt"
        prompts.write_text("a red circle\n")
        assert main(["prepare", "--teacher", str(other), "--prompts", str(prompts), "--out", str(tmp_path / "prep"),
                     "--no-progress"]) == 0
        capsys.readouterr()
        args = [str(tmp_path / "prep") if a == "OTHER" else a for a in args]
    code = main(["distill", "--teacher", str(tiny), "--out", str(tmp_path / "s"), "--preset", "smoke",
                 "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert match in err and len(err.splitlines()) == 1, err


def test_memory_check_plans_fsdp_and_suggests_it():
    """``sharding: fsdp`` is planned as FSDP2 (each GPU holds 1/N of student, fake and teacher); a DDP
    run on several GPUs that does not fit is told that ``--sharding fsdp`` would."""
    from sd35flash.distill.memory_check import check_training_fits, setup_for_distill
    from sd35flash.errors import UserError
    from sd35flash.plan.architecture import load_architecture
    from sd35flash.plan.train import plan_training

    arch = load_architecture("sd35-large")
    cfg = merge(load_distill_config("smoke"), {"sharding": "fsdp", "memory": {"gradient_checkpointing": True}})
    sharded = setup_for_distill(cfg, arch, 8, "cuda")
    replicated = setup_for_distill(merge(cfg, {"sharding": "ddp"}), arch, 8, "cuda")
    assert (sharded.sharding_used, replicated.sharding_used) == ("fsdp", "ddp")
    peak = plan_training(sharded, arch)["peak_gib"]
    assert peak < plan_training(replicated, arch)["peak_gib"] / 2
    with pytest.raises(UserError) as exc:
        check_training_fits(replicated, peak + 2.0, arch=arch, for_distill=True)
    assert "--sharding fsdp would fit" in str(exc.value) and "\n" not in str(exc.value)
