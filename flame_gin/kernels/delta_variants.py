"""Pure-PyTorch stand-ins for two delta-rule variants of FLA 0.6 whose kernels are Triton only: Comba
(`chunk_comba`, `fused_recurrent_comba`: the state is read back through a separate key ``p``) and Gated
DeltaProduct (`chunk_gated_delta_product`: several Householder steps per token).

Why: without them the two families cannot train on a CPU. Their recurrences are FLA's own token-by-token
references (`fla.ops.comba.naive`, `fla.ops.gated_delta_product.naive`); what is added is what the fused kernels
do around them: the L2 norm of queries and keys (and Comba's ``p``), grouped value heads, and packed documents
run one by one with their own states (``cu_seqlens``) through the shared per-document runner, in float32 with
plain autograd.
"""

from __future__ import annotations

from flame_gin.kernels import attention, norm


def chunk_comba(
    q,
    k,
    v,
    p,
    g,
    beta=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    **kwargs,
):
    """Reference for `fla.ops.comba.chunk_comba`: q, k, p [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]."""
    from fla.ops.comba.naive import naive_recurrent_comba

    out_dtype = v.dtype
    q, k, v, p = (x.float() for x in (q, k, v, p))
    if use_qk_l2norm_in_kernel:
        q, k, p = norm.l2norm(q), norm.l2norm(k), norm.l2norm(p)
    v_heads = v.shape[2]
    q, k, p = (attention.to_value_heads(x, v_heads) for x in (q, k, p))
    beta = v.new_ones(v.shape[:3]) if beta is None else beta.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def core(q_, k_, v_, p_, b_, g_, h0):
        return naive_recurrent_comba(q_, k_, v_, p_, b_, g_, scale=scale, initial_state=h0, output_final_state=True)

    return attention.run_segments(
        core=core,
        tensors=[q, k, v, p, beta, g.float()],
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=False,
        cu_seqlens=cu_seqlens,
        out_dtype=out_dtype,
    )


def fused_recurrent_comba(q, k, v, p, g, beta=None, scale=None, **kwargs):
    """Reference for `fla.ops.comba.fused_recurrent_comba` (decoding): the same recurrence as `chunk_comba`."""
    return chunk_comba(q, k, v, p, g, beta=beta, scale=scale, **kwargs)


def chunk_gated_delta_product(
    q,
    k,
    v,
    g,
    beta,
    num_householder,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    cp_context=None,
    **kwargs,
):
    """Reference for `fla.ops.gated_delta_product.chunk_gated_delta_product`: q [B, T, H, K]; k [B, T * n, H, K],
    v [B, T * n, H, V] and beta [B, T * n, H] with ``n = num_householder`` steps per token; g [B, T, H] or None."""
    if cp_context is not None:
        raise NotImplementedError("the reference chunk_gated_delta_product has no context-parallel path")
    from fla.ops.gated_delta_product.naive import naive_recurrent_gated_delta_product

    out_dtype = v.dtype
    q, k, v, beta = (x.float() for x in (q, k, v, beta))
    if use_qk_l2norm_in_kernel:
        q, k = norm.l2norm(q), norm.l2norm(k)
    batch, length, heads = q.shape[:3]
    n = num_householder
    # The per-token steps as their own axis, so documents split on the token axis of every tensor alike.
    k, v, beta = (x.reshape(batch, length, n, *x.shape[2:]) for x in (k, v, beta))
    g = q.new_zeros(batch, length, heads) if g is None else g.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def core(q_, k_, v_, b_, g_, h0):
        steps = q_.shape[1] * n
        k_, v_, b_ = (x.reshape(1, steps, *x.shape[3:]) for x in (k_, v_, b_))
        return naive_recurrent_gated_delta_product(
            q_, k_, v_, g_, b_, scale=scale, initial_state=h0, output_final_state=True, num_householder=n
        )

    return attention.run_segments(
        core=core,
        tensors=[q, k, v, beta, g],
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=False,
        cu_seqlens=cu_seqlens,
        out_dtype=out_dtype,
    )
