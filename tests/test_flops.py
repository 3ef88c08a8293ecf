"""FLOPs per token against counts measured by ``torch.utils.flop_counter.FlopCounterMode`` on real forwards.

- The Llama baseline runs on CPU as is: its whole forward (projections, attention, LM head) is compared, with
  HF's eager attention, since FlopCounterMode counts nothing for the CPU SDPA kernel.
- The Forgetting Transformer's CPU reference computes its attention over the full square, as counted: its whole
  forward is compared too.
- GLA, DeltaNet, Gated DeltaNet, RetNet, KDA, Comba, Gated DeltaProduct, HGRN, RWKV-7, FoX and PaTH run with the
  reference kernels. The reference ops may compute the mixer
  differently from FLA's chunked Triton kernels, so the check is split: everything outside the mixer op (all
  projections, short convolutions, MLPs, LM head), measured as the forward's count minus the count inside each
  mixer module but outside its sub-modules, is compared with the linear + conv part; the mixer formulas are checked
  separately against FlopCounterMode on small chunked implementations written here (chunked linear attention and
  the WY-form chunked delta rule), which are first checked against float64 recurrences.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flame_gin import flops, models

B, T = 2, 64


def _measure(model, x):
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(input_ids=x)
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def _inside_mixer_ops(counts: dict[str, float]) -> float:
    """FLOPs counted inside each layer's mixer module but not inside any of its sub-modules (the attention op).

    The sub-modules are the outermost counted ones below the mixer, so a ``ModuleList`` of projections (never
    called itself, its members are) is subtracted through its members."""
    total = 0.0
    mixers = [n for n in counts if n.rsplit(".", 1)[-1] in ("attn", "mixer", "self_attn")]
    for name in mixers:
        below = [n for n in counts if n.startswith(name + ".")]
        outermost = [n for n in below if not any(n.startswith(o + ".") for o in below)]
        total += counts[name] - sum(counts[c] for c in outermost)
    return total


def test_llama_whole_forward_matches_flop_counter():
    config = models.build_config(
        family="llama",
        overrides=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160, vocab_size=256
        ),
    )
    model = models.build_model(config=config, device="cpu", seed=0)
    # FlopCounterMode has no formula for the CPU SDPA kernel (it counts 0), so measure through HF's eager attention:
    # the same two matmuls (QK^T, PV) over the full square, as explicit ops.
    model.config._attn_implementation = "eager"
    measured = _measure(model, torch.randint(0, 256, (B, T)))["Global"]
    predicted = flops.forward_flops_per_token(config=config, seq_len=T) * B * T
    assert predicted == pytest.approx(measured, rel=0.10)
    parts = flops.flops_breakdown(config=config, seq_len=T)
    assert parts["softmax_attention"] == 2 * 4 * T * 64 and parts["linear_attention"] == 0


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("gla", dict(num_heads=2)),
        ("delta_net", dict(num_heads=2)),
        ("gated_deltanet", dict(num_heads=2, head_dim=16)),
        ("retnet", dict(num_heads=2)),
        ("kda", dict(num_heads=2, head_dim=16)),
        ("comba", dict(num_heads=2, head_dim=16)),
        ("gated_deltaproduct", dict(num_heads=2, head_dim=16)),
        ("hgrn", dict()),
        ("rwkv7", dict(head_dim=16)),
        ("forgetting_transformer", dict(num_heads=2)),
        ("path_attn", dict(num_heads=2)),
        # Not here: RWKV-6 and LightNet apply a projection's weight inside the mixer itself (an einsum with
        # x_proj[2].weight; the fused norm-gate-linear with o_proj.weight), which this split counts as mixer work.
    ],
)
def test_fla_matmul_part_matches_flop_counter(family, overrides):
    from flame_gin import kernels

    kernels.select(mode="reference")
    config = models.build_config(
        family=family, overrides=dict(hidden_size=64, num_hidden_layers=2, vocab_size=256, **overrides)
    )
    model = models.build_model(config=config, device="cpu", seed=0)
    counts = _measure(model, torch.randint(0, 256, (B, T)))
    measured_matmul = counts["Global"] - _inside_mixer_ops(counts)
    parts = flops.flops_breakdown(config=config, seq_len=T)
    assert (parts["linear"] + parts["conv"]) * B * T == pytest.approx(measured_matmul, rel=0.10)
    if family in ("forgetting_transformer", "path_attn"):
        assert parts["linear_attention"] == 0 and parts["softmax_attention"] > 0
    else:
        assert parts["softmax_attention"] == 0 and (parts["linear_attention"] > 0 or family == "hgrn")
    if family in ("delta_net", "gated_deltanet"):
        assert parts["conv"] > 0  # short convolutions are counted


def test_mom_routed_count_matches_flop_counter():
    """MoM routes each token through ``topk`` memories plus the shared one; FLA pads every memory's tokens to the
    busiest memory's count. Measured outside the delta-rule op = the formula's projections and convolutions for
    the routed tokens + the padding's projections, the padding read off the router's own choices."""
    from flame_gin import kernels

    kernels.select(mode="reference")
    config = models.build_config(
        family="mom",
        overrides=dict(hidden_size=64, num_hidden_layers=2, vocab_size=256, num_heads=2, head_dim=16),
    )
    model = models.build_model(config=config, device="cpu", seed=0)
    choices = []
    for layer in flops._layers(model):
        layer.attn.gate.register_forward_hook(lambda mod, args, out: choices.append(out.detach()))
    counts = _measure(model, torch.randint(0, 256, (B, T)))
    mixer = flops._layers(model)[0].attn
    assert mixer.topk < mixer.num_memories and mixer.shared_mem
    padding = 0
    for logits in choices:  # (B, T, memories) per layer
        chosen = logits.softmax(-1).topk(mixer.topk, dim=-1).indices
        per_memory = torch.stack([(chosen == e).sum((1, 2)) for e in range(mixer.num_memories)])  # (memories, B)
        padding += int(per_memory.numel() * per_memory.max() - per_memory.sum())
    key, value, hidden = mixer.key_dim, mixer.value_dim, mixer.hidden_size
    padded_token = 2 * hidden * (key + key + value + 2 * mixer.num_heads)  # q, k, v, beta, decay projections
    parts = flops.flops_breakdown(config=config, seq_len=T)
    measured_matmul = counts["Global"] - _inside_mixer_ops(counts)
    assert parts["linear"] * B * T + padding * padded_token == pytest.approx(measured_matmul, rel=1e-6)
    # The short convolutions run here as shifted element-wise sums, which FlopCounterMode does not count: checked
    # against the layers' shapes instead, once per memory pass.
    convs = [mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d]
    assert not any(n.endswith("conv1d") for n in counts)
    assert parts["conv"] == 2 * 3 * sum(2 * c.out_channels * c.kernel_size[0] for c in convs)
    # The delta-rule work counts once per memory a token passes through (topk routed + shared), not per memory.
    passes = mixer.topk + 1
    assert parts["linear_attention"] == pytest.approx(
        2 * passes * _delta_rule(mixer.num_heads, mixer.head_dim, mixer.head_v_dim, 64)
    )


def test_forgetting_transformer_whole_forward_matches_flop_counter():
    from flame_gin import kernels

    kernels.select(mode="reference")
    config = models.build_config(
        family="forgetting_transformer",
        overrides=dict(hidden_size=64, num_hidden_layers=2, vocab_size=256, num_heads=2),
    )
    model = models.build_model(config=config, device="cpu", seed=0)
    measured = _measure(model, torch.randint(0, 256, (B, T)))["Global"]
    assert flops.forward_flops_per_token(config=config, seq_len=T) * B * T == pytest.approx(measured, rel=0.02)


def _recurrent(q, k, v, beta=None):
    """float64 recurrence: S_t = S_{t-1} + k_t^T (v_t - k_t S_{t-1}) beta_t (delta) or + k_t^T v_t (linear)."""
    S = torch.zeros(q.shape[0], k.shape[-1], v.shape[-1], dtype=torch.float64)
    out = []
    for t in range(q.shape[1]):
        kt, vt = k[:, t], v[:, t]
        if beta is not None:
            vt = (vt - torch.einsum("hk,hkv->hv", kt, S)) * beta[:, t, None]
        S = S + torch.einsum("hk,hv->hkv", kt, vt)
        out.append(torch.einsum("hk,hkv->hv", q[:, t], S))
    return torch.stack(out, 1)


def _chunked_linear(q, k, v, c):
    H, n, dk = k.shape
    S = q.new_zeros(H, dk, v.shape[-1])
    mask = torch.ones(c, c, dtype=torch.bool).tril()
    out = []
    for i in range(0, n, c):
        qc, kc, vc = q[:, i : i + c], k[:, i : i + c], v[:, i : i + c]
        scores = torch.bmm(qc, kc.transpose(1, 2)).masked_fill(~mask, 0)
        out.append(torch.bmm(scores, vc) + torch.bmm(qc, S))
        S = S + torch.bmm(kc.transpose(1, 2), vc)
    return torch.cat(out, 1)


def _chunked_delta(q, k, v, beta, c):
    H, n, dk = k.shape
    S = q.new_zeros(H, dk, v.shape[-1])
    lower = torch.ones(c, c, dtype=torch.bool).tril(-1)
    eye = torch.eye(c, dtype=q.dtype)
    out = []
    for i in range(0, n, c):
        qc, kc, vc, bc = q[:, i : i + c], k[:, i : i + c], v[:, i : i + c], beta[:, i : i + c, None]
        kkt = torch.bmm(kc * bc, kc.transpose(1, 2)).masked_fill(~lower, 0)
        A = torch.linalg.solve_triangular(eye + kkt, eye.expand(H, c, c), upper=False)
        W, U = torch.bmm(A, kc * bc), torch.bmm(A, vc * bc)
        new_v = U - torch.bmm(W, S)
        scores = torch.bmm(qc, kc.transpose(1, 2)).masked_fill(~(lower | eye.bool()), 0)
        out.append(torch.bmm(qc, S) + torch.bmm(scores, new_v))
        S = S + torch.bmm(kc.transpose(1, 2), new_v)
    return torch.cat(out, 1)


@pytest.mark.parametrize("delta", [False, True])
def test_mixer_formula_matches_counted_chunked_implementation(delta):
    torch.manual_seed(0)
    H, n, dk, dv, c = 3, 128, 16, 32, 32
    q, k, v = (torch.randn(H, n, d, dtype=torch.float64) / math.sqrt(d) for d in (dk, dk, dv))
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(H, n, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        out = _chunked_delta(q, k, v, beta, c) if delta else _chunked_linear(q, k, v, c)
    torch.testing.assert_close(out, _recurrent(q, k, v, beta if delta else None))
    formula = flops.chunked_delta_rule_flops if delta else flops.chunked_linear_attention_flops
    # The triangular solve is not a counted op; the formula charges it 2c^2/3 per token (under 4% here).
    assert formula(heads=H, dk=dk, dv=dv, chunk=c) * n == pytest.approx(counter.get_total_flops(), rel=0.10)


def test_gla_340m_at_2048():
    config = models.build_config(
        family="gla", overrides=dict(hidden_size=1024, num_hidden_layers=24, num_heads=4, vocab_size=32000)
    )
    training = flops.flops_per_token(config=config, seq_len=2048)
    assert training == pytest.approx(2.10e9, rel=0.01)  # forward + backward, embedding lookup excluded
    model = models.build_meta_model(config=config)
    flame_rule = 6 * models.count_parameters(model) + 12 * 24 * 1024 * 2048  # counts the embedding and softmax
    assert flame_rule / training == pytest.approx(1.357, rel=0.01)


def test_unknown_family_is_a_clear_error():
    config = models.build_config(
        family="mesa_net", overrides=dict(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=64)
    )
    with pytest.raises(ValueError, match="No FLOP count for model family 'mesa_net'.*gla"):
        flops.flops_per_token(config=config, seq_len=16)
    with pytest.raises(ValueError, match="seq_len"):
        flops.flops_per_token(
            config=models.build_config(
                family="gla", overrides=dict(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=64)
            ),
            seq_len=0,
        )


def _delta_rule(h, dk, dv, c):
    return h * (6 * c * dk + 4 * c * dv + 2 * c * c / 3 + 6 * dk * dv)


def _linear_attention(h, dk, dv, c):
    return h * (2 * c * (dk + dv) + 4 * dk * dv)


# family, overrides, (kind, the mixer's forward FLOPs per token and layer at T=128 from the config's own numbers)
NEW_FAMILIES = [
    ("kda", dict(num_heads=2, head_dim=16), ("linear_attention", _delta_rule(2, 16, 16, 64))),
    ("comba", dict(num_heads=2, head_dim=16), ("linear_attention", _delta_rule(2, 16, 32, 64))),  # expand_v 2
    (
        "gated_deltaproduct",
        dict(num_heads=2, head_dim=16, num_householder=2),
        ("linear_attention", 2 * _delta_rule(2, 16, 32, 64)),
    ),
    ("rwkv6", dict(num_heads=2), ("linear_attention", _linear_attention(2, 16, 32, 64))),  # expand_k 0.5
    ("lightnet", dict(num_heads=2), ("linear_attention", _linear_attention(2, 128, 32, 64))),
    ("hgrn", dict(), ("linear_attention", 0.0)),
    ("forgetting_transformer", dict(num_heads=2), ("softmax_attention", 4 * T * 2 * 32)),
    ("path_attn", dict(num_heads=2), ("softmax_attention", 4 * T * 2 * 32)),
    # log-linear Mamba2 within one chunk: intra-chunk work and the state update, no level to read out
    (
        "log_linear_mamba2",
        dict(num_heads=2, head_dim=64, state_size=16, expand=2),
        ("linear_attention", 2 * (2 * 64 * (16 + 64) + 2 * 16 * 64)),
    ),
    # Mamba-3 SISO: hidden 64 expanded 2x into 8 heads of 16, state 16, chunk 64
    (
        "mamba3",
        dict(head_dim=16, state_size=16, expand=2, chunk_size=64),
        ("linear_attention", _linear_attention(8, 16, 16, 64)),
    ),
]


@pytest.mark.parametrize("seq_len,levels", [(64, 0), (65, 1), (128, 1), (2048, 5), (65536, 10)])
def test_log_linear_read_outs_grow_with_the_levels(seq_len, levels):
    """One state read-out (2 dk dv per head) for each Fenwick level past the first chunk, ceil(log2(T/64)) of them;
    at one level the count is Mamba2's chunked linear attention."""
    config = models.build_config(
        family="log_linear_mamba2",
        overrides=dict(hidden_size=64, num_hidden_layers=1, vocab_size=256, num_heads=2, head_dim=64, state_size=16),
    )
    parts = flops.flops_breakdown(config=config, seq_len=seq_len)
    assert parts["linear_attention"] == 2 * (2 * 64 * (16 + 64) + 2 * 16 * 64 * (1 + levels))
    if levels == 1:
        assert parts["linear_attention"] == _linear_attention(2, 16, 64, 64)


@pytest.mark.parametrize("family,overrides,expected", NEW_FAMILIES, ids=[f for f, _, _ in NEW_FAMILIES])
def test_gpu_only_families_are_counted_from_their_config(family, overrides, expected):
    """FLA's newer families run only on a GPU, so ``FlopCounterMode`` cannot run them here: their count is
    checked against the formula applied by hand to the config's numbers (heads, head sizes, expansions), and
    the projections against the parameter count of the model's linear layers (2 FLOPs per weight)."""
    config = models.build_config(
        family=family, overrides=dict(hidden_size=64, num_hidden_layers=2, vocab_size=256, **overrides)
    )
    parts = flops.flops_breakdown(config=config, seq_len=T)
    kind, per_layer = expected
    other = "softmax_attention" if kind == "linear_attention" else "linear_attention"
    assert parts[kind] == pytest.approx(2 * per_layer) and parts[other] == 0
    model = models.build_meta_model(config=config)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert parts["linear"] == 2 * weights


def test_mamba3_mimo_has_no_count_and_logs_no_mfu():
    """Mamba-3's MIMO variant mixes ranks in its kernel, which the SISO formula does not describe: no count, so a
    run logs no MFU rather than a wrong one."""
    config = models.build_config(
        family="mamba3",
        overrides=dict(hidden_size=64, num_hidden_layers=1, vocab_size=256, head_dim=16, state_size=16, is_mimo=True),
    )
    with pytest.raises(NotImplementedError, match="MIMO"):
        flops.flops_per_token(config=config, seq_len=T)
    assert flops.training_flops_or_none(config=config, seq_len=T) is None
