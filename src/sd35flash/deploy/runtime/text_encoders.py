"""Text-encoder restructuring for deployment: T5 on, off or in int8.

The encoder fingerprint, the per-prompt embedding cache and freeing the encoders live in
:mod:`sd35flash.text.encoder`, which training uses too; they are re-exported here.

* **One student for both.** Distillation drops T5 for a random ``t5_dropout`` fraction of the
  student's samples (``distill/config.py``, used in ``distill/trainer.py``), so the same student
  serves the with-T5 and the without-T5 presets.
* **T5 in int8.** torchao int8 weight-only on T5's ``nn.Linear`` layers (:func:`quantize_t5`).
"""

from __future__ import annotations

from ...errors import UserError
from ...text.encoder import (
    ENCODER_NAMES,
    PromptEncoder,
    check_writable,
    default_cache_dir,
    encoder_fingerprint,
)

__all__ = ["ENCODER_NAMES", "PromptEncoder", "check_writable", "default_cache_dir", "encoder_fingerprint",
           "quantize_t5"]


def quantize_t5(pipe, method: str = "int8-weight") -> None:
    """Quantize the T5 encoder's ``nn.Linear`` weights in place (torchao int8 weight-only by default)."""
    from .quantize import quantize_module

    if getattr(pipe, "text_encoder_3", None) is None:
        raise UserError("this pipeline has no T5 encoder (text_encoder_3) to quantize")
    quantize_module(pipe.text_encoder_3, method)
