"""Pure-PyTorch linear-attention ops with the call signatures of FLA 0.6's Triton entry points.

FLA's Triton kernels cannot run without a GPU driver, and its `naive.py` references lack what the
layers pass (scale, V-first state layout, packed documents via `cu_seqlens`, fused gate/beta/l2norm
options). These functions take the same keyword arguments as `chunk_gla`, `fused_recurrent_gla`,
`chunk_delta_rule` and `fused_recurrent_delta_rule` (the gated delta rule's two are in `gated_delta`,
built on `delta_common`), compute in float32 with plain autograd (so backward is exact
too), and return `(o, final_state)` with `o` in the input dtype and the state in float32, as FLA does.

The math is the chunked form of each recurrence: inside a chunk the pairwise decays are formed
explicitly (no division by cumulative gates, so no overflow), and the delta rule's intra-chunk
dependency is a unit lower-triangular solve. Results do not depend on `chunk_size` beyond rounding.
"""

from __future__ import annotations

import contextlib

import torch

from flame_gin.kernels import norm

DEFAULT_CHUNK_SIZE = 64


def segments(*, cu_seqlens, batch: int, length: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of each independent sequence: rows of the batch, or packed documents."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a batch of 1 (documents packed in one row), got batch {batch}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != length or any(b > e for b, e in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} does not partition a sequence of length {length}")
    return [(0, b, e) for b, e in zip(bounds, bounds[1:])]


def to_value_heads(x, v_heads: int):
    """Query/key heads [B, T, H, K] repeated to the value heads (FLA's grouped value attention)."""
    heads = x.shape[2]
    if v_heads % heads:
        raise ValueError(f"value heads ({v_heads}) must be a multiple of query/key heads ({heads})")
    return x if v_heads == heads else x.repeat_interleave(v_heads // heads, dim=2)


def per_document(*, op, tensors, cu_seqlens):
    """`op` on each sequence's slice of `tensors` (stateless ops such as softmax attention), outputs joined back."""
    spans = segments(cu_seqlens=cu_seqlens, batch=tensors[0].shape[0], length=tensors[0].shape[1])
    outputs = [op(*(t[row : row + 1, start:end] for t in tensors)) for row, start, end in spans]
    return torch.cat(outputs, dim=0 if cu_seqlens is None else 1)


def run_segments(*, core, tensors, initial_state, output_final_state, state_v_first, cu_seqlens, out_dtype):
    """Runs `core` on each sequence with its own initial state; reassembles outputs and states. A state may be
    one tensor or a tuple of them (GSA's two passes); each is split and joined the same way."""
    batch, length = tensors[0].shape[:2]
    spans = segments(cu_seqlens=cu_seqlens, batch=batch, length=length)
    several = isinstance(initial_state, tuple)
    if initial_state is not None:
        parts_in = initial_state if several else (initial_state,)
        if any(x.shape[0] != len(spans) for x in parts_in):
            raise ValueError(f"initial_state has {parts_in[0].shape[0]} states for {len(spans)} sequences")
        parts_in = tuple(x.float().transpose(-1, -2) if state_v_first else x.float() for x in parts_in)
    outputs, states = [], []
    # float32 throughout, also under an enclosing bf16 autocast region
    device_type = tensors[0].device.type
    off = (
        torch.autocast(device_type=device_type, enabled=False)
        if device_type in ("cpu", "cuda")
        else contextlib.nullcontext()
    )  # no autocast on meta (memory estimates run blocks there)
    with off:
        for n, (row, start, end) in enumerate(spans):
            parts = [t[row : row + 1, start:end] for t in tensors]
            h0 = None
            if initial_state is not None:
                h0 = tuple(x[n : n + 1] for x in parts_in)
                h0 = h0 if several else h0[0]
            o, ht = core(*parts, h0)
            outputs.append(o)
            states.append(ht if isinstance(ht, tuple) else (ht,))
    o = torch.cat(outputs, dim=0 if cu_seqlens is None else 1)
    final_state = None
    if output_final_state:
        joined = tuple(torch.cat(part, dim=0) for part in zip(*states))
        if state_v_first:
            joined = tuple(x.transpose(-1, -2).contiguous() for x in joined)
        final_state = joined if len(joined) > 1 or several else joined[0]
    return o.to(out_dtype), final_state


def _gla_core(q, k, v, g, h0, *, scale, chunk_size):
    """Gated linear attention on one sequence: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t."""
    _, length, heads, dk = q.shape
    dv = v.shape[-1]
    h = q.new_zeros(1, heads, dk, dv) if h0 is None else h0
    outputs = []
    for start in range(0, length, chunk_size):
        qc, kc, vc, gc = (x[:, start : start + chunk_size] for x in (q, k, v, g))
        c = qc.shape[1]
        b = gc.cumsum(1)  # [1, c, H, K]
        o = torch.einsum("bthk,bhkv->bthv", qc * scale * b.exp(), h)
        mask = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        diff = (b[:, :, None] - b[:, None, :]).masked_fill(~mask[None, :, :, None, None], float("-inf"))
        scores = torch.einsum("bthk,bshk,btshk->btsh", qc * scale, kc, diff.exp())
        o = o + torch.einsum("btsh,bshv->bthv", scores, vc)
        outputs.append(o)
        last = b[:, -1]  # [1, H, K]
        h = h * last.exp()[..., None] + torch.einsum("bshk,bshv->bhkv", kc * (last[:, None] - b).exp(), vc)
    return torch.cat(outputs, dim=1), h


def _delta_core(q, k, v, beta, g, h0, *, scale, chunk_size):
    """(Gated) delta rule on one sequence, per head with scalar gate g and scalar beta:
    S'_t = exp(g_t) S_{t-1};  S_t = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T;  o_t = scale q_t^T S_t."""
    _, length, heads, dk = q.shape
    dv = v.shape[-1]
    h = q.new_zeros(1, heads, dk, dv) if h0 is None else h0
    outputs = []
    for start in range(0, length, chunk_size):
        qc, kc, vc, bc, gc = (x[:, start : start + chunk_size] for x in (q, k, v, beta, g))
        c = qc.shape[1]
        b = gc.cumsum(1)  # [1, c, H]
        lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        strict = lower.clone().fill_diagonal_(False)
        diff = b[:, :, None] - b[:, None, :]  # [1, t, s, H]
        decay = diff.masked_fill(~lower[None, :, :, None], float("-inf")).exp()
        kk = torch.einsum("bthk,bshk->btsh", kc, kc) * decay * bc[:, :, None]
        kk = kk.masked_fill(~strict[None, :, :, None], 0.0)
        # (I + L) U = beta * (V - exp(b) K S0), one unit lower-triangular system per head
        rhs = bc[..., None] * (vc - b.exp()[..., None] * torch.einsum("bthk,bhkv->bthv", kc, h))
        system = torch.eye(c, device=q.device, dtype=q.dtype) + kk.permute(0, 3, 1, 2)  # [1, H, t, s]
        u = torch.linalg.solve_triangular(system, rhs.permute(0, 2, 1, 3), upper=False, unitriangular=True)
        u = u.permute(0, 2, 1, 3)  # [1, c, H, V]
        qk = torch.einsum("bthk,bshk->btsh", qc * scale, kc) * decay
        o = torch.einsum("bthk,bhkv->bthv", qc * scale * b.exp()[..., None], h)
        o = o + torch.einsum("btsh,bshv->bthv", qk, u)
        outputs.append(o)
        last = b[:, -1]  # [1, H]
        weights = (last[:, None] - b).exp()[..., None]  # [1, c, H, 1]
        h = h * last.exp()[..., None, None] + torch.einsum("bshk,bshv->bhkv", kc * weights, u)
    return torch.cat(outputs, dim=1), h


def _check_chunk_size(chunk_size):
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


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
    chunk_size=DEFAULT_CHUNK_SIZE,
    **kwargs,
):
    """Reference for `fla.ops.gla.chunk_gla`: q, k, g [B, T, H, K], v [B, T, H, V], g in log space."""
    if kwargs.get("cp_context") is not None:
        raise NotImplementedError("the reference chunk_gla has no context-parallel path")
    _check_chunk_size(chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def core(q_, k_, v_, g_, h0):
        return _gla_core(q_, k_, v_, g_, h0, scale=scale, chunk_size=chunk_size)

    return run_segments(
        core=core,
        tensors=[x.float() for x in (q, k, v, g)],
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        out_dtype=v.dtype,
    )


def fused_recurrent_gla(
    q,
    k,
    v,
    gk=None,
    gv=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    reverse=False,
    state_v_first=False,
    cu_seqlens=None,
    **kwargs,
):
    """Reference for `fla.ops.gla.fused_recurrent_gla` (key-wise gate `gk`; `gv` and `reverse` unsupported)."""
    if gv is not None or reverse:
        raise NotImplementedError("the reference fused_recurrent_gla supports neither gv nor reverse")
    if gk is None:
        gk = torch.zeros_like(q)
    return chunk_gla(
        q=q,
        k=k,
        v=v,
        g=gk,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
    )


def delta_common(
    *,
    q,
    k,
    v,
    beta,
    g,
    scale,
    initial_state,
    output_final_state,
    state_v_first,
    cu_seqlens,
    use_qk_l2norm_in_kernel,
    chunk_size,
):
    """Shared body of the delta-rule references: l2norm, grouped value heads, defaults, per-sequence run."""
    _check_chunk_size(chunk_size)
    out_dtype = v.dtype
    v_heads = v.shape[2]
    q, k, v = q.float(), k.float(), v.float()
    if use_qk_l2norm_in_kernel:
        q, k = norm.l2norm(q), norm.l2norm(k)
    q, k = to_value_heads(q, v_heads), to_value_heads(k, v_heads)
    beta = torch.ones_like(v[..., 0]) if beta is None else beta.float()
    if beta.dim() != 3:
        raise NotImplementedError(f"the reference delta rule needs beta of shape [B, T, H], got {tuple(beta.shape)}")
    g = torch.zeros_like(v[..., 0]) if g is None else g.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def core(q_, k_, v_, b_, g_, h0):
        return _delta_core(q_, k_, v_, b_, g_, h0, scale=scale, chunk_size=chunk_size)

    return run_segments(
        core=core,
        tensors=[q, k, v, beta, g],
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        out_dtype=out_dtype,
    )


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
    chunk_size=DEFAULT_CHUNK_SIZE,
    **kwargs,
):
    """Reference for `fla.ops.delta_rule.chunk_delta_rule` (DeltaNet): beta [B, T, H], no gate."""
    return delta_common(
        q=q,
        k=k,
        v=v,
        beta=beta,
        g=None,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=False,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        chunk_size=chunk_size,
    )


def fused_recurrent_delta_rule(
    q,
    k,
    v,
    beta=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    **kwargs,
):
    """Reference for `fla.ops.delta_rule.fused_recurrent_delta_rule` (same math as the chunked form)."""
    return chunk_delta_rule(
        q=q,
        k=k,
        v=v,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        cu_seqlens=cu_seqlens,
    )


def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
    """Reference for `fla.ops.retention.chunk_retention` (RetNet): GLA with head h's fixed decay
    ``1 - 2^(-5-h)`` on every key channel, as FLA computes it through its simple-GLA kernel."""
    heads = q.shape[2]
    gamma = (1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float32, device=q.device))).log()
    g = gamma.view(1, 1, heads, 1).expand(*q.shape[:3], q.shape[-1])
    return chunk_gla(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=kwargs.get("chunk_size") or DEFAULT_CHUNK_SIZE,
    )


def chunk_gsa(q, k, v, s, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
    """Reference for `fla.ops.gsa.chunk_gsa` (GSA): FLA's own token-by-token recurrence (`fla.ops.gsa.naive`,
    two gated passes with a softmax over the slots between them), run document by document for `cu_seqlens`."""
    from fla.ops.gsa.naive import naive_recurrent_gsa

    def core(*parts):
        *inputs, h0 = parts
        gate = inputs.pop() if g is not None else None
        return naive_recurrent_gsa(*inputs, gate, scale, h0, output_final_state)

    return run_segments(
        core=core,
        tensors=[q, k, v, s] + ([] if g is None else [g]),
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=False,
        cu_seqlens=cu_seqlens,
        out_dtype=q.dtype,
    )
