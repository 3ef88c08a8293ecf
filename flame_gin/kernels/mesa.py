"""Pure-PyTorch stand-ins for MesaNet's ops in FLA 0.6: the chunked training op `chunk_mesa_net` and the
decoding step `mesa_net_decoding_one_step`.

Why: both are Triton only, so without these MesaNet cannot train or decode on a CPU. MesaNet's output reads the
value state through the solution of ``(H_kk + diag(lambda)) x = q``; FLA's kernels approximate that solution with
a fixed number of conjugate-gradient steps, and FLA's exact reference (`fla.ops.mesa_net.naive.
naive_mesa_net_exact`, a direct solve per token) is what the CG converges to, so training here takes the exact
one, per packed document (``cu_seqlens``) with its own two states, after the query/key L2 norm the kernel can
fuse. Decoding takes FLA's own PyTorch CG step (`naive_mesa_net_decoding_one_step`), the kernel's algorithm.
"""

from __future__ import annotations

from flame_gin.kernels import attention, norm


def chunk_mesa_net(
    q,
    k,
    v,
    g,
    beta,
    lamb,
    h_kk_init=None,
    h_kv_init=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    **kwargs,
):
    """Reference for `fla.ops.mesa_net.chunk_mesa_net`: q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H],
    lamb [H, K]; returns ``(o, h_kk, h_kv)`` (states None unless ``output_final_state``)."""
    from fla.ops.mesa_net.naive import naive_mesa_net_exact

    q, k = q.float(), k.float()
    if use_qk_l2norm_in_kernel:
        q, k = norm.l2norm(q), norm.l2norm(k)
    if (h_kk_init is None) != (h_kv_init is None):
        raise ValueError("chunk_mesa_net needs both initial states (h_kk_init, h_kv_init) or neither")
    initial = None if h_kk_init is None else (h_kk_init, h_kv_init)

    def core(q_, k_, v_, g_, b_, h0):
        h_kk0, h_kv0 = (None, None) if h0 is None else h0
        o, h_kk, h_kv = naive_mesa_net_exact(q_, k_, v_, g_, lamb, b_, h_kk_init=h_kk0, h_kv_init=h_kv0)
        return o, (h_kk, h_kv)

    o, states = attention.run_segments(
        core=core,
        tensors=[q, k, v.float(), g.float(), beta.float()],
        initial_state=initial,
        output_final_state=output_final_state,
        state_v_first=False,
        cu_seqlens=cu_seqlens,
        out_dtype=v.dtype,
    )
    h_kk, h_kv = (None, None) if states is None else states
    return o, h_kk, h_kv


def mesa_net_decoding_one_step(q, k, v, g, lamb, beta, prev_h_kk, prev_h_kv, max_CG_iteration=30):
    """Reference for `fla.ops.mesa_net.mesa_net_decoding_one_step`: FLA's own PyTorch CG step."""
    from fla.ops.mesa_net.naive import naive_mesa_net_decoding_one_step

    return naive_mesa_net_decoding_one_step(
        q, k, v, g, lamb, beta, prev_h_kk, prev_h_kv, max_CG_iteration=max_CG_iteration
    )
