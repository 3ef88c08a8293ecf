"""The reference attention, conv and norm ops against independent float64 step-by-step computations."""

import pytest
import torch
import torch.nn.functional as F
from graph_count import GraphCounter

from flame_gin.kernels import attention, conv, gated_delta, norm


def recurrence64(*, q, k, v, scale, gk=None, g=None, beta=None, h0=None):
    """Token-by-token float64 linear recurrence with the state S [K, V] per head.

    S <- S * exp(gate); S <- S + k (beta (v - S^T k))^T (delta rule) or S + k v^T; o = scale q^T S.
    """
    q, k, v = q.double(), k.double(), v.double()
    batch, length, heads, dk = q.shape
    state = torch.zeros(batch, heads, dk, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double().clone()
    out = torch.zeros(batch, length, heads, v.shape[-1], dtype=torch.float64)
    for t in range(length):
        if gk is not None:
            state = state * gk[:, t].double().exp()[..., None]
        if g is not None:
            state = state * g[:, t].double().exp()[..., None, None]
        kt, vt = k[:, t], v[:, t]
        if beta is None:
            state = state + kt[..., None] * vt[..., None, :]
        else:
            pred = torch.einsum("bhk,bhkv->bhv", kt, state)
            state = state + kt[..., None] * (beta[:, t].double()[..., None] * (vt - pred))[..., None, :]
        out[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state)
    return out, state


def _inputs(*, batch=2, length=37, heads=2, dk=8, dv=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, dk, generator=gen)
    k = F.normalize(torch.randn(batch, length, heads, dk, generator=gen), dim=-1)
    v = torch.randn(batch, length, heads, dv, generator=gen)
    gk = F.logsigmoid(torch.randn(batch, length, heads, dk, generator=gen) + 2)
    g = F.logsigmoid(torch.randn(batch, length, heads, generator=gen) + 2)
    beta = torch.rand(batch, length, heads, generator=gen)
    h0 = torch.randn(batch, heads, dk, dv, generator=gen)
    return dict(q=q, k=k, v=v, gk=gk, g=g, beta=beta, h0=h0)


def _run(family, x, *, chunk_size=64, **kw):
    if family == "gla":
        return attention.chunk_gla(q=x["q"], k=x["k"], v=x["v"], g=x["gk"], chunk_size=chunk_size, **kw)
    if family == "delta":
        return attention.chunk_delta_rule(q=x["q"], k=x["k"], v=x["v"], beta=x["beta"], chunk_size=chunk_size, **kw)
    return gated_delta.chunk_gated_delta_rule(
        q=x["q"], k=x["k"], v=x["v"], g=x["g"], beta=x["beta"], chunk_size=chunk_size, **kw
    )


def _expected(family, x, *, h0=None):
    scale = x["q"].shape[-1] ** -0.5
    gates = {"gla": dict(gk=x["gk"]), "delta": dict(beta=x["beta"]), "gdn": dict(g=x["g"], beta=x["beta"])}[family]
    return recurrence64(q=x["q"], k=x["k"], v=x["v"], scale=scale, h0=h0, **gates)


FAMILIES = ["gla", "delta", "gdn"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_matches_float64_recurrence_for_any_chunk_size(family, chunk_size):
    x = _inputs()
    o, ht = _run(family, x, chunk_size=chunk_size, initial_state=x["h0"], output_final_state=True)
    o_ref, h_ref = _expected(family, x, h0=x["h0"])
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ht.double(), h_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_run_with_carried_state_equals_full_run(family):
    x = _inputs(length=40)
    o_full, h_full = _run(family, x, initial_state=x["h0"], output_final_state=True, chunk_size=16)
    first = {n: (t[:, :20] if t.dim() >= 3 else t) for n, t in x.items()}
    second = {n: (t[:, 20:] if t.dim() >= 3 else t) for n, t in x.items()}
    o1, h1 = _run(family, first, initial_state=x["h0"], output_final_state=True, chunk_size=16)
    o2, h2 = _run(family, second, initial_state=h1, output_final_state=True, chunk_size=16)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2, h_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_varlen_equals_separate_documents(family):
    x = _inputs(batch=1, length=45)
    bounds = [0, 7, 30, 45]
    h0 = torch.randn(3, *x["h0"].shape[1:])
    o, ht = _run(family, x, cu_seqlens=torch.tensor(bounds), initial_state=h0, output_final_state=True)
    for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
        doc = {name: (t[:, s:e] if t.dim() >= 3 else t) for name, t in x.items()}
        o_ref, h_ref = _expected(family, doc, h0=h0[n : n + 1])
        torch.testing.assert_close(o[:, s:e].double(), o_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ht[n : n + 1].double(), h_ref, atol=2e-5, rtol=1e-4)


def test_state_v_first_is_the_transposed_layout():
    x = _inputs()
    o, ht = _run("gla", x, initial_state=x["h0"], output_final_state=True)
    o_t, ht_t = _run("gla", x, initial_state=x["h0"].transpose(-1, -2), output_final_state=True, state_v_first=True)
    torch.testing.assert_close(o_t, o)
    torch.testing.assert_close(ht_t, ht.transpose(-1, -2))


def test_gated_delta_rule_fused_gate_beta_l2norm_and_grouped_value_heads():
    gen = torch.Generator().manual_seed(1)
    batch, length, heads, v_heads, dk, dv = 2, 20, 2, 4, 8, 5
    q, k = torch.randn(batch, length, heads, dk, generator=gen), torch.randn(batch, length, heads, dk, generator=gen)
    v = torch.randn(batch, length, v_heads, dv, generator=gen)
    g_raw, b_raw = (
        torch.randn(batch, length, v_heads, generator=gen),
        torch.randn(batch, length, v_heads, generator=gen),
    )
    a_log, dt_bias = torch.randn(v_heads, generator=gen), torch.randn(v_heads, generator=gen)
    o, _ = gated_delta.chunk_gated_delta_rule(
        q=q,
        k=k,
        v=v,
        g=g_raw,
        beta=b_raw,
        use_qk_l2norm_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=True,
        use_gate_in_kernel=True,
        A_log=a_log,
        dt_bias=dt_bias,
        chunk_size=8,
    )
    # independent: explicit gate/beta/normalisation, heads repeated by hand, float64 recurrence
    q64, k64 = F.normalize(q.double(), dim=-1), F.normalize(k.double(), dim=-1)
    rep = [h // (v_heads // heads) for h in range(v_heads)]
    gate = -a_log.double().exp() * F.softplus(g_raw.double() + dt_bias.double())
    beta = 2 * torch.sigmoid(b_raw.double())
    o_ref, _ = recurrence64(q=q64[:, :, rep], k=k64[:, :, rep], v=v, scale=dk**-0.5, g=gate, beta=beta)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-4)


def test_bf16_inputs_compute_in_float32_and_return_bf16():
    x = _inputs()
    xb = {n: t.bfloat16() for n, t in x.items()}
    o, _ = _run("gla", xb)
    o_ref, _ = _expected("gla", {n: t.float() for n, t in xb.items()})
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.double(), o_ref, atol=3e-2, rtol=2e-2)


def test_gradients_match_float64_recurrence():
    x = _inputs(length=12)
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items() if n in ("q", "k", "v", "beta", "g")}
    o, _ = _run("gdn", {**x, **leaves}, chunk_size=5)
    o.square().sum().backward()
    leaves64 = {n: t.detach().double().requires_grad_(True) for n, t in leaves.items()}
    o64, _ = recurrence64(
        q=leaves64["q"],
        k=leaves64["k"],
        v=leaves64["v"],
        g=leaves64["g"],
        beta=leaves64["beta"],
        scale=x["q"].shape[-1] ** -0.5,
    )
    o64.square().sum().backward()
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad.double(), leaves64[name].grad, atol=1e-4, rtol=1e-3)


def test_causal_conv_matches_padded_conv1d_and_carries_its_cache():
    gen = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(2, 11, 6, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    y, state = conv.causal_conv1d(x=x, weight=w, bias=b, activation="silu", output_final_state=True)
    ref = F.conv1d(x.double().transpose(1, 2), w.double()[:, None], b.double(), padding=3, groups=6)[..., :11]
    torch.testing.assert_close(y.double(), F.silu(ref).transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, x[:, -4:].transpose(1, 2))
    y1, s1 = conv.causal_conv1d(x=x[:, :5], weight=w, bias=b, activation="silu", output_final_state=True)
    y2, _ = conv.causal_conv1d(x=x[:, 5:], weight=w, bias=b, activation="silu", initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    cache = s1.clone()
    y_step, _ = conv.causal_conv1d_update(x=x[:, 5:6], cache=cache, weight=w, bias=b, activation="silu")
    torch.testing.assert_close(y_step, y[:, 5:6])
    packed, _ = conv.causal_conv1d(x=x.reshape(1, 22, 6), weight=w, bias=b, cu_seqlens=torch.tensor([0, 11, 22]))
    plain, _ = conv.causal_conv1d(x=x, weight=w, bias=b)
    torch.testing.assert_close(packed.reshape(2, 11, 6), plain)


def _conv64_with_state(*, x, w, b, state):
    """Float64 depthwise causal convolution of one sequence x [T, D] continued from state [D, W] (oldest first)."""
    width = w.shape[-1]
    padded = torch.cat([state.double()[:, 1:], x.double().t()], dim=1)  # the last W - 1 past inputs, then x
    y = F.conv1d(padded[None], w.double()[:, None], b.double(), groups=w.shape[0])[0].t()
    return F.silu(y), torch.cat([state.double(), x.double().t()], dim=1)[:, -width:]


def test_packed_causal_conv_keeps_documents_apart_with_states_and_short_documents():
    gen = torch.Generator().manual_seed(5)
    edges = [0, 2, 9, 10, 17]  # documents of 2, 7, 1 and 7 tokens: two shorter than the width 4
    x, w, b = torch.randn(1, 17, 6, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    h0 = torch.randn(4, 6, 4, generator=gen)
    y, state = conv.causal_conv1d(
        x=x,
        weight=w,
        bias=b,
        activation="silu",
        initial_state=h0,
        output_final_state=True,
        cu_seqlens=torch.tensor(edges),
    )
    for n, (start, end) in enumerate(zip(edges, edges[1:])):
        y64, s64 = _conv64_with_state(x=x[0, start:end], w=w, b=b, state=h0[n])
        torch.testing.assert_close(y[0, start:end].double(), y64, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[n].double(), s64)


def test_packed_causal_conv_compiles_to_one_graph_for_any_document_count():
    counter = GraphCounter()
    fn = torch.compile(conv.causal_conv1d, backend=counter, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(1, 16, 6, generator=gen), torch.randn(6, 4, generator=gen)
    for edges in ([0, 5, 16], [0, 3, 8, 16], [0, 1, 2, 9, 16]):
        cu = torch.tensor(edges)
        torch._dynamo.mark_dynamic(cu, 0)
        got, _ = fn(x, w, None, cu_seqlens=cu)
        want, _ = conv.causal_conv1d(x=x, weight=w, cu_seqlens=cu)
        torch.testing.assert_close(got, want)
    assert counter.count == 1


def test_norms_match_float64_formulas():
    gen = torch.Generator().manual_seed(3)
    x, r, g = (torch.randn(3, 5, 8, generator=gen) for _ in range(3))
    w, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    x64, s64 = x.double(), (x + r).double()
    rms = s64 * torch.rsqrt(s64.square().mean(-1, keepdim=True) + 1e-5) * w.double()
    y, stream = norm.rms_norm(x, w, None, residual=r, prenorm=True)
    torch.testing.assert_close(y.double(), rms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stream, x + r)
    ln = F.layer_norm(x64, (8,), w.double(), b.double(), eps=1e-5)
    torch.testing.assert_close(norm.layer_norm(x, w, b).double(), ln, atol=1e-5, rtol=1e-5)
    gated = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w.double() * F.silu(g.double())
    torch.testing.assert_close(norm.rms_norm_gated(x, g, w, None).double(), gated, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.l2norm(x).double(), F.normalize(x64, dim=-1), atol=1e-5, rtol=1e-5)
