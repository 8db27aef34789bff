"""The training-memory planner (`sd35flash plan --train`): per-GPU memory of one distillation setup.

Built on the inference planner (``plan/architecture.py``): the same architectures (built-in SD3.5
Medium/Large YAMLs or a pipeline folder), the same meta-device parameter counts, and its inference
activation formula for the passes that run without gradients (teacher with CFG, student roll-outs,
probes) and for the VAE decode of probes.

**What one distillation step runs** (``distill/trainer.py``, per GPU, ``b`` samples per forward):

* stage 0, trajectory guidance: one student forward with gradients at batch ``b_tg``, backward, step;
* stage 1, critic update (``fake.updates`` per step): the student's roll-out without gradients
  (``b``), then the fake forward with gradients on ``[student samples, real samples]`` (``2 b`` with
  the GAN, ``b`` without), backward into the fake and the discriminator heads, step;
* stage 1, generator update: roll-out without gradients, the student's step ``i`` with gradients
  (``b``), the frozen teacher with CFG (one batched pass of ``2 b``, no gradients), the fake at
  ``x_tau`` with its weights frozen but gradients passing through it to ``x_tau`` (the GAN's
  generator term; without the GAN it runs without gradients), backward into the student, step;
* stage 2 (split branches): the generator update of one branch at a time, the other branches, their
  optimisers and EMAs resident;
* probes: EMA student samples (transformer at ``probe_batch``) and the VAE decode of them.

**Where the bytes are** (per GPU; ``P`` trainable parameters of the transformer, ``B`` its buffers,
``f = 1 / gpus`` under FSDP2, else 1):

* weights: teacher ``(P + B) x teacher_dtype``; student and fake ``4 P f + 4 B`` (fp32 masters;
  FSDP2 shards parameters, not buffers); in LoRA mode one frozen base ``(P + B) x teacher_dtype``
  (the teacher is the base with the adapters disabled) and fp32 adapters ``r x sum(in + out)`` over
  the adapted linear layers; discriminator heads; the VAE; the text encoders unless freed
  (prompt embeddings precomputed);
* gradients: fp32, only of the module being updated, alive from its backward to ``zero_grad``;
* optimiser state: AdamW 8 bytes per trainable parameter (two fp32 moments); torchao ``AdamW8bit``
  2 bytes plus an fp32 scale per 256 values of each moment; created at a stage's first step; the
  trajectory stage's freed when stage 1 starts unless ``free_finished_optimizers`` is off;
* EMA of the student: fp32, on the GPU (``device``), on the CPU (``cpu``: host memory) or off;
* DDP with more than one GPU: gradient buckets, ``4 P`` per wrapped trainable module;
* FSDP2: two blocks' parameters unsharded in bf16 (current and prefetched) and, while training,
  their gradients before the reduce-scatter;
* without FSDP, full fine-tuning under autocast keeps a bf16 copy of every trainable weight while
  the forward runs (autocast's cast cache; the backward holds them): ``2 P``.

**Activations of a pass with gradients** (elements per sample; ``N_i`` image tokens, ``N_t`` text
tokens, ``N = N_i + N_t``, width ``D``, ``H`` heads, ``r`` LoRA rank; :func:`block_saved_elements`):
what autograd saves per block is ``25 N D`` for full fine-tuning, ``14 N D + 4 r N`` with LoRA
adapters on the attention projections, ``12 N D`` for a frozen module that passes gradients through;
a dual-attention block adds ``10 / 7 / 6 N_i D``. The peak of forward + backward
(:func:`train_pass_bytes`) is the larger of the saved activations plus the backward's working set
and the parameter gradients plus one block's saved activations and working set. With gradient
checkpointing only each block's inputs (``N D``) are saved, and one block is recomputed at a time.
The coefficients are counted from what diffusers' SD3 blocks save and checked against torch's
``MemTracker`` (``python -m sd35flash.deploy.tools.plan_train_check``).

**Assumptions.** Activations are counted in the compute dtype (``bf16``: 2 bytes; the CPU runs in
fp32); autocast's fp32 layer-norm outputs are not counted separately. ``batch`` is per GPU (a global
batch of ``B_g`` on ``N`` GPUs is ``B_g / N``). The trajectory bank and the real bank stay on the
CPU. Not counted: the CUDA context and allocator fragmentation (add 1-3 GiB), NCCL buffers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from sd35flash.errors import UserError
from sd35flash.plan.architecture import (
    GIB,
    Architecture,
    component_stats,
    load_architecture,
    text_encoder_activation_elements,
    transformer_activation_elements,
    vae_decode_activation_elements,
)

__all__ = [
    "LORA_TARGETS",
    "TrainSetup",
    "block_saved_elements",
    "plan_training",
    "train_pass_bytes",
    "training_plan_to_text",
]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2 * (1 + 4 / 256)}
# the linear layers LoRA adapts by default: every attention projection of both streams (and of the
# second attention of dual blocks); names are module-name suffixes, as peft matches them
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class TrainSetup:
    """One distillation configuration as the planner sees it (the inputs of ``plan --train``).

    ``batch``: samples per GPU per forward of the generator update (the critic update doubles it
    with the GAN); ``tg_batch``: per GPU in stage 0 (default ``batch``). ``sharding``: ``fsdp`` shards
    weights, gradients, optimiser state and EMA over ``gpus``; ``ddp`` replicates them (default:
    ``fsdp`` for full fine-tuning on more than one GPU). ``compute_dtype``: activations and
    autocast (``fp32`` on a CPU). ``encoders``: ``freed`` when prompt embeddings are precomputed,
    ``resident`` when the text encoders stay loaded (in the teacher dtype). ``split_branches``: the
    number of stage-2 branches (0: no stage 2).
    """

    config: str = "sd35-medium"
    mode: Literal["full", "lora"] = "full"
    gpus: int = 1
    sharding: Literal["ddp", "fsdp"] | None = None
    resolution: int = 1024
    batch: int = 1
    tg_batch: int | None = None
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    teacher_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    ema: Literal["device", "cpu", "off"] = "device"
    lora_rank: int = 64
    encoders: Literal["freed", "resident"] = "freed"
    gan: bool = True
    gan_heads: int = 1
    gan_head_channels: int = 64
    guidance: bool = True
    free_finished_optimizers: bool = True
    split_branches: int = 0
    probe_batch: int = 1

    @property
    def sharding_used(self) -> str:
        if self.sharding is not None:
            return self.sharding
        return "fsdp" if self.mode == "full" and self.gpus > 1 else "ddp"

    def validate(self) -> None:
        checks = [("mode", self.mode, ("full", "lora")), ("optimizer", self.optimizer, tuple(OPTIMIZER_BYTES)),
                  ("teacher dtype", self.teacher_dtype, tuple(DTYPE_BYTES)),
                  ("compute dtype", self.compute_dtype, tuple(DTYPE_BYTES)),
                  ("ema", self.ema, ("device", "cpu", "off")),
                  ("encoders", self.encoders, ("freed", "resident")), ("sharding", self.sharding_used, ("ddp", "fsdp"))]
        for name, value, allowed in checks:
            if value not in allowed:
                raise UserError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        for name, value in (("--gpus", self.gpus), ("--batch", self.batch), ("--lora-rank", self.lora_rank),
                            ("--probe-batch", self.probe_batch), ("--tg-batch", self.tg_batch or 1)):
            if value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        if self.split_branches < 0:
            raise UserError(f"--split-branches must be >= 0, got {self.split_branches}")


# ----------------------------------------------------------------------------- network facts


@dataclass(frozen=True)
class TransformerFacts:
    """What the planner needs of one SD3 transformer: parameter and buffer elements, the largest
    block's parameters, the output layers' parameters, and ``lora_width = sum(in + out)`` over the
    linear layers LoRA adapts (LoRA parameters = ``rank * lora_width``)."""

    params: int
    buffers: int
    block_params: int
    out_params: int
    lora_width: int
    layers: int
    dual_layers: int


@functools.lru_cache(maxsize=8)
def _transformer_facts(transformer_json: str, targets: tuple[str, ...]) -> TransformerFacts:
    from diffusers import SD3Transformer2DModel

    cfg = json.loads(transformer_json)
    with torch.device("meta"):
        tr = SD3Transformer2DModel.from_config(cfg)
    params = sum(p.numel() for p in tr.parameters())
    buffers = sum(b.numel() for b in tr.buffers())
    block = max(sum(p.numel() for p in blk.parameters()) for blk in tr.transformer_blocks)
    out = sum(p.numel() for m in (tr.norm_out, tr.proj_out) for p in m.parameters())
    width = 0
    for name, mod in tr.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            width += mod.in_features + mod.out_features
    dual = len(cfg.get("dual_attention_layers") or ())
    return TransformerFacts(params, buffers, block, out, width, len(tr.transformer_blocks), dual)


def transformer_facts(cfg: dict[str, Any], targets: tuple[str, ...] = LORA_TARGETS) -> TransformerFacts:
    """:class:`TransformerFacts` of an ``SD3Transformer2DModel`` config, built on the meta device."""
    return _transformer_facts(json.dumps(cfg, sort_keys=True), tuple(targets))


def disc_head_params(dim: int, channels: int) -> int:
    """Parameters of one ``conv`` discriminator head (``distill/adversarial.py``): 3x3 conv
    ``D -> C``, GroupNorm, 1x1 conv ``C -> 1``."""
    return dim * channels * 9 + channels + 2 * channels + channels + 1


# ----------------------------------------------------------------------------- activations


def _tokens(cfg: dict[str, Any], resolution: int, text_tokens: int, vae_scale: int) -> tuple[int, int, int, int]:
    side = resolution // vae_scale
    n_img = (side // cfg["patch_size"]) ** 2
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return n_img, text_tokens, d, cfg["num_attention_heads"]


def block_saved_elements(kind: str, n_img: int, n_txt: int, d: int, heads: int, dual: bool, rank: int = 0) -> int:
    """Elements autograd saves for the backward of one SD3 ``JointTransformerBlock``, per sample.

    ``kind``: ``full`` (every weight trained), ``lora`` (frozen base, adapters of rank ``rank`` on the
    attention projections) or ``frozen`` (no weight trained, gradients pass through to the input).
    Counted per token (``N = N_i + N_t``), width ``D``:

    * ``full``: ``25 N D`` -- the norm input, normalised and modulated inputs (``3``), q and k before
      and after the RMS norm and in the attention's concatenation (``6``), v (``1``), the attention
      output and its re-laid-out copy (``2``), the projected output the gate multiplies (``1``), the
      MLP's norm input, normalised and modulated inputs (``3``), its ``4 D`` hidden before and after
      GELU (``8``) and the gated MLP output (``1``); plus ``4 H N`` (RMS-norm and attention
      statistics); a dual-attention block's second attention adds ``10 N_i D + 3 H N_i``;
    * ``frozen``: ``12 N D + 4 H N`` -- what the input's gradient needs: the norm inputs (``2``), q
      and k before the RMS norm (``2``), the attention's q, k, v and output (``4``), the GELU input
      (``4``); a dual block adds ``6 N_i D + 3 H N_i``;
    * ``lora``: the frozen count plus each adapter's input (the modulated input and the re-laid-out
      attention output, ``2 N D``) and its rank-``r`` hidden (``4 r N``: four adapted projections per
      stream); a dual block adds ``7 N_i D + (4 r + 3 H) N_i``.

    Plus ``18 D`` for the modulation vectors.
    """
    n = n_img + n_txt
    if kind == "full":
        s = 25 * n * d + 4 * heads * n + dual * (10 * n_img * d + 3 * heads * n_img)
    elif kind == "lora":
        s = 14 * n * d + 4 * (rank + heads) * n + dual * (7 * n_img * d + (4 * rank + 3 * heads) * n_img)
    elif kind == "frozen":
        s = 12 * n * d + 4 * heads * n + dual * (6 * n_img * d + 3 * heads * n_img)
    else:
        raise ValueError(kind)
    return s + 18 * d


def _io_saved_elements(kind: str, n_img: int, n_txt: int, d: int) -> int:
    """Saved elements outside the regular blocks, per sample: the output norm (``3 N_i D`` when
    trained) less what the last block (text stream ends there, no text MLP) saves below a regular
    one (``12 / 8 / 6 N_t D``)."""
    if kind == "full":
        return max(0, 3 * n_img * d - 12 * n_txt * d)
    if kind == "lora":
        return max(0, -6 * n_txt * d)
    return max(0, n_img * d - 8 * n_txt * d)


def train_pass_bytes(cfg: dict[str, Any], resolution: int, text_tokens: int, batch: int, kind: str,
                     checkpointing: bool, act_bytes: int, grad_bytes: int = 0, rank: int = 0,
                     vae_scale: int = 8, first_block_grad_bytes: int = 0) -> dict[str, int]:
    """Bytes of one forward + backward of an SD3 transformer with gradients (beyond its weights).

    ``saved``: what the forward leaves for the backward,
    ``S = b (sum over blocks of block_saved_elements + io) x act_bytes``, or with checkpointing
    ``b L N D x act_bytes`` (each block's two input streams). ``peak``: the larger of

    * the start of the backward: ``S + W`` with the working set ``W = 2 N_i D b`` for full
      fine-tuning and ``8 N_i D b`` otherwise (gradients of the MLP hidden and of the attention
      inputs); with checkpointing ``S + (s_block + 8 N_i D) b`` (one block recomputed);
    * the end of the backward, in the first block: every parameter gradient but that block's
      (``grad_bytes - first_block_grad_bytes``) plus its saved activations and working set,
      ``(s_block + 8 N_i D) b``.
    """
    n_img, n_txt, d, heads = _tokens(cfg, resolution, text_tokens, vae_scale)
    layers = cfg["num_layers"]
    dual = len(cfg.get("dual_attention_layers") or ())
    plain = block_saved_elements(kind, n_img, n_txt, d, heads, False, rank)
    dual_blk = block_saved_elements(kind, n_img, n_txt, d, heads, True, rank)
    largest = dual_blk if dual else plain
    work = 8 * n_img * d
    if checkpointing:
        saved = layers * (n_img + n_txt) * d
        start = saved + plain + work
    else:
        saved = (layers - dual) * plain + dual * dual_blk + _io_saved_elements(kind, n_img, n_txt, d)
        start = saved + (2 * n_img * d if kind == "full" else work)
    end_acts = largest + work
    peak = max(start * batch * act_bytes, grad_bytes - first_block_grad_bytes + end_acts * batch * act_bytes)
    return {"saved": saved * batch * act_bytes, "peak": peak}


# ----------------------------------------------------------------------------- the plan


def plan_training(setup: TrainSetup, arch: Architecture | None = None) -> dict[str, Any]:
    """The per-GPU training-memory plan as a JSON-ready dict: ``peak_gib``, ``peak_phase``, ``phases``
    (GiB per phase), ``parts`` (GiB of every weight, gradient, optimiser, EMA and activation part),
    ``phase_parts`` (what each phase holds), ``host_gib`` (what the plan puts in CPU memory), the
    parameter counts and the assumptions. See the module docstring for the model."""
    setup.validate()
    arch = arch or load_architecture(setup.config)
    tr_cfg = arch.configs["transformer"]
    vae_cfg = arch.configs["vae"]
    vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    if setup.resolution % (vae_scale * tr_cfg["patch_size"]):
        raise UserError(f"--resolution {setup.resolution} must be a multiple of {vae_scale * tr_cfg['patch_size']}")
    facts = transformer_facts(tr_cfg)
    stats = component_stats(json.dumps(arch.configs, sort_keys=True))
    text_tokens = arch.clip_tokens + arch.t5_tokens
    sharding = setup.sharding_used
    n = setup.gpus
    f = 1.0 / n if sharding == "fsdp" else 1.0
    tb = DTYPE_BYTES[setup.teacher_dtype]
    ab = DTYPE_BYTES[setup.compute_dtype]
    ob = OPTIMIZER_BYTES[setup.optimizer]
    lora = setup.mode == "lora"
    p, buf = facts.params, facts.buffers
    d = tr_cfg["num_attention_heads"] * tr_cfg["attention_head_dim"]
    heads = disc_head_params(d, setup.gan_head_channels) * setup.gan_heads if setup.gan else 0
    trained = setup.lora_rank * facts.lora_width if lora else p  # trainable elements of student / fake / a branch
    shard = 1.0 if lora else f  # adapters are small: replicated

    def gib(x: float) -> float:
        return x / GIB

    weights = {
        "teacher": (p * f + buf) * tb,  # in LoRA mode: the base that teacher, student and fake share
        "student": 0.0 if lora else 4 * (p * f + buf),
        "fake": 0.0 if lora else 4 * (p * f + buf),
        "student_adapter": 4 * trained if lora else 0.0,
        "fake_adapter": 4 * trained if lora else 0.0,
        "critic_heads": 4 * heads,
        "vae": (stats["vae"].params + stats["vae"].buffers) * tb,
        "text_encoders": 0.0,
    }
    enc_names = [c for c in ("clip_l", "clip_g", "t5") if stats.get(c) is not None]
    if setup.encoders == "resident":
        weights["text_encoders"] = sum((stats[c].params + stats[c].buffers) * tb for c in enc_names)
    grads = {"student": 4 * trained * shard, "fake": 4 * (trained * shard + heads)}
    opt = {"student": ob * trained * shard, "fake": ob * (trained * shard + heads),
           "trajectory": 0.0 if setup.free_finished_optimizers else ob * trained * shard}
    ema_bytes = 4 * trained * shard
    ema = ema_bytes if setup.ema == "device" else 0.0
    host = {"ema": ema_bytes if setup.ema == "cpu" else 0.0}
    ddp = sharding == "ddp" and n > 1
    buckets = {"student": 4 * trained if ddp else 0.0, "critic": 4 * (trained + heads) if ddp else 0.0}
    # transients of how weights are held
    autocast_copy = 2 * p if (not lora and sharding != "fsdp" and ab < 4) else 0.0
    fsdp_train = 2 * facts.block_params * (2 + 4) if sharding == "fsdp" and not lora else 0.0
    fsdp_frozen = 2 * facts.block_params * tb if sharding == "fsdp" else 0.0

    # activations
    kind = "lora" if lora else "full"
    b = setup.batch
    tg_b = setup.tg_batch or b
    ck = setup.gradient_checkpointing

    def infer(batch: int) -> float:
        return transformer_activation_elements(tr_cfg, setup.resolution, text_tokens, batch, vae_scale) * ab

    def train(batch: int, grad_bytes: float, k: str = kind) -> dict[str, int]:
        first = 4 * facts.block_params * shard if grad_bytes and not lora else 0
        return train_pass_bytes(tr_cfg, setup.resolution, text_tokens, batch, k, ck, ab, int(grad_bytes),
                                setup.lora_rank, vae_scale, int(first))

    cfg_batch = 2 * b if setup.guidance else b
    critic_batch = 2 * b if setup.gan else b
    n_img = _tokens(tr_cfg, setup.resolution, text_tokens, vae_scale)[0]
    if setup.gan:  # the fake passes the generator's gradient through to x_tau with frozen weights
        fake_pass = train_pass_bytes(tr_cfg, setup.resolution, text_tokens, b, "frozen", ck, ab, 0, 0, vae_scale)
        through_fake = fake_pass["saved"] + 8 * n_img * d * b * ab
    else:
        through_fake = infer(b)

    def passes(g_student: float, g_fake: float) -> dict[str, float]:
        """Peak of each phase's passes above the resident state, with the given gradient bytes."""
        student = train(b, g_student)
        return {
            "trajectory": train(tg_b, g_student)["peak"],
            "critic_update": max(infer(b), train(critic_batch, g_fake)["peak"]),
            "generator_update": max(infer(b), student["saved"] + infer(cfg_batch), student["saved"] + through_fake,
                                    student["peak"]),
        }

    with_grads = passes(grads["student"], grads["fake"])
    acts_only = passes(0.0, 0.0)
    tg_act, critic_act, gen_act = (with_grads[k] for k in ("trajectory", "critic_update", "generator_update"))
    enc_act = 0.0
    if setup.encoders == "resident":
        kinds = {"clip_l": ("clip", "text_encoder", arch.clip_tokens),
                 "clip_g": ("clip", "text_encoder_2", arch.clip_tokens),
                 "t5": ("t5", "text_encoder_3", arch.t5_tokens)}
        enc_act = max(text_encoder_activation_elements(kinds[c][0], arch.configs[kinds[c][1]], kinds[c][2], b) * ab
                      for c in enc_names)
    probe_act = max(infer(setup.probe_batch),
                    vae_decode_activation_elements(vae_cfg, setup.resolution, setup.probe_batch) * ab)

    resident_common = weights["teacher"] + weights["critic_heads"] + weights["vae"] + weights["text_encoders"] + ema
    models = weights["student"] + weights["fake"] + weights["student_adapter"] + weights["fake_adapter"]
    phase_parts: dict[str, dict[str, float]] = {}
    # a pass with gradients: its peak (train_pass_bytes) already holds the parameter gradients
    phase_parts["trajectory"] = {
        "weights": resident_common + models, "optimizer": opt["student"], "ddp_buckets": buckets["student"],
        "weight_transients": autocast_copy + fsdp_train, "activations_and_gradients": max(tg_act, enc_act)}
    stage1_opt = opt["student"] + opt["fake"] + opt["trajectory"]
    stage1_static = resident_common + models + stage1_opt + buckets["student"] + buckets["critic"]
    phase_parts["critic_update"] = {
        "weights+optimizer+ema": stage1_static, "weight_transients": autocast_copy + fsdp_train,
        "activations_and_gradients": max(critic_act, enc_act)}
    phase_parts["generator_update"] = {
        "weights+optimizer+ema": stage1_static, "weight_transients": autocast_copy + max(fsdp_train, fsdp_frozen * 2),
        "activations_and_gradients": max(gen_act, enc_act)}
    phase_parts["probe"] = {"weights+optimizer+ema": stage1_static, "weight_transients": fsdp_frozen,
                            "activations": probe_act}
    if setup.split_branches > 0:
        k = setup.split_branches
        branch_w = 4 * trained * shard
        split_static = (resident_common + models + opt["fake"]
                        + (0.0 if setup.free_finished_optimizers else opt["student"])
                        + k * (branch_w + ob * trained * shard + (ema_bytes if setup.ema == "device" else 0.0))
                        + buckets["critic"] + (k * buckets["student"]))
        host["branch_emas"] = k * ema_bytes if setup.ema == "cpu" else 0.0
        phase_parts["split_generator_update"] = {
            "weights+optimizer+ema": split_static,
            "weight_transients": autocast_copy + max(fsdp_train, fsdp_frozen * 2),
            "activations_and_gradients": max(gen_act, enc_act)}
    phases = {name: sum(parts.values()) for name, parts in phase_parts.items()}
    peak_phase = max(phases, key=phases.get)
    parts = {
        "weights": {k: gib(v) for k, v in weights.items()},
        "gradients": {k: gib(v) for k, v in grads.items()},
        "optimizer": {k: gib(v) for k, v in opt.items()},
        "ema": gib(ema),
        "ddp_buckets": gib(buckets["student"] + buckets["critic"]),
        "autocast_weight_copies": gib(autocast_copy),
        "fsdp_unsharded_blocks": gib(max(fsdp_train, fsdp_frozen * 2)),
        "activations": {**{k: gib(v) for k, v in acts_only.items()}, "probe_decode": gib(probe_act),
                        "text_encoding": gib(enc_act)},
    }
    return {
        "config": arch.name, "setup": {**asdict(setup), "sharding": sharding},
        "peak_gib": gib(phases[peak_phase]), "peak_phase": peak_phase,
        "phases": {k: gib(v) for k, v in phases.items()},
        "phase_parts": {ph: {k: gib(v) for k, v in pp.items()} for ph, pp in phase_parts.items()},
        "parts": parts, "host_gib": {k: gib(v) for k, v in host.items()},
        "params": {"transformer": p, "transformer_buffers": buf, "trainable_per_model": trained,
                   "lora_rank": setup.lora_rank if lora else None, "critic_heads": heads},
        "tokens": {"image": _tokens(tr_cfg, setup.resolution, text_tokens, vae_scale)[0], "text": text_tokens},
        "assumptions": [
            f"batch {b} per GPU per forward; the critic update runs {critic_batch}, the teacher's CFG pass {cfg_batch}",
            f"activations in {setup.compute_dtype}; trainable weights, gradients and EMA in fp32",
            "LoRA adapters on " + ", ".join(LORA_TARGETS) if lora else "student and fake: full fp32 copies",
            "trajectory and real banks on the CPU; split branches allocated when stage 2 starts",
        ],
        "not_counted": "CUDA context and allocator fragmentation (add 1-3 GiB per GPU), NCCL buffers, host RSS",
    }


def training_plan_to_text(plan: dict[str, Any]) -> str:
    """A short human-readable breakdown of :func:`plan_training`'s result."""
    s = plan["setup"]
    opts = [s["mode"], f"{s['gpus']} GPU{'s' if s['gpus'] > 1 else ''} {s['sharding']}", f"{s['resolution']} px",
            f"batch {s['batch']}/GPU", s["optimizer"], f"teacher {s['teacher_dtype']}", f"EMA {s['ema']}",
            f"encoders {s['encoders']}"]
    if s["gradient_checkpointing"]:
        opts.append("gradient checkpointing")
    if s["mode"] == "lora":
        opts.append(f"rank {s['lora_rank']}")
    lines = [f"{plan['config']} distillation ({', '.join(opts)}): peak {plan['peak_gib']:.2f} GiB per GPU "
             f"({plan['peak_phase']})"]
    pr = plan["parts"]
    lines.append("  weights      " + "  ".join(f"{k} {v:.2f}" for k, v in pr["weights"].items() if v > 0))
    lines.append("  gradients    " + "  ".join(f"{k} {v:.2f}" for k, v in pr["gradients"].items()))
    lines.append("  optimizer    " + "  ".join(f"{k} {v:.2f}" for k, v in pr["optimizer"].items()))
    lines.append(f"  EMA {pr['ema']:.2f}  DDP buckets {pr['ddp_buckets']:.2f}  autocast weight copies "
                 f"{pr['autocast_weight_copies']:.2f}  FSDP unsharded blocks {pr['fsdp_unsharded_blocks']:.2f}")
    lines.append("  activations  " + "  ".join(f"{k} {v:.2f}" for k, v in pr["activations"].items()))
    lines.append("  phases       " + "  ".join(f"{k} {v:.2f}" for k, v in plan["phases"].items()))
    host = sum(plan["host_gib"].values())
    if host:
        lines.append(f"  host (CPU) memory for the EMA: {host:.2f} GiB")
    lines.append("  (GiB; not counted: " + plan["not_counted"] + ")")
    return "\n".join(lines)
