"""FLA's log-linear attention under autocast: its level scales in the queries' dtype.

FLA 0.6's log-linear Mamba2 layer computes its per-level scales as ``softplus(L * dl).to(L.dtype)``, so they
take the dtype of the parameter ``L``. Trained with bfloat16 parameters, everything the chunked kernel sees
is bfloat16. flame_gin trains on one GPU with float32 parameters under bfloat16 autocast: the queries, keys
and values come out of autocast's matrix products in bfloat16, but the scales stay float32, and the
forward kernel multiplies a bfloat16 score block by them and feeds the float32 product to a dot with the
bfloat16 values. Triton refuses that at compile time ("Both operands must be same dtype. Got fp32 and
bf16"; seen on one H200 with Triton 3.6). Casting the scales to the queries' dtype at the call gives the
kernel the dtypes it is written for, with the scales computed in float32 before the cast; their gradient
flows back through the cast in float32.

`install()` wraps the name the layer module calls; the wrapped function stays FLA's.
"""

from __future__ import annotations

import functools
import importlib

_MODULE, _NAME = "fla.layers.log_linear_mamba2", "chunk_log_linear_attn"


def _in_query_dtype(fn):
    @functools.wraps(fn)
    def call(*, q, level_scales, **kwargs):
        return fn(q=q, level_scales=level_scales.to(q.dtype), **kwargs)

    call.wrapped_for_level_scales = True
    return call


def install() -> bool:
    """Wraps FLA's log-linear attention where the log-linear Mamba2 layer calls it; True when newly wrapped.

    Idempotent. Raises naming the module and attribute if FLA no longer has them."""
    module = importlib.import_module(_MODULE)
    fn = getattr(module, _NAME, None)
    if fn is None:
        raise RuntimeError(f"log-linear attention: FLA module {_MODULE} has no attribute {_NAME!r}")
    if getattr(fn, "wrapped_for_level_scales", False):
        return False
    setattr(module, _NAME, _in_query_dtype(fn))
    return True
