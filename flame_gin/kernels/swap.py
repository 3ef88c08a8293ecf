"""The table of FLA 0.6 Triton ops that the CPU reference mode replaces, and its install/restore.

FLA's layers bind their ops by name at import time (`from fla.ops.gla import chunk_gla`), so the
replacement has to be written into each module that calls the op, not into the module that defines
it. The table below is the single list of those (module, name) pairs; `install` checks the FLA
version and that every name still exists before changing anything, so an FLA upgrade that renames
or moves an op fails loudly instead of silently running a Triton kernel on the CPU.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from flame_gin.kernels import (
    activation,
    attention,
    conv,
    delta_variants,
    forgetting,
    gated_delta,
    hgrn,
    kda,
    lightnet,
    loss,
    mesa,
    norm,
    opaque,
    path,
    rotary,
    rwkv6,
    rwkv7,
)

SUPPORTED_FLA = ((0, 6, 0), (0, 7, 0))  # [low, high)


@dataclasses.dataclass(frozen=True)
class Swap:
    """Replace `module.name` (or `module.name[key]` for a dict such as ACT2FN) by `replacement`."""

    module: str
    name: str
    replacement: Any
    key: str | None = None

    @property
    def label(self) -> str:
        return f"{self.module}.{self.name}" + (f"[{self.key!r}]" if self.key is not None else "")


def _table() -> tuple[Swap, ...]:
    act = "fla.modules.activations.ops"
    return (
        # attention ops, where the layers bound them
        Swap("fla.layers.gla", "chunk_gla", attention.chunk_gla),
        Swap("fla.layers.gla", "fused_chunk_gla", attention.chunk_gla),
        Swap("fla.layers.gla", "fused_recurrent_gla", attention.fused_recurrent_gla),
        Swap("fla.layers.delta_net", "chunk_delta_rule", attention.chunk_delta_rule),
        Swap("fla.layers.delta_net", "fused_recurrent_delta_rule", attention.fused_recurrent_delta_rule),
        Swap("fla.layers.gated_deltanet", "chunk_gated_delta_rule", gated_delta.chunk_gated_delta_rule),
        Swap(
            "fla.layers.gated_deltanet",
            "fused_recurrent_gated_delta_rule",
            gated_delta.fused_recurrent_gated_delta_rule,
        ),
        Swap("fla.layers.hgrn2", "chunk_gla", attention.chunk_gla),
        Swap("fla.layers.hgrn2", "fused_chunk_gla", attention.chunk_gla),
        Swap("fla.layers.hgrn2", "fused_recurrent_gla", attention.fused_recurrent_gla),
        Swap("fla.layers.hgrn2", "swish", activation.swish),
        Swap("fla.layers.hgrn2", "rms_norm_linear", norm.rms_norm_linear),
        Swap("fla.layers.multiscale_retention", "chunk_retention", attention.chunk_retention),
        Swap("fla.layers.multiscale_retention", "fused_chunk_retention", attention.chunk_retention),
        Swap("fla.layers.multiscale_retention", "fused_recurrent_retention", attention.chunk_retention),
        Swap("fla.layers.multiscale_retention", "parallel_retention", attention.chunk_retention),
        Swap("fla.layers.gsa", "chunk_gsa", attention.chunk_gsa),
        Swap("fla.layers.gsa", "fused_recurrent_gsa", attention.chunk_gsa),
        Swap("fla.layers.gsa", "rms_norm_linear", norm.rms_norm_linear),
        Swap("fla.modules.feature_map", "swish", activation.swish),
        Swap("fla.layers.kda", "chunk_kda", kda.chunk_kda),
        Swap("fla.layers.kda", "fused_recurrent_kda", kda.fused_recurrent_kda),
        Swap("fla.layers.comba", "chunk_comba", delta_variants.chunk_comba),
        Swap("fla.layers.comba", "fused_recurrent_comba", delta_variants.fused_recurrent_comba),
        Swap("fla.layers.gated_deltaproduct", "chunk_gated_delta_product", delta_variants.chunk_gated_delta_product),
        Swap(
            "fla.layers.gated_deltaproduct",
            "fused_recurrent_gated_delta_rule",
            gated_delta.fused_recurrent_gated_delta_rule,
        ),
        Swap("fla.layers.hgrn", "chunk_hgrn", hgrn.chunk_hgrn),
        Swap("fla.layers.hgrn", "fused_recurrent_hgrn", hgrn.fused_recurrent_hgrn),
        Swap("fla.layers.hgrn", "swiglu", activation.swiglu),
        Swap("fla.layers.lightnet", "chunk_lightnet", lightnet.chunk_lightnet),
        Swap("fla.layers.lightnet", "fused_recurrent_lightnet", lightnet.fused_recurrent_lightnet),
        Swap("fla.layers.lightnet", "rms_norm_swish_gate_linear", norm.rms_norm_swish_gate_linear),
        Swap("fla.layers.rwkv6", "chunk_rwkv6", rwkv6.chunk_rwkv6),
        Swap("fla.layers.rwkv6", "fused_recurrent_rwkv6", rwkv6.fused_recurrent_rwkv6),
        Swap("fla.layers.rwkv6", "token_shift", rwkv6.token_shift),
        Swap("fla.models.rwkv6.modeling_rwkv6", "token_shift", rwkv6.token_shift),
        Swap("fla.layers.forgetting_attn", "parallel_forgetting_attn", forgetting.parallel_forgetting_attn),
        Swap("fla.layers.forgetting_attn", "attn_decoding_one_step", forgetting.attn_decoding_one_step),
        Swap("fla.layers.path_attn", "parallel_path_attn", path.parallel_path_attn),
        Swap("fla.layers.path_attn", "l2_norm", norm.l2norm),
        Swap("fla.layers.rwkv7", "chunk_rwkv7", rwkv7.chunk_rwkv7),
        Swap("fla.layers.rwkv7", "fused_mul_recurrent_rwkv7", rwkv7.fused_mul_recurrent_rwkv7),
        Swap("fla.layers.rwkv7", "fused_addcmul_rwkv7", rwkv7.fused_addcmul_rwkv7),
        Swap("fla.layers.rwkv7", "fused_k_rwkv7", rwkv7.fused_k_rwkv7),
        Swap("fla.layers.rwkv7", "gate_output_correction", rwkv7.gate_output_correction),
        Swap("fla.layers.rwkv7", "l2_norm", norm.l2norm),
        Swap("fla.layers.rwkv7", "token_shift", rwkv6.token_shift),
        Swap("fla.models.rwkv7.modeling_rwkv7", "token_shift", rwkv6.token_shift),
        Swap("fla.layers.mesa_net", "chunk_mesa_net", mesa.chunk_mesa_net),
        Swap("fla.layers.mesa_net", "mesa_net_decoding_one_step", mesa.mesa_net_decoding_one_step),
        Swap("fla.layers.mesa_net", "l2_norm", norm.l2norm),
        Swap("fla.layers.mom", "chunk_gated_delta_rule", gated_delta.chunk_gated_delta_rule),
        Swap("fla.layers.mom", "fused_recurrent_gated_delta_rule", gated_delta.fused_recurrent_gated_delta_rule),
        # short convolution (ShortConvolution.forward/step, and Gated DeltaNet's fused q/k/v conv)
        Swap("fla.modules.causal_conv1d.ops", "causal_conv1d", conv.causal_conv1d),
        Swap("fla.modules.causal_conv1d.ops", "causal_conv1d_update", conv.causal_conv1d_update),
        Swap("fla.layers.gated_deltanet", "causal_conv1d", conv.causal_conv1d),
        # norms (RMSNorm, LayerNorm, GroupNorm, FusedRMSNormGated, FusedLayerNormGated, L2Norm)
        Swap("fla.modules.norm.layernorm", "layer_norm", norm.layer_norm),
        Swap("fla.modules.norm.layernorm", "rms_norm", norm.rms_norm),
        Swap("fla.modules.norm.layernorm", "group_norm", norm.group_norm),
        Swap("fla.modules.norm.fused_norm_gate", "rms_norm_gated", norm.rms_norm_gated),
        Swap("fla.modules.norm.fused_norm_gate", "layer_norm_gated", norm.layer_norm_gated),
        Swap("fla.modules.norm.l2norm", "l2norm", norm.l2norm),
        Swap("fla.modules.norm.layernorm_gated", "rmsnorm_fn", norm.gated_group_rms_norm),
        # rotary position embedding (FLA's softmax attention layer)
        Swap("fla.modules.rotary.ops", "rotary_embedding", rotary.rotary_embedding),
        # activations and the gated MLP
        Swap(act, "ACT2FN", activation.sigmoid, key="sigmoid"),
        Swap(act, "ACT2FN", activation.logsigmoid, key="logsigmoid"),
        Swap(act, "ACT2FN", activation.swish, key="silu"),
        Swap(act, "ACT2FN", activation.swish, key="swish"),
        Swap("fla.layers.delta_net", "elu_p1", activation.elu_p1),
        Swap("fla.modules.mlp", "swiglu", activation.swiglu),
        Swap("fla.modules.mlp", "swiglu_linear", activation.swiglu_linear),
        # losses built by FLA's causal-LM heads when labels are passed
        Swap("fla.models.modeling_utils", "FusedCrossEntropyLoss", loss.ReferenceCrossEntropyLoss),
        Swap("fla.models.modeling_utils", "FusedLinearCrossEntropyLoss", loss.ReferenceLinearCrossEntropyLoss),
    )


TABLE: tuple[Swap, ...] = _table()
_ATTENTION_MODULES = ("fla.layers.gla", "fla.layers.delta_net", "fla.layers.gated_deltanet")
# Modules whose ops have CPU references only (per-document Python loops): on a GPU compiled mode keeps FLA's kernels.
_CPU_ONLY_MODULES = (
    "fla.layers.hgrn2",
    "fla.layers.multiscale_retention",
    "fla.layers.mom",
    "fla.layers.gsa",
    "fla.layers.kda",
    "fla.layers.comba",
    "fla.layers.gated_deltaproduct",
    "fla.layers.hgrn",
    "fla.layers.lightnet",
    "fla.layers.rwkv6",
    "fla.layers.forgetting_attn",
    "fla.layers.path_attn",
    "fla.layers.rwkv7",
    "fla.layers.mesa_net",
    "fla.models.rwkv6.modeling_rwkv6",
    "fla.models.rwkv7.modeling_rwkv7",
)
_OPAQUE = {
    ("fla.layers.gla", "chunk_gla"): opaque.chunk_gla,
    ("fla.layers.delta_net", "chunk_delta_rule"): opaque.chunk_delta_rule,
}
# Layer modules whose every GPU op is a custom op with a meta kernel in compiled mode.
OPAQUE_MODULES = frozenset(module for module, _ in _OPAQUE)


def compiled_table(*, on_gpu: bool) -> tuple[Swap, ...]:
    """The swaps for compiled blocks: the chunked GLA/DeltaNet ops become custom ops (one graph node each),
    norms, activations and short convolutions become PyTorch ops that inductor fuses with their neighbours,
    and the layers' cache helpers stop reading `layer_idx` without a cache. On GPU the other attention ops
    and the losses stay FLA's; on CPU everything else is the reference table."""
    swaps = []
    for swap in TABLE:
        key = (swap.module, swap.name)
        if key in _OPAQUE:
            swaps.append(Swap(swap.module, swap.name, _OPAQUE[key]))
        elif not on_gpu or (swap.module not in _ATTENTION_MODULES + _CPU_ONLY_MODULES and "Loss" not in swap.name):
            swaps.append(swap)
    for module in _ATTENTION_MODULES:
        swaps.append(Swap(module, "get_layer_cache", opaque.get_layer_cache))
        swaps.append(Swap(module, "update_layer_cache", opaque.update_layer_cache))
    return tuple(swaps)


_originals: dict[Swap, Any] = {}


def check_fla_version() -> str:
    """Returns FLA's version; raises if it is outside the range this table was written against."""
    import fla
    from packaging.version import Version

    version = Version(fla.__version__)
    low, high = (Version(".".join(map(str, v))) for v in SUPPORTED_FLA)
    if not low <= version < high:
        raise RuntimeError(
            f"flame_gin's reference kernels support flash-linear-attention >={low},<{high}; "
            f"found {version}: re-check the swap table in {__name__} against the new FLA sources"
        )
    return str(version)


def _current(swap: Swap) -> Any:
    """The object now bound at `swap`'s place; raises naming the module and attribute if it is gone."""
    try:
        module = importlib.import_module(swap.module)
    except ImportError as err:
        raise RuntimeError(f"reference kernels: FLA module {swap.module} cannot be imported ({err})") from err
    if not hasattr(module, swap.name):
        raise RuntimeError(f"reference kernels: FLA module {swap.module} has no attribute {swap.name!r}")
    value = getattr(module, swap.name)
    if swap.key is None:
        return value
    if swap.key not in value:
        raise RuntimeError(f"reference kernels: {swap.module}.{swap.name} has no entry {swap.key!r}")
    return value[swap.key]


def _bind(swap: Swap, value: Any) -> None:
    module = importlib.import_module(swap.module)
    if swap.key is None:
        setattr(module, swap.name, value)
    else:
        getattr(module, swap.name)[swap.key] = value


# FLA's own PyTorch references that the family references call (imported when first run): checked with the table,
# so an FLA upgrade that moves one fails before a model is built, not at its first forward.
FLA_REFERENCES = (
    ("fla.ops.kda.naive", "naive_recurrent_kda"),
    ("fla.ops.kda.gate", "naive_kda_gate"),
    ("fla.ops.kda.gate", "naive_kda_lowerbound_gate"),
    ("fla.ops.comba.naive", "naive_recurrent_comba"),
    ("fla.ops.gated_delta_product.naive", "naive_recurrent_gated_delta_product"),
    ("fla.ops.hgrn.naive", "naive_recurrent_hgrn"),
    ("fla.ops.rwkv6.recurrent_naive", "naive_recurrent_rwkv6"),
    ("fla.ops.generalized_delta_rule.dplr.naive", "dplr_recurrence"),
    ("fla.ops.rwkv7.fused_addcmul", "torch_addcmul_rwkv7"),
    ("fla.ops.rwkv7.fused_k_update", "k_update_ref"),
    ("fla.ops.rwkv7.gate_output_correction", "gate_output_correction_ref"),
    ("fla.ops.mesa_net.naive", "naive_mesa_net_exact"),
    ("fla.ops.mesa_net.naive", "naive_mesa_net_decoding_one_step"),
    ("fla.ops.forgetting_attn.naive", "naive_forgetting_attn"),
    ("fla.ops.path_attn.naive", "naive_path_attn"),
    ("fla.ops.gsa.naive", "naive_recurrent_gsa"),
)


def check_table() -> list[str]:
    """Checks FLA's version, that every name in the table exists and that FLA's own references the family
    references call are there; returns the labels."""
    check_fla_version()
    for swap in TABLE:
        _current(swap)
    for module, name in FLA_REFERENCES:
        _current(Swap(module, name, None))
    return [swap.label for swap in TABLE]


def install(table: tuple[Swap, ...] = TABLE) -> None:
    """Binds every op of `table` (idempotent; another table installed before is restored first); nothing is
    changed if any check fails."""
    if _originals and set(_originals) == set(table):
        return
    restore()
    check_table()
    originals = {swap: _current(swap) for swap in table}
    for swap in table:
        _bind(swap, swap.replacement)
    _originals.update(originals)


def restore() -> None:
    """Puts FLA's own ops back (no-op when the reference ops are not installed)."""
    for swap, value in _originals.items():
        _bind(swap, value)
    _originals.clear()


def installed() -> bool:
    return bool(_originals)
