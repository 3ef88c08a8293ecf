"""Float8 linear layers through torchao, for linears larger than a size filter.

Applied before tensor parallel's plans would see the layers (torchao's float8 linears support its own TP
styles only on GPU); on a machine without torchao it raises an error saying so rather than silently training
in higher precision.
"""

from __future__ import annotations

import torch.nn as nn


def apply_float8(model: nn.Module, *, min_features: int = 1024, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Converts `nn.Linear` layers whose in and out features are both >= `min_features` (and divisible by 16)
    to torchao float8 training linears, except names containing an entry of `skip`. Returns how many."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise RuntimeError("float8: torchao is not installed (pip install torchao); float8 training needs it") from err
    converted = []

    def keep(module: nn.Module, fqn: str) -> bool:
        ok = (
            isinstance(module, nn.Linear)
            and not any(s in fqn for s in skip)
            and module.in_features >= min_features
            and module.out_features >= min_features
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )
        if ok:
            converted.append(fqn)
        return ok

    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=keep)
    return len(converted)
