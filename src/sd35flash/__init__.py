"""sd35flash: few-step distillation of rectified-flow text-to-image models (SD3.5-Flash)."""

__version__ = "0.1.0"
