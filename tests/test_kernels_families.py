"""The per-family CPU references (KDA, Comba, Gated DeltaProduct, HGRN, LightNet, RWKV-6/7, MesaNet, FoX, PaTH)
against independent implementations: float64 closed forms and loops, or another family's reference where one
family reduces to another (a key-uniform KDA gate is Gated DeltaNet's, Comba with p = k is the delta rule, ...).
The recurrences themselves are FLA's naive ones; these tests check what the references add around them: gate
and beta activations, norms, scales, grouped heads, packed documents and carried states.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flame_gin.kernels import attention, gated_delta


def test_kda_reference_with_a_key_uniform_gate_equals_the_gated_delta_rule():
    """KDA's gate is per key dimension; one that is the same across the key dimensions is Gated DeltaNet's head-wise
    gate. The KDA reference (FLA's token loop behind the fused activations, packed documents, carried states,
    V-first states, grouped value heads) then equals the chunked gated-delta reference, another implementation."""
    from flame_gin.kernels import kda

    gen = torch.Generator().manual_seed(3)
    length, heads, v_heads, dk, dv = 23, 2, 4, 8, 5
    q, k = torch.randn(1, length, heads, dk, generator=gen), torch.randn(1, length, heads, dk, generator=gen)
    v = torch.randn(1, length, v_heads, dv, generator=gen)
    g_raw, b_raw = torch.randn(1, length, v_heads, generator=gen), torch.randn(1, length, v_heads, generator=gen)
    a_log = torch.randn(v_heads, generator=gen)
    cu = torch.tensor([0, 9, 16, 23])
    h0 = torch.randn(3, v_heads, dv, dk, generator=gen)  # V-first states, one per document
    common = dict(
        beta=b_raw,
        initial_state=h0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=True,
        state_v_first=True,
        cu_seqlens=cu,
    )
    # raw KDA gate: -exp(A_log) * softplus(g + dt_bias) per key dimension; a bias equal across keys keeps it uniform
    dt_bias = torch.randn(v_heads, 1, generator=gen).expand(v_heads, dk).reshape(-1)
    o, ht = kda.chunk_kda(
        q,
        k,
        v,
        g_raw[..., None].expand(-1, -1, -1, dk),
        use_gate_in_kernel=True,
        A_log=a_log,
        dt_bias=dt_bias,
        **common,
    )
    o_ref, ht_ref = gated_delta.chunk_gated_delta_rule(
        q,
        k,
        v,
        g_raw,
        use_gate_in_kernel=True,
        A_log=a_log,
        dt_bias=dt_bias.view(v_heads, dk)[:, 0],
        chunk_size=8,
        **common,
    )
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ht, ht_ref, atol=1e-5, rtol=1e-4)
    # the lower-bounded gate: lower_bound * sigmoid(exp(A_log) * (g + dt_bias)), in log space
    bound = -5.0 * torch.sigmoid(a_log.exp()[:, None] * (g_raw[..., None] + dt_bias.view(v_heads, dk)))
    o_lb, _ = kda.chunk_kda(
        q,
        k,
        v,
        g_raw[..., None].expand(-1, -1, -1, dk),
        use_gate_in_kernel=True,
        A_log=a_log,
        dt_bias=dt_bias,
        lower_bound=-5.0,
        safe_gate=True,
        **common,
    )
    o_lb_ref, _ = gated_delta.chunk_gated_delta_rule(q, k, v, bound[..., 0], chunk_size=8, **common)
    torch.testing.assert_close(o_lb, o_lb_ref, atol=1e-5, rtol=1e-4)


TOL64 = dict(atol=1e-5, rtol=1e-4)


def _delta_inputs(*, heads=2, v_heads=2, dk=8, dv=5, length=23, steps=1, seed=4):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, length, heads, dk, generator=gen)
    k = torch.randn(1, length * steps, heads, dk, generator=gen)
    v = torch.randn(1, length * steps, v_heads, dv, generator=gen)
    beta = torch.rand(1, length * steps, v_heads, generator=gen)
    g = -torch.rand(1, length, v_heads, generator=gen)
    return q, k, v, beta, g


def test_comba_reference_reads_the_state_through_p():
    """Comba corrects the value with the state read through ``p`` and writes it with ``k``: with ``p = k`` it is the
    gated delta rule (the chunked reference, another implementation); with ``p != k`` it follows a float64 loop."""
    from flame_gin.kernels import delta_variants

    q, k, v, beta, g = _delta_inputs(heads=2, v_heads=4)
    cu = torch.tensor([0, 9, 16, 23])
    h0 = torch.randn(3, 4, 8, 5, generator=torch.Generator().manual_seed(5))
    common = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    o, ht = delta_variants.chunk_comba(q, k, v, k, g, beta, **common)
    o_ref, ht_ref = gated_delta.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=8, **common)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ht, ht_ref, atol=1e-5, rtol=1e-4)

    p = torch.randn(k.shape, generator=torch.Generator().manual_seed(6))
    o, _ = delta_variants.chunk_comba(q, k, v, p, g, beta)
    q64, k64, p64 = (x.double().repeat_interleave(2, dim=2) for x in (q, k, p))
    S = torch.zeros(4, 8, 5, dtype=torch.float64)
    for t in range(q.shape[1]):
        S = S * g[0, t].double().exp()[:, None, None]
        new_v = (v[0, t].double() - torch.einsum("hk,hkv->hv", p64[0, t], S)) * beta[0, t, :, None].double()
        S = S + torch.einsum("hk,hv->hkv", k64[0, t], new_v)
        torch.testing.assert_close(o[0, t].double(), torch.einsum("hk,hkv->hv", q64[0, t] * 8**-0.5, S), **TOL64)


def test_gated_deltaproduct_reference_is_the_delta_rule_over_its_householder_steps():
    """Gated DeltaProduct takes ``n`` delta-rule steps per token, decays once per token and reads out after the
    last: the gated delta rule (chunked reference) over the ``T * n`` steps with the decay on each token's first
    step and the query on its last, documents and states included."""
    from flame_gin.kernels import delta_variants

    n, length = 2, 23
    q, k, v, beta, g = _delta_inputs(length=length, steps=n)
    cu = torch.tensor([0, 9, 16, 23])
    h0 = torch.randn(3, 2, 8, 5, generator=torch.Generator().manual_seed(7))
    o, ht = delta_variants.chunk_gated_delta_product(
        q,
        k,
        v,
        g,
        beta,
        num_householder=n,
        initial_state=h0,
        output_final_state=True,
        cu_seqlens=cu,
        use_qk_l2norm_in_kernel=True,
    )
    q_steps = torch.zeros(1, length, n, 2, 8)
    q_steps[:, :, -1] = F.normalize(q, dim=-1)
    g_steps = torch.zeros(1, length, n, 2)
    g_steps[:, :, 0] = g
    o_steps, ht_ref = gated_delta.chunk_gated_delta_rule(
        q_steps.flatten(1, 2),
        F.normalize(k, dim=-1),
        v,
        g_steps.flatten(1, 2),
        beta,
        scale=8**-0.5,
        initial_state=h0,
        output_final_state=True,
        cu_seqlens=cu * n,
        chunk_size=8,
    )
    torch.testing.assert_close(o, o_steps.unflatten(1, (length, n))[:, :, -1], **TOL64)
    torch.testing.assert_close(ht, ht_ref, **TOL64)


def test_hgrn_reference_equals_the_closed_form_per_document():
    """h_t = exp(g_t) h_{t-1} + x_t is, in closed form, h_t = sum_s exp(G_t - G_s) x_s + exp(G_t) h_0 with G the
    running sum of g: computed in float64 per packed document, its own initial state each."""
    from flame_gin.kernels import hgrn

    gen = torch.Generator().manual_seed(8)
    x, g = torch.randn(1, 17, 6, generator=gen), -torch.rand(1, 17, 6, generator=gen)
    cu, h0 = torch.tensor([0, 5, 17]), torch.randn(2, 6, generator=gen)
    o, ht = hgrn.chunk_hgrn(x, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        G = g[0, start:end].double().cumsum(0)  # [t, D]
        weights = (G[:, None] - G[None, :]).exp() * torch.ones(end - start, end - start).tril()[..., None].double()
        expected = torch.einsum("tsd,sd->td", weights, x[0, start:end].double()) + G.exp() * h0[n].double()
        torch.testing.assert_close(o[0, start:end].double(), expected, **TOL64)
        torch.testing.assert_close(ht[n].double(), expected[-1], **TOL64)


def test_lightnet_reference_is_a_running_softmax_over_time_per_key_channel():
    """LightNet's key channel c of token s, seen from token t, is exp(x_s) / (exp(z_0) + sum_{r<=t} exp(x_r)): a
    softmax over the document so far, the carried state decayed by exp(z_0) over the same sum. Closed form in
    float64 per packed document, with carried states in the V-first layout the layer uses."""
    from flame_gin.kernels import lightnet

    gen = torch.Generator().manual_seed(9)
    heads, dk, dv = 2, 4, 3
    q, x = torch.randn(1, 15, heads, dk, generator=gen), torch.randn(1, 15, heads, dk, generator=gen)
    v = torch.randn(1, 15, heads, dv, generator=gen)
    cu = torch.tensor([0, 6, 15])
    h0, z0 = torch.randn(2, heads, dv, dk, generator=gen), torch.randn(2, 1, heads, dk, generator=gen)
    o, (ht, zt) = lightnet.chunk_lightnet(
        q, x, v, initial_state=(h0, z0), output_final_state=True, state_v_first=True, cu_seqlens=cu
    )
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        qd, xd, vd = (t[0, start:end].double() for t in (q, x, v))
        total = z0[n, 0].double().exp() + xd.exp().cumsum(0)  # [t, H, K]
        weights = xd.exp()[None] / total[:, None] * torch.ones(end - start, end - start).tril()[..., None, None]
        expected = torch.einsum("thk,tshk,shv->thv", qd * dk**-0.5, weights.double(), vd)
        carried = z0[n, 0].double().exp() / total  # [t, H, K]
        expected = expected + torch.einsum("thk,hvk->thv", qd * dk**-0.5 * carried, h0[n].double())
        torch.testing.assert_close(o[0, start:end].double(), expected, **TOL64)
        torch.testing.assert_close(zt[n, 0].double(), total[-1].log(), **TOL64)


def test_rwkv6_reference_equals_its_closed_form_per_document():
    """o_t = r_t (S_{t-1} + diag(u) k_t v_t^T), S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T, in closed form:
    token s reaches t > s decayed by exp(W_{t-1} - W_s) (W the running sum of w), the carried state by exp(W_{t-1}).
    Float64, per packed document, each with its own carried state."""
    from flame_gin.kernels import rwkv6

    gen = torch.Generator().manual_seed(10)
    heads, dk, dv, length = 2, 4, 3, 13
    r, k = torch.randn(1, length, heads, dk, generator=gen), torch.randn(1, length, heads, dk, generator=gen)
    v, w = torch.randn(1, length, heads, dv, generator=gen), -torch.rand(1, length, heads, dk, generator=gen)
    u, cu, h0 = torch.randn(heads, dk, generator=gen), torch.tensor([0, 4, 13]), torch.randn(2, heads, dk, dv)
    o, ht = rwkv6.chunk_rwkv6(r, k, v, w, u, scale=0.5, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        rd, kd, vd, wd = (t[0, start:end].double() for t in (r, k, v, w))
        W = wd.cumsum(0)
        before = torch.cat([torch.zeros_like(W[:1]), W[:-1]])  # W_{t-1}
        strict = torch.ones(end - start, end - start).tril(-1)[..., None, None].double()
        decay = (before[:, None] - W[None, :]).exp() * strict  # [t, s, H, K]
        expected = torch.einsum("thk,tshk,shk,shv->thv", rd * 0.5, decay, kd, vd)
        expected += torch.einsum("thk,hk,thk,thv->thv", rd * 0.5, u.double(), kd, vd)
        expected += torch.einsum("thk,hkv->thv", rd * 0.5 * before.exp(), h0[n].double())
        torch.testing.assert_close(o[0, start:end].double(), expected, **TOL64)
        final = (W[-1] - W).exp()[..., None] * kd[..., None] * vd[:, :, None]  # [s, H, K, V]
        torch.testing.assert_close(ht[n].double(), final.sum(0) + W[-1].exp()[..., None] * h0[n].double(), **TOL64)


def test_token_shift_reference_matches_flas_own_and_carries_its_cache():
    from fla.modules.token_shift import token_shift_ref

    from flame_gin.kernels import rwkv6

    x, cu = torch.randn(1, 11, 6, generator=torch.Generator().manual_seed(11)), torch.tensor([0, 1, 5, 11])
    torch.testing.assert_close(rwkv6.token_shift(x, cu), token_shift_ref(x, cu))
    torch.testing.assert_close(rwkv6.token_shift(x.view(1, 11, 6)), token_shift_ref(x))
    # a sequence in two calls, the second carrying the first's last token, equals one call
    first, cache = rwkv6.token_shift(x[:, :7], output_cache=True)
    second = rwkv6.token_shift(x[:, 7:], cache=cache)
    torch.testing.assert_close(torch.cat([first, second], dim=1), rwkv6.token_shift(x))


def test_path_reference_without_householder_steps_is_forgetting_attention():
    """With beta = 0 every Householder transform is the identity, so PaTH is softmax attention with forget gates:
    the Forgetting Transformer's reference, per packed document (PaTH scales the gate sums with the scores, FoX
    adds them unscaled); with beta != 0 the keys are transformed and the output moves."""
    from flame_gin.kernels import forgetting, path

    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 19, h, 8, generator=gen) for h in (4, 2, 2))
    w, g = F.normalize(torch.randn(1, 19, 2, 8, generator=gen), dim=-1), -torch.rand(1, 19, 4, generator=gen)
    cu = torch.tensor([0, 7, 19])
    o, cache = path.parallel_path_attn(q, k, v, w, torch.zeros(1, 19, 2), g, scale=0.3, cu_seqlens=cu)
    assert cache is None
    fox = forgetting.parallel_forgetting_attn(q, k, v, g * 0.3, scale=0.3, cu_seqlens=cu)
    torch.testing.assert_close(o, fox, **TOL64)
    moved, _ = path.parallel_path_attn(q, k, v, w, torch.ones(1, 19, 2), g, scale=0.3, cu_seqlens=cu)
    assert (moved - o).abs().max() > 1e-2
    with pytest.raises(NotImplementedError, match="decode PaTH on a GPU"):
        path.parallel_path_attn(q, k, v, w, torch.zeros(1, 19, 2), g, use_cache=True)


def test_rwkv7_reference_is_gla_without_its_low_rank_term_and_the_delta_rule_without_decay():
    """RWKV-7's rule S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + k_t v_t^T (in FLA's [K, V] layout): with
    a = 0 it is gated linear attention, with w = 0, a = -k, b = beta k and key beta k it is the delta rule; each
    against the chunked references (other implementations), per packed document with carried states."""
    from flame_gin.kernels import rwkv7

    gen = torch.Generator().manual_seed(13)
    heads, dk, dv, length = 2, 8, 5, 21
    r, k = torch.randn(1, length, heads, dk, generator=gen), F.normalize(torch.randn(1, length, heads, dk), dim=-1)
    v, w = torch.randn(1, length, heads, dv, generator=gen), -torch.rand(1, length, heads, dk, generator=gen)
    beta = torch.rand(1, length, heads, generator=gen)
    cu, h0 = torch.tensor([0, 8, 21]), torch.randn(2, heads, dk, dv, generator=gen)
    common = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu)
    zero = torch.zeros_like(k)
    o, ht = rwkv7.chunk_rwkv7(r, w, k, v, zero, zero, scale=0.5, **common)
    o_ref, ht_ref = attention.chunk_gla(r, k, v, w, scale=0.5, chunk_size=8, **common)
    torch.testing.assert_close(o, o_ref, **TOL64)
    torch.testing.assert_close(ht, ht_ref, **TOL64)
    bk = beta[..., None] * k
    o, ht = rwkv7.chunk_rwkv7(r, torch.zeros_like(w), bk, v, -k, bk, scale=0.5, **common)
    o_ref, ht_ref = attention.chunk_delta_rule(r, k, v, beta, scale=0.5, chunk_size=8, **common)
    torch.testing.assert_close(o, o_ref, **TOL64)
    torch.testing.assert_close(ht, ht_ref, **TOL64)


def test_mesa_reference_solves_what_the_conjugate_gradient_converges_to():
    """MesaNet reads the value state through x = (H_kk + diag(lambda))^-1 q. The reference solves exactly; FLA's
    chunked conjugate-gradient reference (the algorithm of its kernels), given enough steps, reaches the same
    outputs and states, from carried states too."""
    from fla.ops.mesa_net.naive import naive_mesa_net_CG

    from flame_gin.kernels import mesa

    gen = torch.Generator().manual_seed(14)
    heads, d, length = 2, 8, 32
    q, k = (F.normalize(torch.randn(1, length, heads, d, generator=gen), dim=-1) for _ in range(2))
    v, g = torch.randn(1, length, heads, d, generator=gen), -torch.rand(1, length, heads, generator=gen) * 0.2
    beta, lamb = torch.rand(1, length, heads, generator=gen), 0.5 + torch.rand(heads, d, generator=gen)
    h_kk0 = torch.eye(d).expand(1, heads, d, d) * 0.3
    h_kv0 = torch.randn(1, heads, d, d, generator=gen)
    o, h_kk, h_kv = mesa.chunk_mesa_net(
        q, k, v, g, beta, lamb, h_kk_init=h_kk0, h_kv_init=h_kv0, output_final_state=True
    )
    o_cg, h_kk_cg, h_kv_cg = naive_mesa_net_CG(
        q, k, v, g, lamb, beta, chunk_size=16, max_CG_iteration=200, h_kk_init=h_kk0, h_kv_init=h_kv0
    )
    # float32 CG with its 1e-5 guards stops about 2e-4 short of the exact solve on a few entries
    torch.testing.assert_close(o, o_cg, atol=5e-4, rtol=1e-2)
    torch.testing.assert_close((h_kk, h_kv), (h_kk_cg, h_kv_cg), atol=1e-5, rtol=1e-4)


def test_every_fla_reference_the_family_references_call_is_checked_up_front(monkeypatch):
    """The family references import FLA's own PyTorch references when first run; the table check covers each of
    them (read from the modules' imports, so the list cannot fall behind), and a missing one is named."""
    import pathlib
    import re

    from flame_gin.kernels import swap

    kernels_dir = pathlib.Path(swap.__file__).parent
    imported = set()
    for name in ("attention", "kda", "delta_variants", "hgrn", "lightnet", "rwkv6", "rwkv7", "mesa", "forgetting"):
        text = (kernels_dir / f"{name}.py").read_text() + (kernels_dir / "path.py").read_text()
        for module, names in re.findall(r"from (fla\.ops\.[\w.]+) import ([\w, ]+)", text):
            imported |= {(module, n.strip()) for n in names.split(",")}
    assert imported and imported <= set(swap.FLA_REFERENCES), imported - set(swap.FLA_REFERENCES)
    assert swap.check_table()
    monkeypatch.setattr(swap, "FLA_REFERENCES", (*swap.FLA_REFERENCES, ("fla.ops.kda.naive", "gone")))
    with pytest.raises(RuntimeError, match="fla.ops.kda.naive has no attribute 'gone'"):
        swap.check_table()
