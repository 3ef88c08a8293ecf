"""Compile-opaque attention ops: FLA's chunked GLA/DeltaNet ops as custom ops, one graph for every block.

FLA 0.6 wraps `chunk_gla`/`chunk_delta_rule` in `torch.compiler.disable` (a graph break in every block); the
custom ops must keep one graph for any depth under `fullgraph=True`, pass torch's op checks, and give the
reference model's logits and gradients.
"""

from __future__ import annotations

import dist_models
import pytest
import torch
from graph_count import GraphCounter

import flame_gin.kernels
from flame_gin.kernels import attention, opaque
from flame_gin.parallel.compile import apply_compile


def _count_graphs(model, *, ids, fullgraph: bool):
    torch._dynamo.reset()
    counter = GraphCounter()
    apply_compile(model.model.layers, backend=counter, fullgraph=fullgraph)
    out = model(input_ids=ids).logits
    out.float().square().mean().backward()
    return counter.count, out


@pytest.fixture(autouse=True)
def _reset():
    yield
    torch._dynamo.reset()
    flame_gin.kernels.select(mode="reference")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gla", "delta_net"])
def test_compiled_mode_one_graph_for_all_blocks_and_reference_values(family):
    ids = torch.randint(0, dist_models.VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = dist_models.build(family, layers=3)
    ref_logits = reference(input_ids=ids).logits
    ref_logits.float().square().mean().backward()

    counts = []
    for layers in (1, 3):
        model = dist_models.build(family, layers=layers, kernel_mode="compiled")
        counts.append(_count_graphs(model, ids=ids, fullgraph=True))
    assert counts[0][0] == counts[1][0] == 1, [c for c, _ in counts]
    torch.testing.assert_close(counts[1][1], ref_logits, rtol=1e-5, atol=1e-5)
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def _gla_inputs(*, batch, length, heads=2, dk=8, dv=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, length, heads, dk, generator=g) for _ in range(2))
    v = torch.randn(batch, length, heads, dv, generator=g)
    gate = torch.nn.functional.logsigmoid(torch.randn(batch, length, heads, dk, generator=g))
    return q, k, v, gate


def test_custom_ops_pass_opcheck():
    q, k, v, g = (x.requires_grad_() for x in _gla_inputs(batch=2, length=40))
    torch.library.opcheck(opaque.gla_fwd, (q, k, v, g, 0.5, True, None))
    beta = torch.rand(2, 40, 2, requires_grad=True)
    torch.library.opcheck(opaque.delta_fwd, (q, k, v, beta, 0.5, None))


@pytest.mark.parametrize("varlen", [False, True])
def test_gla_op_gradients_match_reference_autograd(varlen):
    inputs = _gla_inputs(batch=1 if varlen else 2, length=48)
    cu = torch.tensor([0, 5, 30, 48]) if varlen else None
    a = [x.clone().double().requires_grad_() for x in inputs]
    b = [x.clone().double().requires_grad_() for x in inputs]
    out, state = opaque.chunk_gla(*a, cu_seqlens=cu)
    ref, _ = attention.chunk_gla(*b, cu_seqlens=cu)
    assert state is None
    weights = torch.randn_like(ref)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_states_fall_back_to_the_unwrapped_op():
    q, k, v, g = _gla_inputs(batch=1, length=8)
    h0 = torch.randn(1, 2, 16, 8)
    out, state = opaque.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, state_v_first=True)
    ref, ref_state = attention.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, state_v_first=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(state, ref_state)


def test_varlen_batches_with_different_document_counts_share_one_graph():
    from flame_gin import loss as loss_lib

    torch._dynamo.reset()
    counter = GraphCounter()
    ids = torch.randint(0, dist_models.VOCAB, (1, 160), generator=torch.Generator().manual_seed(0))
    batches = [
        {"input_ids": ids, "cu_seqlens": torch.tensor(cuts, dtype=torch.int32)}  # > 64 tokens: chunked
        for cuts in ([0, 70, 160], [0, 5, 90, 160], [0, 7, 9, 100, 140, 160])
    ]
    reference = dist_models.build("gla", layers=2)  # kernel selection is process-wide: reference first
    want = [reference.model(**loss_lib.backbone_kwargs(b), use_cache=False).last_hidden_state for b in batches]
    model = dist_models.build("gla", layers=2, kernel_mode="compiled")
    apply_compile(model.model.layers, backend=counter, fullgraph=True)
    for batch, expected in zip(batches, want):
        out = model.model(**loss_lib.backbone_kwargs(batch), use_cache=False).last_hidden_state
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert counter.count == 1, counter.count


def test_on_a_gpu_compiled_mode_replaces_no_attention_op_by_a_reference():
    """On a GPU the compiled table swaps only norms, activations, convolutions and cache helpers (for inductor)
    and the two custom ops; every other attention op stays FLA's kernel. On a CPU every reference is there."""
    from flame_gin.kernels import swap

    references = {id(getattr(attention, name)) for name in dir(attention) if not name.startswith("_")}
    # every family's own reference module: a Python loop over documents must never reach a GPU's compiled blocks
    family_modules = ("gated_delta", "kda", "delta_variants", "hgrn", "lightnet", "rwkv6", "rwkv7")
    family_modules += ("forgetting", "path", "mesa")
    for name in family_modules:
        references |= {id(f) for f in vars(getattr(swap, name)).values() if callable(f)}
    on_gpu = swap.compiled_table(on_gpu=True)
    opaque_ops = {id(opaque.chunk_gla), id(opaque.chunk_delta_rule)}
    assert not [s.label for s in on_gpu if id(s.replacement) in references and id(s.replacement) not in opaque_ops]
    assert sum(id(s.replacement) in opaque_ops for s in on_gpu) == 2
    on_cpu = {(s.module, s.name) for s in swap.compiled_table(on_gpu=False)}
    assert {("fla.layers.hgrn2", "chunk_gla"), ("fla.layers.multiscale_retention", "chunk_retention")} <= on_cpu
    assert ("fla.layers.mom", "chunk_gated_delta_rule") in on_cpu
    assert ("fla.models.rwkv7.modeling_rwkv7", "token_shift") in on_cpu
