"""The toy teacher's recipe and cache: the typed pretraining config, its presets
(``configs/toy-pretrain-*.yaml``), and where ``sd35flash pretrain`` caches a finished teacher.

Below both ``pretrain/`` (which trains the teacher) and the readers of its cache (``distill``'s default
teacher, ``demo``), so those need not import the training code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import fingerprint, load_config, to_dict
from .errors import ConfigError
from .models.pipeline_io import MODEL_INDEX
from .models.toy import ToyConfig
from .paths import cache_root
from .train.runtime import RuntimeConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRESETS = ("smoke", "quick", "default", "teacher", "teacher-2", "teacher-3", "teacher-4", "teacher-5", "teacher-gpu")
#: Bumped when a change to the training code makes old cached teachers stale.
PRETRAIN_CODE_VERSION = 1
#: The provenance file of a finished teacher folder.
INFO_FILE = "pretrain.json"


@dataclass
class VAETrainConfig:
    """Autoencoder training. Foreground pixels get ``fg_weight`` x the loss, so small shapes survive."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-6
    fg_weight: float = 4.0
    num_images: int = 20000
    checkpoint_every: int = 500
    eval_images: int = 200


@dataclass
class FlowTrainConfig:
    """Rectified-flow training of the transformer (and, jointly, the tiny text encoders).

    Timesteps are logit-normal(``logit_mean``, ``logit_std``) passed through ``shift``. Dropout:
    ``prompt_dropout`` replaces the prompt by "" (for CFG); ``clip_dropout`` and ``t5_dropout`` zero
    each encoder's block independently (as SD3 was trained, so T5 can be dropped at inference).
    """

    steps: int = 12000
    batch_size: int = 32
    lr: float = 3e-4
    text_encoder_lr: float = 1e-4
    train_text_encoders: bool = True
    warmup: int = 500
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    prompt_dropout: float = 0.1
    clip_dropout: float = 0.1
    t5_dropout: float = 0.3
    ema_decay: float = 0.999
    num_images: int = 60000
    checkpoint_every: int = 500
    sample_every: int = 1000
    probe_every: int = 2000
    probe_images: int = 40
    probe_steps: int = 20
    probe_guidance: float = 4.0


@dataclass
class DecoderTrainConfig:
    """Decoder fine-tuning after the flow stage (``pretrain/decoder_trainer.py``): only the decoder
    learns, with uniform pixel weights and an edge term, so latents stay valid. ``steps: 0`` = off."""

    steps: int = 0
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 50
    l1_weight: float = 0.5
    grad_weight: float = 1.0
    latent_noise: float = 0.0
    num_images: int = 8000
    checkpoint_every: int = 250
    eval_images: int = 400


@dataclass
class PretrainConfig:
    model: ToyConfig = field(default_factory=ToyConfig)
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    flow: FlowTrainConfig = field(default_factory=FlowTrainConfig)
    decoder: DecoderTrainConfig = field(default_factory=DecoderTrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data_seed: int = 0
    #: Continue from this teacher instead of starting from scratch: a shipped model name (see
    #: ``sd35flash models``), an SD3 pipeline folder, or ``preset:NAME`` (that preset's finished
    #: teacher). Its VAE is kept as it is (no VAE stage) and its transformer and text encoders are
    #: the flow stage's starting weights (and EMA); the optimiser and LR schedule start afresh (a
    #: warm restart). ``model`` must describe the same architecture.
    init: str | None = None

    def validate(self) -> None:
        for name, v in (("vae.steps", self.vae.steps), ("flow.steps", self.flow.steps),
                        ("vae.batch_size", self.vae.batch_size), ("flow.batch_size", self.flow.batch_size)):
            if v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if abs(self.flow.shift - self.model.shift) > 1e-9:
            raise ConfigError("flow.shift must equal model.shift (the scheduler's shift)")

    def cache_key(self) -> str:
        """Fingerprint of everything that changes the trained weights (not device or thread count)."""
        d = to_dict(self)
        d["runtime"] = {"mixed_precision": self.runtime.mixed_precision, "seed": self.runtime.seed}
        d["code_version"] = PRETRAIN_CODE_VERSION
        # options added later leave the fingerprints (and cached runs) of configs that do not use them
        if self.decoder.steps == 0:
            d.pop("decoder")
        if self.init is None:
            d.pop("init")
        return fingerprint(d)


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return CONFIG_DIR / f"toy-pretrain-{name}.yaml"


def load_pretrain_config(preset: str | None = None, path: str | None = None) -> PretrainConfig:
    """Load a preset by name, or a YAML file (``--config``)."""
    if path is not None:
        return load_config(PretrainConfig, path)
    return load_config(PretrainConfig, preset_path(preset or "default"))


def teacher_dir(cfg: PretrainConfig, name: str) -> Path:
    """``<cache>/teachers/<preset>-<config fingerprint>/`` (``work/`` and the finished ``pipeline/``)."""
    return cache_root() / "teachers" / f"{name}-{cfg.cache_key()}"


def is_finished(folder: Path) -> bool:
    return (folder / MODEL_INDEX).is_file() and (folder / INFO_FILE).is_file()
