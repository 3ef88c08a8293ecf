"""Pure-PyTorch activations standing in for FLA 0.6's Triton element-wise kernels.

FLA's `ACT2FN` table (read by layers at construction, e.g. GLA's output gate `swish`), DeltaNet's
`elu_p1` feature map and `GatedMLP`'s `swiglu` / `swiglu_linear` launch Triton kernels. These compute
in float32 and return the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid(x):
    """Reference for FLA's Triton `sigmoid`."""
    return torch.sigmoid(x.float()).to(x.dtype)


def logsigmoid(x, temperature=1.0):
    """Reference for FLA's Triton `logsigmoid(x) / temperature`."""
    return (F.logsigmoid(x.float()) / temperature).to(x.dtype)


def swish(x):
    """Reference for FLA's Triton `swish` (SiLU)."""
    return F.silu(x.float()).to(x.dtype)


def elu_p1(x):
    """Reference for FLA's Triton `elu_p1`: elu(x) + 1."""
    return (F.elu(x.float()) + 1.0).to(x.dtype)


def swiglu(x, y):
    """Reference for FLA's Triton `swiglu`: silu(x) * y."""
    return (F.silu(x.float()) * y.float()).to(x.dtype)


def swiglu_linear(x, y, weight, bias):
    """Reference for FLA's `swiglu_linear`: linear(silu(x) * y, weight, bias)."""
    return F.linear(swiglu(x, y), weight, bias)
