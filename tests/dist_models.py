"""Tiny models and batches shared by the distributed tests (deterministic, CPU, fp32)."""

from __future__ import annotations

import torch

VOCAB = 128


def build(
    family: str,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    seed: int = 0,
    kernel_mode: str = "reference",
    **extra,
):
    """A tiny causal LM of `family` with weights drawn from `seed` (reference kernels on CPU for FLA;
    `kernel_mode="compiled"` for the custom-op attention that compiled blocks use)."""
    torch.manual_seed(seed)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            vocab_size=VOCAB,
            max_position_embeddings=256,
            attn_implementation="sdpa",
            tie_word_embeddings=False,
            **extra,
        )
        model = LlamaForCausalLM(cfg)
    else:
        import flame_gin.kernels

        flame_gin.kernels.select(mode=kernel_mode)
        from fla.models import (
            CombaConfig,
            CombaForCausalLM,
            DeltaNetConfig,
            DeltaNetForCausalLM,
            ForgettingTransformerConfig,
            ForgettingTransformerForCausalLM,
            GatedDeltaNetConfig,
            GatedDeltaNetForCausalLM,
            GLAConfig,
            GLAForCausalLM,
            GSAConfig,
            GSAForCausalLM,
            HGRN2Config,
            HGRN2ForCausalLM,
            HGRNConfig,
            HGRNForCausalLM,
            KDAConfig,
            KDAForCausalLM,
            LightNetConfig,
            LightNetForCausalLM,
            MesaNetConfig,
            MesaNetForCausalLM,
            PaTHAttentionConfig,
            PaTHAttentionForCausalLM,
            RetNetConfig,
            RetNetForCausalLM,
            RWKV6Config,
            RWKV6ForCausalLM,
            RWKV7Config,
            RWKV7ForCausalLM,
        )

        classes = {
            "gla": (GLAConfig, GLAForCausalLM),
            "delta_net": (DeltaNetConfig, DeltaNetForCausalLM),
            "gated_deltanet": (GatedDeltaNetConfig, GatedDeltaNetForCausalLM),
            "kda": (KDAConfig, KDAForCausalLM),
            "comba": (CombaConfig, CombaForCausalLM),
            "hgrn2": (HGRN2Config, HGRN2ForCausalLM),
            "gsa": (GSAConfig, GSAForCausalLM),
            "hgrn": (HGRNConfig, HGRNForCausalLM),
            "lightnet": (LightNetConfig, LightNetForCausalLM),
            "forgetting_transformer": (ForgettingTransformerConfig, ForgettingTransformerForCausalLM),
            "path_attn": (PaTHAttentionConfig, PaTHAttentionForCausalLM),
            "mesa_net": (MesaNetConfig, MesaNetForCausalLM),
            "retnet": (RetNetConfig, RetNetForCausalLM),
            "rwkv6": (RWKV6Config, RWKV6ForCausalLM),
            "rwkv7": (RWKV7Config, RWKV7ForCausalLM),
        }
        cfg_cls, model_cls = classes[family]
        kwargs = dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_heads=heads,
            vocab_size=VOCAB,
            tie_word_embeddings=False,
            fuse_cross_entropy=False,
            fuse_linear_cross_entropy=False,
        )
        if family in ("gated_deltanet", "kda", "comba", "mesa_net", "rwkv7"):
            kwargs["head_dim"] = hidden // heads
        if family in ("hgrn2", "lightnet"):
            kwargs["expand_ratio"] = hidden // heads
        if family == "forgetting_transformer":  # the family file's layer: output gate and per-head QK-norm
            kwargs.update(use_output_gate=True, qk_norm=True, num_kv_heads=heads // 2)
        if family == "rwkv7":  # low ranks below the width, so the LoRAs' bottlenecks are real
            kwargs.update(decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
        if family == "rwkv6":
            kwargs.update(proj_low_rank_dim=4, gate_low_rank_dim=8)
        kwargs.update(extra)
        model = model_cls(cfg_cls(**kwargs))
    with torch.no_grad():  # non-trivial norm weights, so their gradients are tested too
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.float()


def batch(*, rows: int, seq: int, seed: int = 1, ignore_frac: float = 0.15):
    """input_ids and shifted labels with some ignored (-100) positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=g) < ignore_frac] = -100
    return ids[:, :-1].contiguous(), labels
