"""Tensor-parallel plans for each family's layers: what a block's mixer, MLP and norms shard, and how.

Projections into heads are column-wise, projections out of heads row-wise, so the recurrent kernels see only
their rank's heads and run unchanged. Everything that FLA computes with fused Triton kernels on its own
weights (RMSNorm with residual, gated per-head norms, short convolutions, per-head decay parameters) runs on
plain local tensors through `tp_styles.LocalCompute`; output norms over every head through `tp_full_norms`.
A sequence-parallel plan on a per-head norm would be wrong: its activations are head-sharded, not
sequence-sharded. `FAMILIES` is the table `tp_plans.apply_tensor_parallel` reads.
"""

from __future__ import annotations

import logging

import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from flame_gin.parallel import tp_full_norms, tp_retention
from flame_gin.parallel.tp_styles import LocalCompute

log = logging.getLogger(__name__)


# ----- per-family plans ----------------------------------------------------------------------------------------


def _rowwise(*, sp: bool):
    return RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())


def _attn_entry(*, sp: bool, head_params: tuple[str, ...] = (), local_counts: tuple[str, ...] = ()) -> LocalCompute:
    return LocalCompute(shard_params=head_params, gather_sequence=sp, recurse=False, local_counts=local_counts)


def gated_mlp_plan(prefix: str, *, sp: bool, mlp: nn.Module) -> dict:
    if getattr(mlp, "fuse_swiglu", False):
        # the fused swiglu+down_proj kernel reads down_proj.weight directly, bypassing the row-wise plan
        log.info("tensor parallel: disabling fuse_swiglu on %s so down_proj runs row-wise", prefix)
        mlp.fuse_swiglu = False
    plan = {
        f"{prefix}.gate_proj": ColwiseParallel(),
        f"{prefix}.up_proj": ColwiseParallel(),
        f"{prefix}.down_proj": _rowwise(sp=sp),
    }
    if sp:
        plan[prefix] = LocalCompute(gather_sequence=True, recurse=False)
    return plan


def _head_norms(attn: nn.Module, prefix: str) -> dict:
    """Per-head norms and short convolutions. A norm over one head's channels has a replicated weight and sees
    head-sharded activations. A norm with one group per head over flat channels (FLA's `GroupNorm`, FoX's
    QK-norm) keeps its heads' channels of the weight and normalises its own heads, with its counts the rank's."""
    plan = {}
    for name in ("g_norm", "g_norm_swish_gate", "o_norm", "q_norm", "k_norm"):
        norm = getattr(attn, name, None)
        if isinstance(norm, nn.Module) and hasattr(norm, "num_groups"):
            channels = "hidden_size" if hasattr(norm, "hidden_size") else "num_channels"  # FLA's or torch's
            plan[f"{prefix}.{name}"] = LocalCompute(
                shard_params=("weight", "bias"), local_counts=("num_groups", channels)
            )
        elif isinstance(norm, nn.Module):
            plan[f"{prefix}.{name}"] = LocalCompute(partial_grads=True)
    for name in ("q_conv1d", "k_conv1d", "v_conv1d", "w_conv1d", "f_conv1d", "i_conv1d"):
        if isinstance(getattr(attn, name, None), nn.Module):
            plan[f"{prefix}.{name}"] = LocalCompute(shard_params=("weight", "bias"))
    return plan


def _gla_attn(attn, prefix, *, sp):
    if attn.num_kv_groups != 1:
        raise ValueError(f"tensor parallel: GLA with num_kv_heads != num_heads ({prefix}) has no plan")
    plan = {prefix: _attn_entry(sp=sp)}
    for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
        if hasattr(attn, name):
            plan[f"{prefix}.{name}"] = ColwiseParallel()
    plan.update(_low_rank(f"{prefix}.gk_proj"))
    plan[f"{prefix}.o_proj"] = _rowwise(sp=sp)
    plan.update(_head_norms(attn, prefix))
    return plan


def _low_rank(name: str, *, up: int = 1) -> dict:
    """A low-rank projection (Sequential: down, [activation,] up at index ``up``): the bottleneck is replicated
    (its input is the full hidden state), the up-projection is per head."""
    return {f"{name}.0": LocalCompute(), f"{name}.{up}": ColwiseParallel()}


def _require_one_value_head_per_head(attn, prefix, label):
    if getattr(attn, "num_v_heads", attn.num_heads) != attn.num_heads:
        raise ValueError(f"tensor parallel: {label} with num_v_heads != num_heads ({prefix}) has no plan")


def _per_head_projections(attn, prefix, *, sp, names, head_params=(), local_counts=()):
    """The delta-rule layers' plan: each present projection in ``names`` colwise, o_proj rowwise, head norms."""
    plan = {prefix: _attn_entry(sp=sp, head_params=head_params, local_counts=local_counts)}
    for name in names:
        if isinstance(getattr(attn, name, None), nn.Module):
            plan[f"{prefix}.{name}"] = ColwiseParallel()
    plan[f"{prefix}.o_proj"] = _rowwise(sp=sp)
    plan.update(_head_norms(attn, prefix))
    return plan


def _deltanet_attn(attn, prefix, *, sp):
    return _per_head_projections(attn, prefix, sp=sp, names=("q_proj", "k_proj", "v_proj", "g_proj", "b_proj"))


def _gated_delta_attn(attn, prefix, *, sp, label="Gated DeltaNet", head_params=("A_log", "dt_bias")):
    """Gated DeltaNet, and Comba (the same projections; its per-head inner decay and output-correction factor
    are head parameters too)."""
    _require_one_value_head_per_head(attn, prefix, label)
    # fused q/k/v convolution reads the three conv weights at once; keep the separate per-projection path
    if hasattr(attn, "_use_fused_qkv_conv"):
        attn._use_fused_qkv_conv = lambda **kwargs: False
    return _per_head_projections(
        attn,
        prefix,
        sp=sp,
        head_params=head_params,
        names=("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj"),
    )


def _comba_attn(attn, prefix, *, sp):
    return _gated_delta_attn(attn, prefix, sp=sp, label="Comba", head_params=("A_log", "dt_bias", "decay", "D"))


def _kda_attn(attn, prefix, *, sp):
    """KDA: like Gated DeltaNet, with per-channel decay (dt_bias, one per head and key channel, head-major) and
    two low-rank projections (the decay's f_proj, the output gate's g_proj)."""
    _require_one_value_head_per_head(attn, prefix, "KDA")
    plan = _per_head_projections(
        attn, prefix, sp=sp, head_params=("A_log", "dt_bias"), names=("q_proj", "k_proj", "v_proj", "b_proj")
    )
    plan.update(_low_rank(f"{prefix}.f_proj"))
    plan.update(_low_rank(f"{prefix}.g_proj"))
    return plan


def _forgetting_attn(attn, prefix, *, sp):
    """FoX: the forget-gate projection (one logit per head, with bias) and the output gate are per head like
    q/k/v; its QK-norm groups channels by head (`_head_norms`)."""
    return _per_head_projections(attn, prefix, sp=sp, names=("q_proj", "k_proj", "v_proj", "f_proj", "g_proj"))


def _path_attn(attn, prefix, *, sp):
    """PaTH: the Householder directions (w, low-rank or not, through their short convolution), their
    per-key-head strength (bt_proj) and the optional forget gate are per head like q/k/v. FLA 0.6's model never
    builds the layer's QK-norm; a layer that has one is refused rather than run with unsummed gradients."""
    if any(list(getattr(attn, name).parameters()) for name in ("maybe_q_norm", "maybe_k_norm")):
        raise ValueError(f"tensor parallel: PaTH with QK-norm ({prefix}) has no plan")
    low_rank = isinstance(attn.w_proj, nn.Sequential)
    names = ("q_proj", "k_proj", "v_proj", "bt_proj", "g_proj") + (() if low_rank else ("w_proj",))
    plan = _per_head_projections(attn, prefix, sp=sp, names=names)
    if low_rank:
        plan.update(_low_rank(f"{prefix}.w_proj"))
    return plan


def _mesa_attn(attn, prefix, *, sp):
    """MesaNet: per-head decay and input-strength projections (with bias) and per-channel regularisers
    (lambda_params, head-major), which the layer reshapes by its head count: that count becomes the rank's."""
    return _per_head_projections(
        attn,
        prefix,
        sp=sp,
        head_params=("lambda_params",),
        local_counts=("num_heads",),
        names=("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj"),
    )


def _rwkv7_attn(attn, prefix, *, sp):
    """RWKV-7: r/k/v per head, the decay, in-context rate, value-residual and gate LoRAs (down, activation, up)
    with per-head up-projections, and per-channel k_k, k_a and bonus r_k by head. Its six token-shift mixing
    vectors stay replicated: they act on the full hidden state before the column-wise projections, whose input
    gradient is already summed over the ranks. The first layer's values, which later layers mix in, stay each
    rank's heads."""
    plan = {prefix: _attn_entry(sp=sp, head_params=("k_k", "k_a", "r_k"))}
    for name in ("r_proj", "k_proj", "v_proj"):
        plan[f"{prefix}.{name}"] = ColwiseParallel()
    for name in ("w_lora", "a_lora", "g_lora", "v_lora"):
        if isinstance(getattr(attn, name, None), nn.Module):
            plan.update(_low_rank(f"{prefix}.{name}.lora", up=2))
    plan[f"{prefix}.o_proj"] = _rowwise(sp=sp)
    plan.update(_head_norms(attn, prefix))
    return plan


def _rwkv7_ffn_plan(prefix: str, *, sp: bool, mlp: nn.Module) -> dict:
    """RWKV-7's feed-forward: key column-wise, value row-wise; its token-shift mixing vector stays replicated
    (it acts before the key, as the attention's do)."""
    return {
        prefix: LocalCompute(gather_sequence=sp, recurse=False),
        f"{prefix}.key": ColwiseParallel(),
        f"{prefix}.value": _rowwise(sp=sp),
    }


def _rwkv6_attn(attn, prefix, *, sp):
    """RWKV-6: the data-dependent token-shift mixing (x_proj, x_bias, on the full hidden state) stays
    replicated; the r/k/v/g projections behind it and the decay LoRA's up-projection are per head, the bonus
    by head. The layer reads x_proj[2]'s weight in its own einsum, so x_proj's weights go local with the
    layer's own. Their gradients arrive summed through the column-wise projections' inputs."""
    plan = {
        prefix: LocalCompute(shard_params=("bonus",), gather_sequence=sp, recurse=False, include=("x_proj",)),
    }
    for name in ("r_proj", "k_proj", "v_proj", "g_proj"):
        plan[f"{prefix}.{name}.linear"] = ColwiseParallel()
    plan.update(_low_rank(f"{prefix}.w_proj.linear.lora", up=2))
    plan[f"{prefix}.o_proj"] = _rowwise(sp=sp)
    plan.update(_head_norms(attn, prefix))
    return plan


def _rwkv6_ffn_plan(prefix: str, *, sp: bool, mlp: nn.Module) -> dict:
    """RWKV-6's feed-forward: key column-wise, value row-wise, both behind a token shift; the output is gated
    by a full hidden-size receptance, replicated, so the value's output is summed in full and the gated
    product handed on as the rank's sequence shard."""
    return {
        prefix: LocalCompute(gather_sequence=sp, recurse=False, scatter_sequence=sp),
        f"{prefix}.key": LocalCompute(recurse=False),
        f"{prefix}.key.linear": ColwiseParallel(),
        f"{prefix}.value": RowwiseParallel(output_layouts=Replicate()),
        f"{prefix}.receptance": LocalCompute(),
    }


def _hgrn_family_attn(attn, prefix, *, sp, names: tuple[str, ...], floor: bool = True) -> dict:
    """HGRN, HGRN2, LightNet and GSA: their projections (and short convolutions) by head or channel, their output
    norm over the full width (`tp_full_norms`: the mean square summed over the ranks), o_proj row-wise. A
    layer's floor on the forget gate (HGRN, HGRN2) arrives whole and is sliced to the rank's channels."""
    entry = LocalCompute(gather_sequence=sp, recurse=False, shard_kwargs=("lower_bound",) if floor else ())
    plan = {prefix: entry}
    for name in names:
        plan[f"{prefix}.{name}"] = ColwiseParallel()
    plan.update(_head_norms(attn, prefix))  # the short convolutions
    plan[f"{prefix}.g_norm"] = LocalCompute(shard_params=("weight", "bias"))  # the rank's channels
    plan[f"{prefix}.o_proj"] = _rowwise(sp=sp)
    return plan


def _hgrn_attn(attn, prefix, *, sp):
    """HGRN: one channel-wise recurrence, so channels split freely; its gated norm is a module."""
    plan = _hgrn_family_attn(attn, prefix, sp=sp, names=("i_proj", "f_proj", "g_proj"))
    plan[f"{prefix}.g_norm"] = tp_full_norms.FullWidthGatedNorm()
    return plan


def _fused_norm_attn(attn, prefix, *, sp, **family) -> dict:
    """A layer whose norm and o_proj run as one fused call that reads o_proj's weight itself: the call is
    wrapped, and o_proj's weight carries the layout of its output."""
    tp_full_norms.install(module=type(attn).__module__)
    plan = _hgrn_family_attn(attn, prefix, sp=sp, **family)
    plan[f"{prefix}.o_proj"] = tp_full_norms.FusedOutputProjection(sequence_parallel=sp)
    return plan


def _hgrn2_attn(attn, prefix, *, sp):
    """HGRN2: query, forget and input projections by head; norm and o_proj in one fused call."""
    return _fused_norm_attn(attn, prefix, sp=sp, names=("q_proj", "f_proj", "i_proj"))


def _lightnet_attn(attn, prefix, *, sp):
    """LightNet: q/k/v by head, its low-rank gate's up-projection per channel; norm, gate and o_proj fused."""
    plan = _fused_norm_attn(attn, prefix, sp=sp, names=("q_proj", "k_proj", "v_proj"), floor=False)
    plan.update(_low_rank(f"{prefix}.g_proj"))
    return plan


def _gsa_attn(attn, prefix, *, sp):
    """GSA: q/k/v and the slot forget gate by (key/value) head; its output norm spans every head and is fused
    with o_proj, as HGRN2's. A learned feature map (T2R) is shared by all heads and has no plan."""
    if attn.feature_map is not None and list(attn.feature_map.parameters()):
        raise ValueError(f"tensor parallel: GSA with a learned feature map ({prefix}) has no plan")
    return _fused_norm_attn(attn, prefix, sp=sp, names=("q_proj", "k_proj", "v_proj", "f_proj"), floor=False)


def _retention_attn(attn, prefix, *, sp):
    """RetNet: q/k/v (grouped key/value heads kept) and the output gate by head, its per-head norm local; each
    head's fixed decay follows its global index (`tp_retention`)."""
    plan = _per_head_projections(attn, prefix, sp=sp, names=("q_proj", "k_proj", "v_proj", "g_proj"))
    plan[prefix] = tp_retention.GlobalHeadDecays(plan[prefix])
    return plan


def softmax_attention_plan(attn, prefix, *, sp):
    """FLA's softmax attention layer (a hybrid's attention layers, through SDPA or flash-attn): query heads and
    their key/value heads by rank (the grouping is kept when the mesh divides the key/value heads), its
    per-head QK-norm local; with sequence parallel it sees the whole sequence, so rotary positions are whole."""
    plan = {prefix: _attn_entry(sp=sp)}
    for name in ("q_proj", "k_proj", "v_proj"):
        plan[f"{prefix}.{name}"] = ColwiseParallel()
    plan[f"{prefix}.o_proj"] = _rowwise(sp=sp)
    plan.update(_head_norms(attn, prefix))
    return plan


def is_softmax_attention(module: nn.Module) -> bool:
    return type(module).__module__ == "fla.layers.attn" and type(module).__name__ == "Attention"


def _llama_attn(attn, prefix, *, sp):
    plan = {prefix: _attn_entry(sp=sp)}
    for name in ("q_proj", "k_proj", "v_proj"):
        plan[f"{prefix}.{name}"] = ColwiseParallel()
    plan[f"{prefix}.o_proj"] = _rowwise(sp=sp)
    return plan


# model_type -> (the block's mixer attribute, its mlp attribute, its norms (those present), mixer plan[, mlp plan])
_FLA_BLOCK = ("attn", "mlp", ("attn_norm", "mlp_norm"))  # most FLA families' blocks
_RWKV_BLOCK = ("attn", "ffn", ("pre_norm", "attn_norm", "ffn_norm"))
FAMILIES = {
    "gla": (*_FLA_BLOCK, _gla_attn),
    "delta_net": (*_FLA_BLOCK, _deltanet_attn),
    "gated_deltanet": (*_FLA_BLOCK, _gated_delta_attn),
    "kda": (*_FLA_BLOCK, _kda_attn),
    "comba": (*_FLA_BLOCK, _comba_attn),
    "forgetting_transformer": (*_FLA_BLOCK, _forgetting_attn),
    "path_attn": (*_FLA_BLOCK, _path_attn),
    "mesa_net": (*_FLA_BLOCK, _mesa_attn),
    "gsa": (*_FLA_BLOCK, _gsa_attn),
    "hgrn": (*_FLA_BLOCK, _hgrn_attn),
    "hgrn2": (*_FLA_BLOCK, _hgrn2_attn),
    "lightnet": (*_FLA_BLOCK, _lightnet_attn),
    "retnet": (*_FLA_BLOCK, _retention_attn),
    "rwkv6": (*_RWKV_BLOCK, _rwkv6_attn, _rwkv6_ffn_plan),
    "rwkv7": (*_RWKV_BLOCK, _rwkv7_attn, _rwkv7_ffn_plan),
    "llama": ("self_attn", "mlp", ("input_layernorm", "post_attention_layernorm"), _llama_attn),
}
