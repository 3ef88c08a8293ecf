"""Pure-PyTorch stand-ins for the RWKV-7 ops of FLA 0.6 that are Triton only: the diagonal-plus-low-rank delta
rule (`chunk_rwkv7`, `fused_mul_recurrent_rwkv7`), the fused input mixing (`fused_addcmul_rwkv7`), the key
update (`fused_k_rwkv7`) and the output correction (`gate_output_correction`).

Why: without them RWKV-7 cannot train on a CPU. Each is FLA's own PyTorch reference where FLA ships one
(`fla.ops.generalized_delta_rule.dplr.naive.dplr_recurrence`, `torch_addcmul_rwkv7`, `k_update_ref`,
`gate_output_correction_ref`); what is added is the layout change, the scale (FLA's token loop always scales
queries by ``1/sqrt(K)``, the RWKV-7 layer asks for 1), and packed documents run one by one with their own states
(``cu_seqlens``) through the shared per-document runner, in float32 with plain autograd.
"""

from __future__ import annotations

from flame_gin.kernels import attention


def chunk_rwkv7(
    r,
    w,
    k,
    v,
    a,
    b,
    scale=1.0,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    cp_context=None,
    **kwargs,
):
    """Reference for `fla.ops.rwkv7.chunk_rwkv7`: r, w, k, a, b [B, T, H, K] (w the log decay), v [B, T, H, V];
    ``S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + k_t v_t^T`` in FLA's [K, V] layout, ``o_t = scale r_t S_t``."""
    if cp_context is not None:
        raise NotImplementedError("the reference chunk_rwkv7 has no context-parallel path")
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    dk = r.shape[-1]
    # FLA's token loop multiplies its queries by 1/sqrt(K); undo that so the layer's own scale holds
    queries = r.float() * (scale * dk**0.5)

    def core(r_, w_, k_, v_, a_, b_, h0):
        o, ht = dplr_recurrence(
            *(x.transpose(1, 2) for x in (r_, k_, v_, a_, b_, w_)), initial_state=h0, output_final_state=True
        )
        return o.transpose(1, 2), ht

    return attention.run_segments(
        core=core,
        tensors=[queries, *(x.float() for x in (w, k, v, a, b))],
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=False,
        cu_seqlens=cu_seqlens,
        out_dtype=v.dtype,
    )


def fused_mul_recurrent_rwkv7(r, w, k, v, kk, a, scale=1.0, **kwargs):
    """Reference for `fla.ops.rwkv7.fused_mul_recurrent_rwkv7` (decoding): the rule with ``a = -kk, b = kk * a``."""
    return chunk_rwkv7(r, w, k, v, -kk, kk * a, scale=scale, **kwargs)


def fused_addcmul_rwkv7(hidden_states, delta, xr, xw, xk, xv, xa, xg=None):
    """Reference for `fla.ops.rwkv7.fused_addcmul.fused_addcmul_rwkv7`: FLA's own PyTorch version."""
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7

    return torch_addcmul_rwkv7(hidden_states, delta, xr, xw, xk, xv, xa, xg)


def fused_k_rwkv7(k, a, ka, cu_seqlens=None, cu_seqlens_cpu=None):
    """Reference for `fla.ops.rwkv7.fused_k_update.fused_k_rwkv7`: ``k + k (a - 1) ka`` (FLA's own PyTorch)."""
    from fla.ops.rwkv7.fused_k_update import k_update_ref

    return k_update_ref(k, a, ka)


def gate_output_correction(o, r, k, r_k, v, g):
    """Reference for `fla.ops.rwkv7.gate_output_correction`: FLA's own PyTorch version."""
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    return gate_output_correction_ref(o, r, k, r_k, v, g)
