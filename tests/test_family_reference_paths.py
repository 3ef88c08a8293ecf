"""The CPU reference paths compute what FLA computes: the families that claim varlen keep packed documents
apart (each document's logits as when it runs alone), and a chunked op replaced by flame_gin's reference gives
the logits of FLA's own naive version of that op.
"""

from __future__ import annotations

import pytest
import torch

from flame_gin import families, kernels, models
from flame_gin import loss as loss_lib

VARLEN_CONFIGS = {
    "gla_hybrid": dict(family="gla", overrides=dict(num_heads=2), attn=dict(layers=[1], num_heads=2, num_kv_heads=1)),
    "gated_deltanet_hybrid": dict(
        family="gated_deltanet",
        overrides=dict(num_heads=2, head_dim=16),
        attn=dict(layers=[0], num_heads=2, num_kv_heads=2, window_size=5),
    ),
    "transformer": dict(family="transformer", overrides=dict(num_heads=2, num_kv_heads=1)),
    "hgrn2": dict(family="hgrn2", overrides=dict(num_heads=2, expand_ratio=16)),
    "retnet": dict(family="retnet", overrides=dict(num_heads=2)),
    "gsa": dict(family="gsa", overrides=dict(num_heads=2, num_slots=8)),
    "kda": dict(family="kda", overrides=dict(num_heads=2, head_dim=16)),
    "comba": dict(family="comba", overrides=dict(num_heads=2, head_dim=16)),
    "gated_deltaproduct": dict(family="gated_deltaproduct", overrides=dict(num_heads=2, head_dim=16)),
    "hgrn": dict(family="hgrn", overrides=dict(attn_mode="fused_recurrent")),
    "lightnet": dict(family="lightnet", overrides=dict(expand_ratio=16)),
    "rwkv6": dict(family="rwkv6", overrides=dict(num_heads=2)),
    "forgetting_transformer": dict(family="forgetting_transformer", overrides=dict(num_heads=2, num_kv_heads=1)),
    "path_attn": dict(family="path_attn", overrides=dict(num_heads=2, num_kv_heads=1, use_forget_gate=True)),
    "rwkv7": dict(family="rwkv7", overrides=dict(head_dim=16)),
    "mesa_net": dict(family="mesa_net", overrides=dict(num_heads=2, head_dim=16)),
}


@pytest.mark.parametrize("name", sorted(VARLEN_CONFIGS))
def test_varlen_families_keep_packed_documents_apart(name):
    """Three documents packed in one row give each document's logits exactly as when it runs alone."""
    spec = VARLEN_CONFIGS[name]
    kernels.select(mode="reference")
    try:
        config = models.build_config(
            family=spec["family"],
            attn=spec.get("attn"),
            overrides={"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64, **spec["overrides"]},
        )
        assert families.supports_varlen(config)
        model = models.build_model(config=config, device="cpu", seed=0).eval()
        body = families.body(model)
        lengths = [5, 9, 3]
        ids = torch.randint(0, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
        cu = torch.tensor([0, 5, 14, 17])
        with torch.no_grad():
            packed = body(
                **loss_lib.backbone_kwargs({"input_ids": ids, "cu_seqlens": cu}), use_cache=False
            ).last_hidden_state
            for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
                alone = body(input_ids=ids[:, start:end], use_cache=False).last_hidden_state
                torch.testing.assert_close(packed[:, start:end], alone, rtol=1e-4, atol=1e-5)
    finally:
        kernels.restore()


def _naive_gla(q, k, v, g, initial_state=None, output_final_state=False, **unused):
    from fla.ops.gla.naive import naive_recurrent_gla

    return naive_recurrent_gla(q, k, v, g, initial_state, output_final_state)


def _naive_retention(q, k, v, initial_state=None, output_final_state=False, **unused):
    from fla.ops.retention.naive import naive_retention

    assert initial_state is None and not output_final_state
    return naive_retention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2), None


# family -> (tiny overrides, the layer module and the chunked op the CPU path replaces, FLA's naive version)
NAIVE = {
    "hgrn2": (dict(num_heads=2, expand_ratio=16), "fla.layers.hgrn2", "chunk_gla", _naive_gla),
    "retnet": (dict(num_heads=2), "fla.layers.multiscale_retention", "chunk_retention", _naive_retention),
}


@pytest.mark.parametrize("family", sorted(NAIVE))
def test_cpu_path_equals_flas_own_naive_recurrence(family):
    """The layer's chunked op, which the CPU path replaces by flame_gin's reference, replaced instead by FLA's own
    naive version (token by token for HGRN2's GLA; the quadratic form for RetNet): the same logits."""
    import importlib

    overrides, module_name, op, naive = NAIVE[family]
    module = importlib.import_module(module_name)
    kernels.select(mode="reference")
    try:
        config = models.build_config(
            family=family, overrides=dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, **overrides)
        )
        model = models.build_model(config=config, device="cpu", seed=0).eval()
        # longer than 64 tokens: in eval mode the layers take their recurrent op for shorter inputs
        ids = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(0))
        calls = []

        def counted(*args, **kwargs):
            calls.append(1)
            return naive(*args, **kwargs)

        with torch.no_grad():
            ours = model(input_ids=ids, use_cache=False).logits
            swapped = getattr(module, op)
            setattr(module, op, counted)
            try:
                theirs = model(input_ids=ids, use_cache=False).logits
            finally:
                setattr(module, op, swapped)
    finally:
        kernels.restore()
    assert len(calls) == 2 and ours.abs().max() > 0.1  # once per layer
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
