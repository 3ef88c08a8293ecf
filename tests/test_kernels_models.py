"""Kernel selection and tiny FLA models (GLA, DeltaNet, Gated DeltaNet) on the CPU reference ops."""

import fla
import pytest
import torch
import torch.nn.functional as F
from fla.models import DeltaNetConfig, GatedDeltaNetConfig, GLAConfig
from transformers import AutoModelForCausalLM

from flame_gin import kernels
from flame_gin.kernels import swap

VOCAB = 256
BASE = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=VOCAB)
CONFIGS = {
    "gla": lambda: GLAConfig(**BASE),
    "gla_conv_unfused": lambda: GLAConfig(
        **BASE, use_short_conv=True, fuse_norm=False, fuse_swiglu=False, num_kv_heads=1
    ),
    "delta_net": lambda: DeltaNetConfig(**BASE),
    "delta_net_elu_sum": lambda: DeltaNetConfig(**BASE, qk_activation="elu", qk_norm="sum", use_gate=True),
    "gated_deltanet": lambda: GatedDeltaNetConfig(**BASE, head_dim=16),
    "gated_deltanet_gva": lambda: GatedDeltaNetConfig(**BASE, head_dim=16, num_v_heads=4, allow_neg_eigval=True),
}


@pytest.fixture(autouse=True)
def _reference_mode():
    assert kernels.select(mode="reference") == "reference"
    yield
    kernels.restore()


def _model(name, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[name]())


def _loss_and_grads(model, ids, seq_len=None):
    logits = model(input_ids=ids).logits
    labels = torch.roll(ids, -1, dims=1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, :-1].reshape(-1))
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_auto_picks_reference_without_cuda_and_triton_restores(monkeypatch):
    kernels.restore()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernels.select() == "reference"
    assert kernels.installed()
    import fla.layers.gla as gla_layer

    from flame_gin.kernels import attention

    assert gla_layer.chunk_gla is attention.chunk_gla
    assert kernels.select(mode="triton") == "triton"
    assert not kernels.installed()
    assert gla_layer.chunk_gla is fla.ops.gla.chunk_gla
    with pytest.raises(ValueError, match="kernel mode"):
        kernels.select(mode="cpu")


def test_every_swapped_name_exists_and_install_is_idempotent():
    labels = kernels.check_table()
    assert len(labels) == len(set(labels)) == len(kernels.TABLE)
    kernels.select(mode="reference")  # second install: no-op, originals kept
    for entry in kernels.TABLE:
        assert swap._current(entry) is entry.replacement, entry.label
    kernels.restore()
    for entry in kernels.TABLE:
        assert swap._current(entry) is not entry.replacement, entry.label


def test_missing_name_or_bad_version_fails_loudly_and_changes_nothing(monkeypatch):
    kernels.restore()
    ghost = swap.Swap("fla.layers.gla", "chunk_gla_v2", None)
    monkeypatch.setattr(swap, "TABLE", swap.TABLE + (ghost,))
    with pytest.raises(RuntimeError, match=r"fla\.layers\.gla has no attribute 'chunk_gla_v2'"):
        kernels.select(mode="reference")
    assert not kernels.installed()
    import fla.layers.gla as gla_layer

    assert gla_layer.chunk_gla is fla.ops.gla.chunk_gla
    monkeypatch.setattr(swap, "TABLE", swap.TABLE[:-1])
    monkeypatch.setattr(fla, "__version__", "0.7.1")
    with pytest.raises(RuntimeError, match="0.7.1"):
        kernels.select(mode="reference")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_backward_runs_and_is_deterministic(name):
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    loss1, grads1 = _loss_and_grads(_model(name), ids)
    loss2, grads2 = _loss_and_grads(_model(name), ids)
    assert torch.isfinite(loss1) and abs(loss1.item() - torch.log(torch.tensor(VOCAB)).item()) < 1.0
    assert loss1.item() == loss2.item()
    assert grads1.keys() == grads2.keys() and len(grads1) > 10
    for n in grads1:
        assert torch.equal(grads1[n], grads2[n]), n
    assert all(torch.isfinite(g).all() for g in grads1.values())


@pytest.mark.parametrize("name", ["gla", "delta_net", "gated_deltanet"])
def test_long_sequence_chunk_path_and_fused_loss(name):
    """T > 64 takes the layers' chunk path; `labels=` uses FLA's (swapped) fused cross-entropy."""
    model = _model(name)
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    logits = out.logits.float()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    model.config.fuse_linear_cross_entropy = True
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gla_conv_unfused", "delta_net", "gated_deltanet"])
def test_packed_documents_equal_separate_documents(name):
    model = _model(name).eval()
    docs = [torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (9, 20, 13)]
    packed = torch.cat(docs, dim=1)
    cu_seqlens = torch.tensor([0, 9, 29, 42], dtype=torch.int32)
    with torch.no_grad():
        logits = model(input_ids=packed, cu_seqlens=cu_seqlens, use_cache=False).logits
        separate = torch.cat([model(input_ids=d, use_cache=False).logits for d in docs], dim=1)
    torch.testing.assert_close(logits, separate, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gla_conv_unfused", "delta_net", "gated_deltanet"])
def test_cached_continuation_equals_full_forward(name):
    """Eval with a cache: conv and recurrent states carried across calls give the full-sequence logits."""
    model = _model(name).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        first = model(input_ids=ids[:, :16], use_cache=True)
        rest = model(input_ids=ids[:, 16:], past_key_values=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, atol=1e-5, rtol=1e-5)
