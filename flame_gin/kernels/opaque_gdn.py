"""FLA's chunked gated delta rule (Gated DeltaNet) as a torch custom op, as `opaque` does for GLA and DeltaNet.

FLA 0.6 marks `chunk_gated_delta_rule` with `torch.compiler.disable`: under per-block compile each block
splits around it, `fullgraph=True` is refused, and inductor cannot fuse the work on either side of the op with
its neighbours. As a custom op (forward one op, backward one op, fake implementations giving the shapes) it is
a node of the block's graph, so one graph serves every block.

What FLA can fuse into its kernel is done outside the op, in PyTorch, where inductor fuses it with the
projections and autograd differentiates it: the q/k L2 norms (``use_qk_l2norm_in_kernel``), beta's sigmoid
(``use_beta_sigmoid_in_kernel``, doubled with ``allow_neg_eigval``) and the decay -exp(A_log) * softplus(g +
dt_bias) (``use_gate_in_kernel``), in float32 as FLA's kernels compute them. The op then takes the log-space
gate and the activated beta, which is FLA's own unfused path. Its forward returns the output, the WY matrix
`A` and the chunk-local cumulative gate, the two tensors FLA's backward reads, so the backward recomputes
nothing FLA's autograd Function does not. On CUDA the ops call `chunk_gated_delta_rule_fwd`/`_bwd` (FLA
>=0.6,<0.7 internals, checked against the fake shapes on every call); FLA's own checks inside them stay in
force, among them its refusal of the gated backward on Hopper with Triton 3.4-3.7.0 unless TileLang serves it.
On CPU they run the float32 reference of `flame_gin.kernels.gated_delta` (backward by recomputation).

Falls back to FLA's op as it is: with a recurrent state (generation, context parallel), a non-default chunk
size or precomputed chunk indices, arguments FLA rejects (so its error is the one raised), and when FLA's
FlashQLA backend (`flash_qla`) is installed, which FLA prefers to the kernels called here.
"""

from __future__ import annotations

import importlib.util

import torch

from flame_gin.kernels import gated_delta, norm
from flame_gin.kernels.opaque import check_returned, chunk_indices_for, recompute_grads

Tensor = torch.Tensor
CHUNK = 64  # FLA's chunk_gated_delta_rule default


def _fake_a(k: Tensor, v: Tensor) -> Tensor:
    batch, length, value_heads, _ = v.shape
    return k.new_empty(batch, length, value_heads, CHUNK)


def _fake_g(g: Tensor) -> Tensor:
    return g.new_empty(g.shape, dtype=torch.float32)


def _reference(q, k, v, g, beta, scale, state_v_first, cu_seqlens) -> Tensor:
    out, _ = gated_delta.chunk_gated_delta_rule(
        q=q, k=k, v=v, g=g, beta=beta, scale=scale, state_v_first=state_v_first, cu_seqlens=cu_seqlens
    )
    return out


@torch.library.custom_op("flame_gin::gated_delta_fwd", mutates_args=())
def gated_delta_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    state_v_first: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked gated delta rule forward without states (q, k normalised, g in log space, beta activated):
    returns (o, A, the chunk-local cumulative gate)."""
    want_a, want_g = _fake_a(k, v), _fake_g(g)
    if not q.is_cuda:
        o = _reference(q, k, v, g, beta, scale, state_v_first, cu_seqlens)
        return o.to(q.dtype), torch.zeros_like(want_a), torch.zeros_like(want_g)
    from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd

    g_cum, o, a, _, _, _ = chunk_gated_delta_rule_fwd(
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=None,
        output_final_state=False,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        chunk_indices=chunk_indices_for(cu_seqlens, CHUNK),
        chunk_size=CHUNK,
    )
    o = o.to(q.dtype)
    check_returned(op="gated_delta_fwd", name="o", got=o, shape=v.shape, dtype=q.dtype)
    check_returned(op="gated_delta_fwd", name="A", got=a, shape=want_a.shape, dtype=want_a.dtype)
    check_returned(op="gated_delta_fwd", name="g", got=g_cum, shape=want_g.shape, dtype=want_g.dtype)
    return o, a, g_cum


@gated_delta_fwd.register_fake
def _(q, k, v, g, beta, scale, state_v_first, cu_seqlens):
    return torch.empty_like(v, dtype=q.dtype), _fake_a(k, v), _fake_g(g)


@torch.library.custom_op("flame_gin::gated_delta_bwd", mutates_args=())
def gated_delta_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    a: Tensor,
    g_cum: Tensor,
    do: Tensor,
    scale: float,
    state_v_first: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Chunked gated delta rule backward from the forward's A and cumulative gate: (dq, dk, dv, dg, dbeta)."""
    if not q.is_cuda:
        fn = lambda q_, k_, v_, g_, b_: _reference(q_, k_, v_, g_, b_, scale, state_v_first, cu_seqlens)
        return recompute_grads(fn, [q, k, v, g, beta], do)
    from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_bwd

    dq, dk, dv, db, dg, _, _, _ = chunk_gated_delta_rule_bwd(
        q=q,
        k=k,
        v=v,
        g=g_cum,
        beta=beta,
        A=a,
        scale=scale,
        initial_state=None,
        do=do.contiguous(),
        dht=None,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        chunk_indices=chunk_indices_for(cu_seqlens, CHUNK),
        chunk_size=CHUNK,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), db.to(beta.dtype)


@gated_delta_bwd.register_fake
def _(q, k, v, g, beta, a, g_cum, do, scale, state_v_first, cu_seqlens):
    return tuple(torch.empty_like(x) for x in (q, k, v, g, beta))


def _setup(ctx, inputs, output):
    q, k, v, g, beta, scale, state_v_first, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, g, beta, output[1], output[2], cu_seqlens)
    ctx.scale, ctx.state_v_first = scale, state_v_first


def _backward(ctx, do, _da, _dg):
    q, k, v, g, beta, a, g_cum, cu_seqlens = ctx.saved_tensors
    grads = gated_delta_bwd(q, k, v, g, beta, a, g_cum, do, ctx.scale, ctx.state_v_first, cu_seqlens)
    return *grads, None, None, None


gated_delta_fwd.register_autograd(_backward, setup_context=_setup)


def _flash_qla_installed() -> bool:
    return importlib.util.find_spec("flash_qla") is not None


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
    **kwargs,
):
    """`fla.ops.gated_delta_rule.chunk_gated_delta_rule` as one compiled-graph node; falls back as the module
    docstring says."""
    unusual = initial_state is not None or output_final_state or cp_context is not None or chunk_indices is not None
    unusual = unusual or (q.is_cuda and _flash_qla_installed())
    rejected = (allow_neg_eigval and not use_beta_sigmoid_in_kernel) or (use_gate_in_kernel and A_log is None)
    rejected = rejected or q.shape[2] != k.shape[2] or v.shape[2] % q.shape[2] != 0
    if unusual or rejected or kwargs.get("chunk_size", CHUNK) != CHUNK or set(kwargs) - {"chunk_size"}:
        return _unwrapped(q)(
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
            cu_seqlens_cpu=cu_seqlens_cpu,
            chunk_indices=chunk_indices,
            cp_context=cp_context,
            use_gate_in_kernel=use_gate_in_kernel,
            A_log=A_log,
            dt_bias=dt_bias,
            **kwargs,
        )
    if use_qk_l2norm_in_kernel:
        q, k = norm.l2norm(q), norm.l2norm(k)
    g, beta = gated_delta.gate_and_beta(
        g=g,
        beta=beta,
        use_gate_in_kernel=use_gate_in_kernel,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval,
    )
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    o, _, _ = gated_delta_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), scale,
        bool(state_v_first), cu_seqlens,
    )  # fmt: skip
    return o, None


def _unwrapped(q: Tensor):
    if q.is_cuda:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule

        return fla_chunk_gated_delta_rule
    return gated_delta.chunk_gated_delta_rule
