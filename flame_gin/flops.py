"""FLOPs per token for every supported model family, counted from the model's real layers.

Why a count of our own: the usual ``6 * parameters + 12 * layers * hidden * seq_len`` rule charges linear-attention
models for a softmax attention they do not compute, and charges the embedding lookup (a gather, no arithmetic) as a
matmul; for GLA-340M at 2048 tokens that over-states the work by about a third and so inflates MFU.

What is counted (forward pass, per token; training is three times the forward, since the backward of every matmul
is two matmuls of the same size):

- every ``nn.Linear`` of the model, the LM head included: ``2 * in * out``; the input embedding is excluded;
- every convolution (the short convolutions of DeltaNet-style layers, Mamba's conv): ``2 * out * in/groups * k``;
- each mixer's own work, read from the built layer (heads, head sizes, chunk size):
  - chunked linear attention (GLA, RetNet, RWKV-6, HGRN2, LightNet, GSA's two passes, Mamba2's SSD), per head
    with chunk ``c``,
    key size ``dk`` and value size ``dv``: ``2c(dk + dv)`` for the intra-chunk scores and their product with the
    values (full ``c x c`` blocks, as the kernels compute them) plus ``4 dk dv`` for reading and updating the state;
  - the chunked delta rule (DeltaNet, Gated DeltaNet, KDA, Comba), WY form: ``6c dk + 4c dv + 2c^2/3 + 6 dk dv``
    (scores ``QK^T`` and ``KK^T``, the triangular solve, ``W = AK``, ``U = AV``, scores times new values, and three
    state products); Gated DeltaProduct that times its Householder steps per token; RWKV-7's
    diagonal-plus-low-rank rule is charged ``8c dk + 4c dv + 2c^2/3 + 8 dk dv``; HGRN's element-wise
    recurrence nothing beyond its projections;
  - Mamba's selective scan: ``6 * d_inner * state_size`` (discretise, update, read out);
  - softmax attention only where a layer really is softmax attention (the Llama baseline, hybrid and Samba
    attention layers, the Forgetting Transformer, PaTH attention): ``4 * T_eff * heads * head_dim`` with
    ``T_eff`` the sequence length, or the window when smaller, counting the full square as ``FlopCounterMode``
    and the PaLM MFU convention do. PaTH's Householder position transforms (about ``6c * head_dim`` per token
    and head, under 5% of the attention at 2,048 tokens) are left out.

- log-linear Mamba2: Mamba2's chunked form with a Fenwick tree of states, one read-out of ``2 dk dv`` per
  inter-chunk level (``ceil(log2(T / c))`` levels at length ``T``, as the kernel keeps them) instead of one;
- MoM routes every token through ``topk`` of its memories (plus the shared one): its query projection, its
  memories' key/value/gate projections, short convolutions and delta rules count once per memory the token
  passes through, not once per memory built. FLA pads each memory's tokens to the busiest memory's count;
  that padding is wasted work and is not charged, as MFU counts useful work.

- Mamba-3 (SISO) as Mamba2's chunked form: its trapezoidal rule and rotary angles are element-wise work.

MesaNet (a conjugate-gradient solve per chunk, its step count data-dependent) and Mamba-3 with MIMO have no
count: their runs log no MFU.

Element-wise work (norms, gates, activations, rotary) is not counted: it is small and memory-bound.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from absl import logging
from torch import nn

from flame_gin import families, models

CHUNK_SIZE = 64  # FLA's chunked kernels (GLA, RetNet, HGRN2, GSA, delta rules, RWKV-7) work on 64-token chunks.


def chunked_linear_attention_flops(*, heads: int, dk: int, dv: int, chunk: int) -> float:
    """Per token: intra-chunk scores and their product with values, plus state read-out and update."""
    return heads * (2 * chunk * (dk + dv) + 4 * dk * dv)


def chunked_delta_rule_flops(*, heads: int, dk: int, dv: int, chunk: int) -> float:
    """Per token, WY form: QK^T, KK^T, triangular solve, AK, AV, scores x new values, three state products."""
    return heads * (6 * chunk * dk + 4 * chunk * dv + 2 * chunk * chunk / 3 + 6 * dk * dv)


def softmax_attention_flops(*, heads: int, head_dim: int, context: int) -> float:
    """Per token: QK^T and PV over ``context`` keys (full square, as FlopCounterMode counts SDPA)."""
    return 4 * context * heads * head_dim


def _chunk(seq_len: int, size: int = CHUNK_SIZE) -> int:
    return min(size, seq_len)


def _gla_like(m, seq_len):
    return chunked_linear_attention_flops(heads=m.num_heads, dk=m.head_k_dim, dv=m.head_v_dim, chunk=_chunk(seq_len))


def _hgrn2(m, seq_len):
    return chunked_linear_attention_flops(heads=m.num_heads, dk=m.head_f_dim, dv=m.head_i_dim, chunk=_chunk(seq_len))


def _gsa(m, seq_len):
    c = _chunk(seq_len)
    return chunked_linear_attention_flops(
        heads=m.num_heads, dk=m.head_k_dim, dv=m.num_slots, chunk=c
    ) + chunked_linear_attention_flops(heads=m.num_heads, dk=m.num_slots, dv=m.head_v_dim, chunk=c)


def _delta(m, seq_len):
    heads = getattr(m, "num_v_heads", None) or m.num_heads
    return chunked_delta_rule_flops(heads=heads, dk=m.head_k_dim, dv=m.head_v_dim, chunk=_chunk(seq_len))


def _rwkv7(m, seq_len):
    c, dk, dv = _chunk(seq_len), m.head_dim, m.head_v_dim
    return m.num_heads * (8 * c * dk + 4 * c * dv + 2 * c * c / 3 + 8 * dk * dv)


def _mamba(m, seq_len):
    return 6 * m.intermediate_size * m.ssm_state_size


def _mamba2(m, seq_len):
    return chunked_linear_attention_flops(
        heads=m.num_heads, dk=m.ssm_state_size, dv=m.head_dim, chunk=_chunk(seq_len, m.chunk_size)
    )


def _mamba3(m, seq_len):
    """Mamba-3 (SISO): Mamba2's chunked form, C and B as queries and keys of the state size, x as values. Its
    trapezoidal rule and rotary angles change the decay mask and rotate B and C (element-wise), adding no
    product. The MIMO variant is not counted."""
    if getattr(m, "is_mimo", False):
        raise NotImplementedError("Mamba-3 with MIMO (is_mimo=True) has no FLOP count")
    return _mamba2(m, seq_len)


def _log_linear_mamba2(m, seq_len):
    """Mamba2's intra-chunk work and state update, plus one state read-out per Fenwick level past the chunk."""
    c = _chunk(seq_len, m.chunk_size)
    levels = math.ceil(math.log2(seq_len / c)) if seq_len > c else 0
    dk, dv = m.ssm_state_size, m.head_dim
    return m.num_heads * (2 * c * (dk + dv) + 2 * dk * dv * (1 + levels))


def _mom(m, seq_len) -> dict[str, float]:
    """MoM's whole mixer (its own projections and convolutions included), per token; see the module docstring."""
    passes = m.topk + int(m.shared_mem)
    heads, key, value = m.num_heads, m.key_dim, m.value_dim
    per_memory = 2 * m.hidden_size * (key + value + 2 * heads)  # one memory's k, v, beta and decay projections
    once = 2 * m.hidden_size * m.num_memories + 2 * value * m.hidden_size  # router, output projection
    if getattr(m, "use_output_gate", False):
        once += 2 * m.hidden_size * value
    convs = sum(_conv_flops(getattr(m, n)) for n in ("q_conv1d", "k_conv1d", "v_conv1d") if hasattr(m, n))
    return {
        "linear": once + passes * (2 * m.hidden_size * key + per_memory),
        "conv": passes * convs,
        "linear_attention": passes
        * chunked_delta_rule_flops(heads=heads, dk=m.head_dim, dv=m.head_v_dim, chunk=_chunk(seq_len)),
    }


def _delta_product(m, seq_len):
    """Gated DeltaProduct: ``num_householder`` delta-rule steps per token, each a chunked delta rule."""
    return m.num_householder * _delta(m, seq_len)


def _no_matmul(m, seq_len):
    """HGRN's element-wise recurrence: its work is its projections, counted with every ``nn.Linear``."""
    return 0.0


def _fla_attention(m, seq_len):
    window = getattr(m, "window_size", None)  # PaTH attention has none
    context = seq_len if window is None else min(seq_len, window)
    return softmax_attention_flops(heads=m.num_heads, head_dim=m.head_dim, context=context)


def _hf_attention(m, seq_len):
    return softmax_attention_flops(heads=m.config.num_attention_heads, head_dim=m.head_dim, context=seq_len)


# Mixer classes (by class name, so importing this module imports no FLA layer) -> (kind, per-token forward FLOPs).
_MIXERS: dict[str, tuple[str, Callable[[nn.Module, int], float]]] = {
    "GatedLinearAttention": ("linear_attention", _gla_like),
    "MultiScaleRetention": ("linear_attention", _gla_like),
    "HGRN2Attention": ("linear_attention", _hgrn2),
    "GatedSlotAttention": ("linear_attention", _gsa),
    "DeltaNet": ("linear_attention", _delta),
    "GatedDeltaNet": ("linear_attention", _delta),
    "RWKV7Attention": ("linear_attention", _rwkv7),
    "RWKV6Attention": ("linear_attention", _gla_like),
    "LightNetAttention": ("linear_attention", _hgrn2),
    "KimiDeltaAttention": ("linear_attention", _delta),
    "Comba": ("linear_attention", _delta),
    "GatedDeltaProduct": ("linear_attention", _delta_product),
    "HGRNAttention": ("linear_attention", _no_matmul),
    "ForgettingAttention": ("softmax_attention", _fla_attention),
    "PaTHAttention": ("softmax_attention", _fla_attention),
    "Mamba": ("linear_attention", _mamba),
    "Mamba2": ("linear_attention", _mamba2),
    "LogLinearMamba2": ("linear_attention", _log_linear_mamba2),
    "Mamba3": ("linear_attention", _mamba3),
    "Attention": ("softmax_attention", _fla_attention),
    "LlamaAttention": ("softmax_attention", _hf_attention),
}
# Mixers that count all their own work, their projections and convolutions included (by part): routed mixers,
# whose sub-modules do not all see every token.
_SELF_COUNTED: dict[str, Callable[[nn.Module, int], dict[str, float]]] = {"MomAttention": _mom}
SUPPORTED_FAMILIES = (
    "gla",
    "retnet",
    "hgrn2",
    "gsa",
    "delta_net",
    "gated_deltanet",
    "rwkv7",
    "mamba",
    "mamba2",
    "samba",
    "llama",
    "rwkv6",
    "lightnet",
    "kda",
    "comba",
    "gated_deltaproduct",
    "hgrn",
    "forgetting_transformer",
    "path_attn",
    "mom",
    "log_linear_mamba2",
    "mamba3",
)


def _layers(model: nn.Module) -> nn.ModuleList:
    return families.blocks(model)


def _conv_flops(module: nn.Conv1d) -> float:
    return 2.0 * module.out_channels * (module.in_channels // module.groups) * module.kernel_size[0]


def _mixer_of(layer: nn.Module) -> nn.Module:
    for name in ("attn", "mixer", "self_attn"):
        mixer = getattr(layer, name, None)
        if isinstance(mixer, nn.Module):
            return mixer
    raise ValueError(f"decoder layer {type(layer).__name__} has no attn/mixer/self_attn sub-module")


def breakdown_from_model(*, model: nn.Module, family: str, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of a built (meta or real) model, by part; see the module docstring."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    parts = {"linear": 0.0, "conv": 0.0, "linear_attention": 0.0, "softmax_attention": 0.0}
    mixers = [_mixer_of(layer) for layer in _layers(model)]
    self_counted = {id(m) for mixer in mixers if type(mixer).__name__ in _SELF_COUNTED for m in mixer.modules()}
    for module in model.modules():
        if id(module) in self_counted:
            continue
        if isinstance(module, nn.Linear):
            parts["linear"] += 2.0 * module.in_features * module.out_features
        elif isinstance(module, nn.Conv1d):
            parts["conv"] += _conv_flops(module)
    for index, mixer in enumerate(mixers):
        own = _SELF_COUNTED.get(type(mixer).__name__)
        if own is not None:
            for kind, value in own(mixer, seq_len).items():
                parts[kind] += float(value)
            continue
        kind_and_count = _MIXERS.get(type(mixer).__name__)
        if kind_and_count is None:
            raise ValueError(
                f"No FLOP formula for the mixer {type(mixer).__name__} (layer {index}) of family {family!r}; "
                f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
            )
        kind, count = kind_and_count
        parts[kind] += float(count(mixer, seq_len))
    return parts


def flops_breakdown(*, config, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by part (linear, conv, linear_attention, softmax_attention) for ``config``.

    Builds the model on the meta device (no memory) so the count follows the layers FLA really creates.
    """
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"No FLOP count for model family {family!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    model = models.build_meta_model(config=config)
    return breakdown_from_model(model=model, family=family, seq_len=seq_len)


def forward_flops_per_token(*, config, seq_len: int) -> float:
    """Forward FLOPs per token at sequence length ``seq_len`` (embedding lookup excluded)."""
    return math.fsum(flops_breakdown(config=config, seq_len=seq_len).values())


def flops_per_token(*, config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), the numerator of MFU."""
    return 3.0 * forward_flops_per_token(config=config, seq_len=seq_len)


# Dense bf16 peak of common accelerators, TFLOP/s (vendor figures); ``flame_gin.run.peak_tflops`` overrides.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def device_peak_tflops(*, device: torch.device, configured: float | None = None) -> float | None:
    """The peak that MFU is measured against: ``configured`` if given, else the known figure of the GPU."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_TFLOPS.items() if k in name), None)


def mfu(*, tokens_per_second: float, flops_per_token: float, peak_tflops: float, devices: int) -> float:
    """Model FLOPs utilisation: the training FLOPs the tokens needed over what ``devices`` at ``peak_tflops``
    could do in the same time."""
    return tokens_per_second * flops_per_token / (peak_tflops * 1e12 * devices)


def training_flops_or_none(*, config, seq_len: int) -> float | None:
    """``flops_per_token``, or None (with a warning) for a family this module cannot count: MFU is then not logged."""
    try:
        return float(flops_per_token(config=config, seq_len=seq_len))
    except (ImportError, ValueError, NotImplementedError) as e:
        logging.warning("no FLOPs count for %s (%s): MFU is not logged", config.model_type, e)
        return None
