"""FLA's chunked GLA and delta-rule ops as torch custom ops, so that `torch.compile` sees one opaque node each.

FLA 0.6 marks `chunk_gla` and `chunk_delta_rule` with `torch.compiler.disable`. Under per-block compile every
block then graph-breaks around its attention op; dynamo compiles the code after the break as resumed frames
that it guards anew for each layer, hits its recompile limit after eight blocks and leaves the rest in eager.
Registered as custom ops (forward one op, backward one op, fake implementations giving the shapes), the op
is a node of the block's graph like a matmul, so one graph serves every layer and `fullgraph=True` holds.

The forward op returns the output and the tensor FLA itself keeps for the backward (GLA's intra-chunk scores
`A`, DeltaNet's WY matrix `A`); the backward op runs FLA's own backward from them, so nothing is recomputed
that FLA's autograd Function does not recompute. On CUDA the ops call FLA's `chunk_gla_fwd`/`chunk_gla_bwd`
and `chunk_delta_rule_fwd`/`chunk_delta_rule_bwd` (internal functions of FLA >=0.6,<0.7, the range the swap
table pins); every call checks what FLA returned against the fake shapes and dtypes and raises if an FLA
change broke them. On CPU they run the float32 references of `flame_gin.kernels.attention` (backward by
recomputation), so CPU tests exercise the same graphs.

Calls with a recurrent state (an initial state, a final state wanted: generation, context parallel) fall
back to the unwrapped op; training never passes one. The layers' cache helpers are replaced too: FLA's read
the block's integer `layer_idx` even without a cache, and torch 2.11's dynamo guards on that value, so each
layer recompiled; these return at once when there is no cache.
"""

from __future__ import annotations

import torch

from flame_gin.kernels import attention, norm

Tensor = torch.Tensor
GLA_CHUNK_LIMITS = (16, 64)  # FLA's ChunkGLAFunction: min(64, max(16, next_power_of_2(T)))
DELTA_CHUNK = 64  # FLA's chunk_delta_rule default


def _gla_chunk(length: int) -> int:
    low, high = GLA_CHUNK_LIMITS
    return min(high, max(low, 1 << max(0, (length - 1).bit_length())))


def _check(*, op: str, name: str, got: Tensor, shape, dtype: torch.dtype) -> None:
    if got.shape != shape or got.dtype != dtype:
        raise RuntimeError(
            f"{op}: FLA returned {name} {tuple(got.shape)} {got.dtype}, flame_gin.kernels.opaque expects "
            f"{tuple(shape)} {dtype}; the installed FLA changed its internals (supported: 0.6.x)"
        )


def _chunk_indices(cu_seqlens: Tensor | None, chunk: int) -> Tensor | None:
    if cu_seqlens is None:
        return None
    from fla.ops.utils import prepare_chunk_indices

    return prepare_chunk_indices(cu_seqlens, chunk)


def _recompute_grads(fn, inputs: list[Tensor], grad_out: Tensor) -> tuple[Tensor, ...]:
    """CPU backward: the vector-Jacobian product of the reference forward (`torch.func.vjp`, which works
    below the autograd key where custom-op implementations run)."""
    _, vjp = torch.func.vjp(fn, *inputs)
    return tuple(g.to(x.dtype) for x, g in zip(inputs, vjp(grad_out.to(inputs[2].dtype))))


# --- GLA ----------------------------------------------------------------------------------------------------


def _gla_fake_a(q: Tensor) -> Tensor:
    batch, length, heads, _ = q.shape
    return q.new_empty(batch, length, heads, _gla_chunk(length), dtype=torch.float32)


@torch.library.custom_op("flame_gin::gla_fwd", mutates_args=())
def gla_fwd(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, state_v_first: bool, cu_seqlens: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Chunked GLA forward without states: returns (o, A)."""
    want_a = _gla_fake_a(q)
    if not q.is_cuda:
        o, _ = attention.chunk_gla(q=q, k=k, v=v, g=g, scale=scale, cu_seqlens=cu_seqlens)
        return o, torch.zeros_like(want_a)
    from fla.ops.gla.chunk import chunk_gla_fwd

    chunk = want_a.shape[-1]
    _, a, _, _, o = chunk_gla_fwd(
        q=q,
        k=k,
        v=v,
        g=g,
        g_cumsum=None,
        scale=scale,
        initial_state=None,
        output_final_state=False,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk,
        chunk_indices=_chunk_indices(cu_seqlens, chunk),
    )
    _check(op="gla_fwd", name="o", got=o, shape=v.shape, dtype=v.dtype)
    _check(op="gla_fwd", name="A", got=a, shape=want_a.shape, dtype=want_a.dtype)
    return o, a


@gla_fwd.register_fake
def _(q, k, v, g, scale, state_v_first, cu_seqlens):
    return torch.empty_like(v), _gla_fake_a(q)


@torch.library.custom_op("flame_gin::gla_bwd", mutates_args=())
def gla_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    a: Tensor,
    do: Tensor,
    scale: float,
    state_v_first: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chunked GLA backward from the forward's A: returns (dq, dk, dv, dg) in the inputs' dtypes."""
    if not q.is_cuda:
        fn = lambda q_, k_, v_, g_: attention.chunk_gla(q=q_, k=k_, v=v_, g=g_, scale=scale, cu_seqlens=cu_seqlens)[0]
        return _recompute_grads(fn, [q, k, v, g], do)
    from fla.ops.gla.chunk import chunk_gla_bwd

    chunk = a.shape[-1]
    dq, dk, dv, dg, _ = chunk_gla_bwd(
        q=q,
        k=k,
        v=v,
        g=g,
        g_cumsum=None,
        scale=scale,
        initial_state=None,
        h=None,
        A=a,
        do=do.contiguous(),
        dht=None,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk,
        chunk_indices=_chunk_indices(cu_seqlens, chunk),
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype)


@gla_bwd.register_fake
def _(q, k, v, g, a, do, scale, state_v_first, cu_seqlens):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g)


def _gla_setup(ctx, inputs, output):
    q, k, v, g, scale, state_v_first, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, g, output[1], cu_seqlens)
    ctx.scale, ctx.state_v_first = scale, state_v_first


def _gla_backward(ctx, do, _da):
    q, k, v, g, a, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dg = gla_bwd(q, k, v, g, a, do, ctx.scale, ctx.state_v_first, cu_seqlens)
    return dq, dk, dv, dg, None, None, None


gla_fwd.register_autograd(_gla_backward, setup_context=_gla_setup)


def chunk_gla(
    q,
    k,
    v,
    g,
    scale=None,
    initial_state=None,
    output_final_state=False,
    state_v_first=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    **kwargs,
):
    """`fla.ops.gla.chunk_gla` as one compiled-graph node; falls back to the unwrapped op with states."""
    if initial_state is not None or output_final_state or kwargs:
        return _unwrapped_gla(q)(
            q=q,
            k=k,
            v=v,
            g=g,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            state_v_first=state_v_first,
            cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu,
            **kwargs,
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, _ = gla_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), scale, bool(state_v_first), cu_seqlens
    )
    return o, None


def _unwrapped_gla(q: Tensor):
    if q.is_cuda:
        from fla.ops.gla import chunk_gla as fla_chunk_gla

        return fla_chunk_gla
    return attention.chunk_gla


# --- DeltaNet ------------------------------------------------------------------------------------------------


def _delta_fake_a(k: Tensor) -> Tensor:
    batch, length, heads, _ = k.shape
    return k.new_empty(batch, length, heads, DELTA_CHUNK)


@torch.library.custom_op("flame_gin::delta_fwd", mutates_args=())
def delta_fwd(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, scale: float, cu_seqlens: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Chunked delta rule forward without states (q, k already normalised): returns (o, A)."""
    want_a = _delta_fake_a(k)
    if not q.is_cuda:
        o, _ = attention.chunk_delta_rule(q=q, k=k, v=v, beta=beta, scale=scale, cu_seqlens=cu_seqlens)
        return o.to(q.dtype), torch.zeros_like(want_a)
    from fla.ops.delta_rule.chunk import chunk_delta_rule_fwd

    o, a, _ = chunk_delta_rule_fwd(
        q=q,
        k=k,
        v=v,
        beta=beta,
        scale=scale,
        initial_state=None,
        output_final_state=False,
        cu_seqlens=cu_seqlens,
        chunk_indices=_chunk_indices(cu_seqlens, DELTA_CHUNK),
        chunk_size=DELTA_CHUNK,
    )
    o = o.to(q.dtype)
    _check(op="delta_fwd", name="o", got=o, shape=v.shape, dtype=q.dtype)
    _check(op="delta_fwd", name="A", got=a, shape=want_a.shape, dtype=want_a.dtype)
    return o, a


@delta_fwd.register_fake
def _(q, k, v, beta, scale, cu_seqlens):
    return torch.empty_like(v, dtype=q.dtype), _delta_fake_a(k)


@torch.library.custom_op("flame_gin::delta_bwd", mutates_args=())
def delta_bwd(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, a: Tensor, do: Tensor, scale: float, cu_seqlens: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chunked delta rule backward from the forward's A: returns (dq, dk, dv, dbeta)."""
    if not q.is_cuda:
        fn = lambda q_, k_, v_, b_: attention.chunk_delta_rule(
            q=q_, k=k_, v=v_, beta=b_, scale=scale, cu_seqlens=cu_seqlens
        )[0]
        return _recompute_grads(fn, [q, k, v, beta], do)
    from fla.ops.delta_rule.chunk import chunk_delta_rule_bwd

    dq, dk, dv, db, _ = chunk_delta_rule_bwd(
        q=q,
        k=k,
        v=v,
        beta=beta,
        A=a,
        scale=scale,
        initial_state=None,
        do=do.contiguous(),
        dht=None,
        cu_seqlens=cu_seqlens,
        chunk_indices=_chunk_indices(cu_seqlens, DELTA_CHUNK),
        chunk_size=DELTA_CHUNK,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), db.to(beta.dtype)


@delta_bwd.register_fake
def _(q, k, v, beta, a, do, scale, cu_seqlens):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta)


def _delta_setup(ctx, inputs, output):
    q, k, v, beta, scale, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, beta, output[1], cu_seqlens)
    ctx.scale = scale


def _delta_backward(ctx, do, _da):
    q, k, v, beta, a, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, db = delta_bwd(q, k, v, beta, a, do, ctx.scale, cu_seqlens)
    return dq, dk, dv, db, None, None


delta_fwd.register_autograd(_delta_backward, setup_context=_delta_setup)


def chunk_delta_rule(
    q,
    k,
    v,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    **kwargs,
):
    """`fla.ops.delta_rule.chunk_delta_rule` as one compiled-graph node; falls back with states."""
    if initial_state is not None or output_final_state or kwargs:
        return _unwrapped_delta(q)(
            q=q,
            k=k,
            v=v,
            beta=beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu,
            **kwargs,
        )
    if use_qk_l2norm_in_kernel:  # outside the op (FLA does it inside): the compiled graph fuses it
        q, k = norm.l2norm(q), norm.l2norm(k)
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    o, _ = delta_fwd(q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), scale, cu_seqlens)
    return o, None


def _unwrapped_delta(q: Tensor):
    if q.is_cuda:
        from fla.ops.delta_rule import chunk_delta_rule as fla_chunk_delta_rule

        return fla_chunk_delta_rule
    return attention.chunk_delta_rule


# --- cache helpers -------------------------------------------------------------------------------------------


def get_layer_cache(module, past_key_values):
    """`fla.layers.utils.get_layer_cache` that reads nothing of `module` when there is no cache."""
    if past_key_values is None:
        return None
    from fla.layers import utils

    return utils.get_layer_cache(module, past_key_values)


def update_layer_cache(module, past_key_values, **kwargs):
    """`fla.layers.utils.update_layer_cache` that reads nothing of `module` when there is no cache."""
    if past_key_values is None:
        return None
    from fla.layers import utils

    return utils.update_layer_cache(module, past_key_values, **kwargs)
