"""A reproducible recipe for training your own ControlNet on Stable Diffusion with diffusers."""

import logging as _logging

# bitsandbytes warns on import, on CPUs with AVX512-BF16, that an optional kernel hub package is
# missing; the recipe never uses 4-bit CPU kernels.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

__version__ = "0.1.0"
