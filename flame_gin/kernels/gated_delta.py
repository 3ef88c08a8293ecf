"""Pure-PyTorch stand-ins for FLA 0.6's gated-delta-rule entry points, `chunk_gated_delta_rule` and
`fused_recurrent_gated_delta_rule`: the delta rule of `attention.delta_common` with a per-step decay, and the
gate and beta activations FLA's kernels can fuse (``use_gate_in_kernel``, ``use_beta_sigmoid_in_kernel``)
applied first. Same call signatures, float32 with plain autograd, ``(o, final_state)`` as FLA returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flame_gin.kernels import attention


def _gdn_gate_and_beta(*, g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    """Applies the gate and beta activations that FLA's gated-delta-rule kernels can fuse."""
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("use_gate_in_kernel=True needs A_log")
        g = g.float() + (0.0 if dt_bias is None else dt_bias.float())
        g = -A_log.float().exp() * F.softplus(g)
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid()
        if allow_neg_eigval:
            beta = beta * 2.0
    return g, beta


def chunk_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    state_v_first=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    chunk_indices=None,
    cp_context=None,
    use_gate_in_kernel=False,
    A_log=None,
    dt_bias=None,
    chunk_size=attention.DEFAULT_CHUNK_SIZE,
    **kwargs,
):
    """Reference for `fla.ops.gated_delta_rule.chunk_gated_delta_rule` (Gated DeltaNet): g [B, T, HV] in
    log space, or raw with `use_gate_in_kernel` (g = -exp(A_log) * softplus(g + dt_bias))."""
    if cp_context is not None:
        raise NotImplementedError("the reference chunk_gated_delta_rule has no context-parallel path")
    g, beta = _gdn_gate_and_beta(
        g=g,
        beta=beta,
        use_gate_in_kernel=use_gate_in_kernel,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval,
    )
    return attention.delta_common(
        q=q,
        k=k,
        v=v,
        beta=beta,
        g=g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        chunk_size=chunk_size,
    )


def fused_recurrent_gated_delta_rule(
    q,
    k,
    v,
    g=None,
    gk=None,
    gv=None,
    beta=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    use_gate_in_kernel=False,
    A_log=None,
    dt_bias=None,
    use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False,
    state_v_first=False,
    cu_seqlens=None,
    **kwargs,
):
    """Reference for `fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule` (head-wise gate only)."""
    if gk is not None or gv is not None:
        raise NotImplementedError("the reference fused_recurrent_gated_delta_rule supports only a head-wise gate g")
    if beta is None:
        beta = torch.ones_like(v[..., 0])
        use_beta_sigmoid_in_kernel = False
    if g is None:
        g = torch.zeros_like(v[..., 0])
        use_gate_in_kernel = False
    return chunk_gated_delta_rule(
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        use_gate_in_kernel=use_gate_in_kernel,
        A_log=A_log,
        dt_bias=dt_bias,
    )
