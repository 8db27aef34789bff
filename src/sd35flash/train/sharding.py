"""How the transformers of a run are spread over processes: replicated (DDP) or sharded (FSDP2).

A method asks a :class:`Sharding` to ``shard`` its trainable and frozen transformers, to ``copy``
one, to ``prepare`` modules and optimisers, and, at the end, for a ``gathered`` plain copy; it never
asks which kind it has. The two kinds:

* :class:`Replicated` (``ddp``, the default): every process holds whole models; ``prepare`` is
  ``Accelerator.prepare`` (DDP wrappers with more than one process); checkpoints are accelerate's.
* :class:`Sharded` (``fsdp``): ``torch.distributed.fsdp.fully_shard`` on every transformer block,
  then on the module itself, for the trainable models *and* the frozen teacher, so each process
  holds ``1 / N`` of every parameter and all-gathers one block at a time. Prepared modules are the
  sharded modules themselves (no DDP wrapper); gradients are reduce-scattered (averaged) by FSDP.
  With bf16 / fp16 mixed precision on CUDA the blocks are gathered in that dtype
  (``MixedPrecisionPolicy``; gradients reduced in fp32). Checkpoints: :class:`ShardedState`.

Loading without whole copies (:meth:`Sharded.materialise`): a model built on the meta device is
sharded, allocated shard by shard (``to_empty``) and filled from a whole state dict only process 0
holds, broadcast one tensor at a time; the other processes never hold or read the whole model.

EMAs follow the parameters a process holds (:func:`local_tensors`): under FSDP2 the EMA of the
local shards, saved per process. Works on the CPU with gloo (the tests) as on CUDA with NCCL.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

SHARDINGS = ("ddp", "fsdp")
SHARDED_DIR = "sharded"


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def local_tensors(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``params`` with every sharded parameter (a ``DTensor``) replaced by the shard this process
    holds: a tensor sharing its storage (writing it writes the parameter) with the parameter's
    ``requires_grad``. Plain tensors are returned as they are."""
    dtensor = _dtensor()
    out = []
    for p in params:
        if isinstance(p, dtensor):
            q = p.to_local().detach()
            out.append(q.requires_grad_(p.requires_grad) if q.is_floating_point() else q)
        else:
            out.append(p)
    return out


def clip_grad_norm(acc: Accelerator, params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to total 2-norm ``max_norm``; returns the norm before clipping
    (a float tensor, the same on every process). Sharded gradients: the norm over every process's
    shards, ``||g|| = sqrt(sum_ranks ||g_r||^2)``; otherwise ``Accelerator.clip_grad_norm_``."""
    params = list(params)
    dtensor = _dtensor()
    if not any(isinstance(p.grad, dtensor) for p in params):
        return torch.as_tensor(acc.clip_grad_norm_(params, max_norm)).float()
    acc.unscale_gradients()
    with_grad = [p for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    if isinstance(total, dtensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
    return total.detach().float().cpu()


def reset_as_whole(module: torch.nn.Module, reset: Callable[[], None]) -> None:
    """Run ``reset()``, which re-initialises ``module``'s parameters in place (``reset_parameters``),
    as if they were whole: each sharded parameter is replaced by a whole tensor for the call, then
    every process keeps its shard of it (FSDP2 shards dim 0 in ``torch.chunk`` pieces). So a seeded
    re-initialisation draws on N processes exactly what it draws on one."""
    dtensor = _dtensor()
    swapped = []
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if isinstance(p, dtensor):
                whole = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device),
                                           requires_grad=p.requires_grad)
                sub._parameters[name] = whole
                swapped.append((sub, name, p, whole))
    try:
        reset()
    finally:
        for sub, name, p, whole in swapped:
            sub._parameters[name] = p
            with torch.no_grad():
                local = p.to_local()
                pieces = whole.detach().chunk(p.device_mesh.size(), dim=0)
                rank = p.device_mesh.get_local_rank()
                if local.numel():
                    local.copy_(pieces[rank])


def _is_ema(obj: Any) -> bool:
    return hasattr(obj, "shadow_params") and hasattr(obj, "optimization_step")


class Replicated:
    """Whole models on every process (DDP with accelerate); see the module docstring."""

    kind = "ddp"
    state = None  # nothing besides accelerate's checkpoint

    def __init__(self, acc: Accelerator) -> None:
        self.acc = acc

    def shard(self, module: torch.nn.Module, trainable: bool = True) -> torch.nn.Module:
        return module

    def copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """An independent trainable copy of ``module`` (a student's branch)."""
        twin = copy.deepcopy(module)
        twin.requires_grad_(True)
        return twin.train()

    def prepare(self, *objs: Any) -> list[Any]:
        out = self.acc.prepare(*objs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def checkpointed(self, objects: Iterable[Any]) -> list[Any]:
        """The objects accelerate checkpoints (``register_for_checkpointing``): all of them."""
        return list(objects)

    def gathered(self, module: torch.nn.Module) -> torch.nn.Module | None:
        """``module`` unwrapped (every process)."""
        return self.acc.unwrap_model(module)


class Sharded(Replicated):
    """FSDP2 per transformer block, then the root; see the module docstring."""

    kind = "fsdp"

    def __init__(self, acc: Accelerator) -> None:
        super().__init__(acc)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if not torch.distributed.is_initialized():  # one process without torchrun: a group of one
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            torch.distributed.init_process_group("gloo" if acc.device.type == "cpu" else "nccl",
                                                 init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        self.mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(acc.mixed_precision))
        self.policy = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
                       if dtype is not None and acc.device.type == "cuda" else MixedPrecisionPolicy())
        self.state = ShardedState(acc)

    def shard(self, module: torch.nn.Module, trainable: bool = True, broadcast: bool = True,
              root: bool = True) -> torch.nn.Module:
        """``fully_shard`` every block of every ``transformer_blocks`` list inside ``module``, then
        ``module`` (in place; a module already sharded is returned as it is). Frozen modules keep
        their dtype (no mixed-precision policy). A trainable module is first made the same on every
        process (``broadcast``; see :meth:`_broadcast`). ``root=False`` leaves ``module``'s own
        parameters (those outside its blocks) whole, for the module that will hold it to shard (the
        fake model inside the critic: a separately sharded module nested in another fails in the
        backward pass that goes through it with its parameters frozen)."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(module, FSDPModule):
            return module
        if trainable and broadcast:
            self._broadcast(module)
        policy = self.policy if trainable else MixedPrecisionPolicy()
        for sub in module.modules():
            blocks = getattr(sub, "transformer_blocks", None)
            if isinstance(blocks, torch.nn.ModuleList):
                for block in blocks:
                    if not isinstance(block, FSDPModule):
                        fully_shard(block, mesh=self.mesh, mp_policy=policy, reshard_after_forward=True)
        # explicitly for the root too: its parameters are then sharded between passes, so that
        # ``module.parameters()`` always yields the shards (EMA, checkpoints, copies)
        if root:
            fully_shard(module, mesh=self.mesh, mp_policy=policy, reshard_after_forward=True)
        return module

    @torch.no_grad()
    def _broadcast(self, module: torch.nn.Module) -> None:
        """Process 0's parameters and buffers to every process, one tensor at a time through the
        accelerator (as DDP does when it wraps a module): parts initialised at random (the critic's
        heads) then agree before they are sharded. Parameters sharded already (a critic's fake model
        loaded by :meth:`materialise`) agree by construction and are skipped."""
        dtensor = _dtensor()
        for t in [*module.parameters(), *module.buffers()]:
            if isinstance(t, dtensor):
                continue
            buf = t.detach().to(self.acc.device)
            torch.distributed.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))

    def materialise(self, module: torch.nn.Module, full: dict[str, torch.Tensor] | None,
                    trainable: bool = True, root: bool = True) -> torch.nn.Module:
        """Shard ``module``, built with its parameters on the meta device (buffers real, e.g. under
        accelerate's ``init_empty_weights(include_buffers=False)``), allocate this process's shards
        on the accelerator (``to_empty``) and fill them from ``full``, a whole state dict that only
        process 0 holds (``None`` on the others): each tensor is broadcast from process 0 in turn
        and every process keeps its slice (``set_model_state_dict`` with ``broadcast_from_rank0``).
        So no process other than 0 ever holds, or reads from disk, the whole model. Buffers
        missing from ``full`` (non-persistent ones, such as a position table) keep the values the
        constructor computed; ``full``'s dtypes are cast to ``module``'s. ``full`` is not changed.
        ``root``: as in :meth:`shard` (``False``: the parameters outside the blocks are whole copies)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        if any(b.is_meta for b in buffers.values()):
            raise ValueError("materialise needs real buffers: build the module with "
                             "init_empty_weights(include_buffers=False)")
        self.shard(module, trainable=trainable, broadcast=False, root=root)
        module.to_empty(device=self.acc.device)
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
        source = dict(full) if full is not None and self.acc.is_main_process else {}
        set_model_state_dict(module, source, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        module.requires_grad_(trainable)
        return module.train(trainable)

    def copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """A sharded trainable copy of the sharded diffusers transformer ``module``: the same
        architecture built on the meta device, sharded, allocated, then this process's shards and
        the buffers copied in (no process ever holds the whole model)."""
        with torch.device("meta"):
            twin = type(module).from_config(module.config)
        if getattr(module, "is_gradient_checkpointing", False):
            twin.enable_gradient_checkpointing()
        self.shard(twin, broadcast=False)
        twin.to_empty(device=self.acc.device)
        with torch.no_grad():
            for dst, src in zip(local_tensors(twin.parameters()), local_tensors(module.parameters())):
                dst.copy_(src)
            for (_, dst), (_, src) in zip(twin.named_buffers(), module.named_buffers()):
                dst.copy_(src)
        twin.requires_grad_(True)
        return twin.train()

    def prepare(self, *objs: Any) -> list[Any]:
        """Modules and optimisers as they are (FSDP already distributes them); each optimiser is
        paired with the module holding its parameters, for :class:`ShardedState`."""
        modules = [o for o in objs if isinstance(o, torch.nn.Module)]
        for m in modules:
            self.state.modules.append(m)
        for o in objs:
            if isinstance(o, torch.optim.Optimizer):
                ids = {id(p) for g in o.param_groups for p in g["params"]}
                owner = next(m for m in self.state.modules if ids <= {id(p) for p in m.parameters()})
                self.state.optimizers.append((owner, o))
        return list(objs)

    def checkpointed(self, objects: Iterable[Any]) -> list[Any]:
        """EMAs (of local shards) go into :class:`ShardedState`; the rest (schedules, samplers,
        alarms: the same on every process) into accelerate's checkpoint."""
        out = []
        for o in objects:
            (self.state.emas if _is_ema(o) else out).append(o)
        return out

    def gathered(self, module: torch.nn.Module) -> torch.nn.Module | None:
        """A plain CPU copy of the sharded diffusers transformer ``module`` on process 0 (``None``
        on the others); every process must call it (the full state dict is all-gathered)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.acc.is_main_process:
            return None
        with torch.device("meta"):
            plain = type(module).from_config(module.config)
        buffers = {k: v.detach().cpu() for k, v in module.named_buffers()}
        plain.load_state_dict({**buffers, **full}, assign=True, strict=True)
        return plain.float().eval()


class ShardedState:
    """The sharded part of an FSDP2 checkpoint, in ``<checkpoint>/sharded/``: every prepared module
    and every optimiser with state through ``torch.distributed.checkpoint`` (one file per process,
    resharding-capable), and each process's EMAs of its local shards in ``ema-rank<r>.pt`` (a
    resume needs the same number of processes). Everything else (schedules, samplers, alarms, each
    process's RNG) stays in accelerate's part of the checkpoint."""

    def __init__(self, acc: Accelerator) -> None:
        self.acc = acc
        self.modules: list[torch.nn.Module] = []
        self.optimizers: list[tuple[torch.nn.Module, torch.optim.Optimizer]] = []
        self.emas: list[Any] = []

    def _ema_file(self, folder: Path) -> Path:
        return folder / f"ema-rank{self.acc.process_index}.pt"

    def save(self, folder: str | Path) -> None:
        """Every process: write its part of ``folder``. An optimiser without state (not stepped yet,
        or freed) is left out."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        folder = Path(folder)
        state: dict[str, Any] = {f"model{i}": get_model_state_dict(m) for i, m in enumerate(self.modules)}
        for j, (m, opt) in enumerate(self.optimizers):
            if opt.state:
                state[f"optimizer{j}"] = get_optimizer_state_dict(m, opt)
        dcp.save(state, checkpoint_id=str(folder))
        torch.save({"world_size": self.acc.num_processes, "emas": [e.state_dict() for e in self.emas]},
                   self._ema_file(folder))

    def load(self, folder: str | Path) -> None:
        """Every process: restore what :meth:`save` wrote into the live modules, optimisers and EMAs."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from ..errors import UserError

        folder = Path(folder)
        ema_file = self._ema_file(folder)
        if not ema_file.is_file():
            raise UserError(f"checkpoint {folder.parent} holds no sharded state for process {self.acc.process_index}; "
                            "resume an FSDP run with --sharding fsdp and the number of processes that wrote it")
        local = torch.load(ema_file, weights_only=False, map_location="cpu")
        if local["world_size"] != self.acc.num_processes or len(local["emas"]) != len(self.emas):
            raise UserError(f"checkpoint {folder.parent} was written by {local['world_size']} processes with "
                            f"{len(local['emas'])} EMAs; resume it with --nproc_per_node {local['world_size']} "
                            "and the same config")
        saved = set(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
        state: dict[str, Any] = {f"model{i}": get_model_state_dict(m) for i, m in enumerate(self.modules)}
        for j, (m, opt) in enumerate(self.optimizers):
            if any(k.startswith(f"optimizer{j}.") for k in saved):
                state[f"optimizer{j}"] = get_optimizer_state_dict(m, opt)
        dcp.load(state, checkpoint_id=str(folder))
        for i, m in enumerate(self.modules):
            set_model_state_dict(m, state[f"model{i}"])
        for j, (m, opt) in enumerate(self.optimizers):
            if f"optimizer{j}" in state:
                set_optimizer_state_dict(m, opt, state[f"optimizer{j}"])
            else:
                opt.state.clear()
        for ema, sd in zip(self.emas, local["emas"]):
            ema.load_state_dict(sd)


def make_sharding(kind: str, acc: Accelerator) -> Replicated:
    """The :class:`Sharding` named ``kind`` (``ddp`` or ``fsdp``)."""
    return Sharded(acc) if kind == "fsdp" else Replicated(acc)


Sharding = Replicated  # the interface every kind implements
