"""Pure-PyTorch stand-ins for FLA 0.6's Kimi Delta Attention entry points, `chunk_kda` and `fused_recurrent_kda`.

Why: KDA's kernels are Triton only, so without these the family cannot train on a CPU. The recurrence itself is
FLA's own token-by-token reference (`fla.ops.kda.naive.naive_recurrent_kda`) and the decay gates are FLA's own
PyTorch gate references, so nothing of KDA's arithmetic is rewritten here; what is added is what the fused
kernels do around them: the gate activation (``use_gate_in_kernel``, with or without ``lower_bound``), the beta
sigmoid (doubled with ``allow_neg_eigval``), the query/key L2 norm, and packed documents run one by one with their
own states (``cu_seqlens``) through the shared per-document runner, in float32 with plain autograd.
"""

from __future__ import annotations

from flame_gin.kernels import attention, norm


def _gate(*, g, A_log, dt_bias, lower_bound):
    from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate

    if lower_bound is not None:
        return naive_kda_lowerbound_gate(g, A_log, dt_bias, lower_bound=lower_bound)
    if A_log is None:
        raise ValueError("use_gate_in_kernel=True needs A_log unless lower_bound is set")
    return naive_kda_gate(g, A_log, dt_bias)


def chunk_kda(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_gate_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    safe_gate=False,
    lower_bound=None,
    state_v_first=False,
    cu_seqlens=None,
    A_log=None,
    dt_bias=None,
    cp_context=None,
    **kwargs,
):
    """Reference for `fla.ops.kda.chunk_kda`: q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV, K] in log space
    (raw with ``use_gate_in_kernel``); beta [B, T, HV]. Returns ``(o, final_state)`` as FLA does."""
    if cp_context is not None:
        raise NotImplementedError("the reference chunk_kda has no context-parallel path")
    from fla.ops.kda.naive import naive_recurrent_kda

    out_dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_gate_in_kernel:
        g = _gate(g=g, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound)
    if use_beta_sigmoid_in_kernel:
        beta = beta.sigmoid() * (2.0 if allow_neg_eigval else 1.0)
    if use_qk_l2norm_in_kernel:
        q, k = norm.l2norm(q), norm.l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def core(q_, k_, v_, g_, b_, h0):
        return naive_recurrent_kda(q_, k_, v_, g_, b_, scale=scale, initial_state=h0, output_final_state=True)

    return attention.run_segments(
        core=core,
        tensors=[q, k, v, g, beta],
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        out_dtype=out_dtype,
    )


def fused_recurrent_kda(q, k, v, g, beta, A_log=None, dt_bias=None, scale=None, **kwargs):
    """Reference for `fla.ops.kda.fused_recurrent_kda` (decoding, its own argument order): the same recurrence as
    `chunk_kda`."""
    return chunk_kda(q, k, v, g, beta, scale=scale, A_log=A_log, dt_bias=dt_bias, **kwargs)
