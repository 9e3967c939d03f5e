"""recforge: LLMs as domain knowledge for search, advertising and recommendation ranking."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes warns at import time, on every AVX512-BF16 CPU without the optional `kernels` package, that its
# 4-bit CPU kernel is missing: it would be the first stderr line of every command (whose errors are one line),
# though recforge never runs 4-bit on a CPU (QLoRA stops before loading a model there).
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
