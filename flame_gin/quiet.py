"""Known-harmless messages of the libraries under flame_gin, silenced at their source for the command lines.

A run's console should hold the progress lines and what the user must act on. These come on every run and
ask nothing of the user, so the entry points (``flame_gin.train``, ``flame_gin.eval``) drop them before the
libraries are imported; importing flame_gin as a library changes no logging of the caller's.

- FLA on a machine without a GPU warns that Triton is unsupported: flame_gin selects its CPU kernels itself.
- transformers imports torchao when it is installed; torchao then logs its optional CUDA libraries that
  fail to load on a CPU machine, and torch warns about the enums torchao registers.
- transformers warns once that FLA's models pass ``past_key_values`` by its old name.
- gin logs every included file's lookup at INFO; ``datasets`` logs which JAX it found.
"""

from __future__ import annotations

import logging
import re
import warnings


class _DropMessages(logging.Filter):
    """Drops records whose message matches one of the patterns (``re.search``)."""

    def __init__(self, *patterns: str):
        super().__init__()
        self._patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self._patterns)


_DEPRECATED_CACHE_NAME = _DropMessages(r"`past_key_values`/`cache_params` are deprecated")
# On absl's handler (which every record reaches), not on a logger: gin logs through absl, datasets through its
# own logger whose level it manages itself.
_LOOKUPS = _DropMessages(r"^system_path_file_exists:", r"^(PyTorch|TensorFlow|JAX) version \S+ available\.$")


def install() -> None:
    """Silence the messages above (idempotent: the same filters are added once)."""
    warnings.filterwarnings("ignore", message="Triton is not supported on current platform", category=UserWarning)
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("transformers.utils.generic").addFilter(_DEPRECATED_CACHE_NAME)
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_LOOKUPS)
