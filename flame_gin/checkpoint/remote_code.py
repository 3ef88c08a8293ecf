"""A loader module written into every export of an FLA model, so stock tools load it with
``trust_remote_code=True``.

Why: FLA registers its model types with transformers' Auto classes only when ``fla`` is imported, so a command
that never imports it (``lm_eval --model hf``, a serving stack) cannot read ``model_type: gla``. transformers'
own mechanism for that case is the config's ``auto_map``, naming classes in a module shipped with the weights.
The module here only imports FLA's classes; on a machine without a GPU it also selects flame_gin's reference
kernels when flame_gin is installed, since FLA's Triton kernels need a GPU (with FLA's own the model is the
same model, as `tests/test_families.py` checks).
"""

from __future__ import annotations

import pathlib

FILE = "fla_auto.py"

_TEMPLATE = '''"""Loads this FLA model in transformers with trust_remote_code=True (written by flame_gin's export)."""
import torch

import fla  # noqa: F401  (registers FLA's model types)

if not torch.cuda.is_available():
    try:  # FLA's Triton kernels need a GPU; flame_gin's reference kernels run on a CPU
        from flame_gin import kernels

        kernels.select(mode="reference")
    except ImportError:
        pass

from {config_module} import {config_class}  # noqa: E402,F401
from {model_module} import {model_class}  # noqa: E402,F401
'''


def applies(model) -> bool:
    """Whether ``model`` is one of FLA's (other families, like the HF Llama baseline, load without it)."""
    return type(model).__module__.startswith("fla.")


def prepare(model) -> None:
    """Sets the config's ``auto_map`` to the loader module (call before ``save_pretrained``)."""
    model.config.auto_map = {
        "AutoConfig": f"{FILE[:-3]}.{type(model.config).__name__}",
        "AutoModelForCausalLM": f"{FILE[:-3]}.{type(model).__name__}",
    }


def write(*, model, output: pathlib.Path) -> None:
    """Writes the loader module beside the exported weights."""
    (output / FILE).write_text(
        _TEMPLATE.format(
            config_module=type(model.config).__module__,
            config_class=type(model.config).__name__,
            model_module=type(model).__module__,
            model_class=type(model).__name__,
        )
    )
