"""sd35flash: few-step distillation of rectified-flow text-to-image models (SD3.5-Flash)."""

import logging as _logging

__version__ = "0.1.0"

# diffusers imports torchao when it is installed; on a machine without the GPU kernels torchao warns
# once per .so file it cannot load, and torch's pytree warns about torchao's enum registrations.
# Neither concerns a user of this package, and every command would start with them.
for _name in ("torchao", "torch.utils._pytree"):
    if _logging.getLogger(_name).level == _logging.NOTSET:
        _logging.getLogger(_name).setLevel(_logging.ERROR)
