"""Pure-PyTorch stand-ins for FLA 0.6's LightNet entry points, `chunk_lightnet` and `fused_recurrent_lightnet`.

Why: LightNet's keys are normalised by a running log-sum-exp (FLA's fused additive gate, Triton only), so without
these the family cannot train on a CPU. What FLA's gate kernel computes, per packed document and key channel:
``z_t = logaddexp(z_{t-1}, x_t)`` from the carried ``z_0`` (or ``-inf``), the key ``exp(x_t - z_t)`` and the decay
``z_{t-1} - z_t`` (0 while ``z_{t-1}`` is ``-inf``); the attention is then gated linear attention, the reference
`attention.chunk_gla`. Float32, plain autograd.
"""

from __future__ import annotations

import torch

from flame_gin.kernels import attention


def additive_gate(*, x, initial_state=None, cu_seqlens=None):
    """Keys, log-space decays and the final log-normalizer ``[N, 1, H, K]`` of FLA's `fused_additive_gate`."""
    x = x.float()
    batch, length = x.shape[:2]
    segments = attention.segments(cu_seqlens=cu_seqlens, batch=batch, length=length)
    keys, gates, finals = [], [], []
    for n, (row, start, end) in enumerate(segments):
        xs = x[row : row + 1, start:end]
        z = torch.logcumsumexp(xs, dim=1)
        if initial_state is not None:
            z0 = initial_state[n : n + 1].float()  # [1, 1, H, K]
            z = torch.logaddexp(z, z0)
        else:
            z0 = torch.full_like(xs[:, :1], float("-inf"))
        previous = torch.cat([z0, z[:, :-1]], dim=1)
        keys.append((xs - z).exp())
        gates.append(torch.where(previous == float("-inf"), torch.zeros_like(z), previous - z))
        finals.append(z[:, -1:])
    dim = 0 if cu_seqlens is None else 1
    return torch.cat(keys, dim=dim), torch.cat(gates, dim=dim), torch.cat(finals, dim=0)


def chunk_lightnet(
    q, k, v, scale=None, initial_state=None, output_final_state=False, state_v_first=False, cu_seqlens=None, **kwargs
):
    """Reference for `fla.ops.lightnet.chunk_lightnet`: ``(o, (recurrent_state, log_normalizer))`` as FLA returns."""
    h0, z0 = (None, None) if initial_state is None else initial_state
    keys, gates, zt = additive_gate(x=k, initial_state=z0, cu_seqlens=cu_seqlens)
    o, ht = attention.chunk_gla(
        q=q,
        k=keys,
        v=v,
        g=gates,
        scale=scale,
        initial_state=h0,
        output_final_state=output_final_state,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
    )
    return o, (ht, zt)


def fused_recurrent_lightnet(q, k, v, **kwargs):
    """Reference for `fla.ops.lightnet.fused_recurrent_lightnet` (decoding): the same computation."""
    return chunk_lightnet(q, k, v, **kwargs)
