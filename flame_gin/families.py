"""What flame_gin knows of each model family: where its body and blocks live, and what it can run on.

Why one module: FLA's families do not share one layout (Mamba, Mamba2, Mamba3, log-linear Mamba2 and Samba
keep their body in ``.backbone``, the others in ``.model``; Mamba's final norm is ``norm_f``), they differ in
whether their layers honour ``cu_seqlens``, and only some have CPU paths. The loss, the parallelisms, the
pipeline split, the memory estimate and the trainer's checks ask here instead of assuming ``.model`` or
keeping allow-lists of their own. The body is found the way transformers defines it (``base_model_prefix``),
so a family registered from a user's module works as long as its causal-LM class follows that convention.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Traits:
    """A family's traits, as checked against FLA 0.6's sources and by the tests that train each family.

    ``varlen``: every layer passes ``cu_seqlens`` to its ops, convolutions and token shifts, so packed
    documents never see each other. ``cpu``: every op the family calls runs on a CPU (FLA's own PyTorch code or
    flame_gin's reference kernels); the others launch Triton kernels that need a GPU driver. ``note``: what a
    user must know to run it, shown when it is refused. ``gated_delta_backward``: its backward calls FLA's gated
    ``chunk_bwd_dqkwg``, which FLA 0.6 itself refuses on Hopper with Triton 3.4-3.7.0 (wrong gradients, FLA #640)
    unless its TileLang backend can take the call. ``body``: the body's attribute for a causal-LM class that does
    not name it in ``base_model_prefix`` (FLA 0.6's LightNet). ``requires``: packages its GPU layers cannot run
    without (FLA raises only at the first forward, after the model is built). ``kernel``: ``module:name`` that
    FLA's layer module sets to None when its import of those packages' kernel failed (a package installed
    without its compiled extension still imports by name, and FLA then fails at the first forward). ``meta_skips``: constructor
    initialisers (``module:Class.method``) that only write values, element by element, which the meta device
    does not hold: FLA's RWKV-7 attention fills its per-channel vectors in a Python loop, ~0.6 s a layer as
    meta-tensor ops (15 s for the 1B model, on every meta build a run makes); the real build takes those values
    from a construction on the CPU (``models.build_model``). ``init_in_constructor``: its layers set values in
    their constructors that the model's ``init_weights`` does not reproduce (FLA's RWKV-6 and RWKV-7: decay
    and LoRA biases, token-shift ramps, orthogonal and zero projections; MoM: Xavier projections with gain
    2^-2.5, about a tenth of the generic spread), so every value is taken from a
    construction on the CPU under the run's seed, as FLA itself would build it. ``router_loss``: the family's
    blocks route tokens among memories and FLA's own forward adds the router's load-balancing loss
    (``config.aux_loss_scale`` times FLA's balance loss over every block's router logits) to the language-model
    loss (MoM): the trainer, which calls the body itself, adds the same term (``router_loss``); a pipeline split
    cannot collect every block's router logits, so those runs are refused.
    """

    varlen: bool = False
    cpu: bool = False
    note: str = ""
    gated_delta_backward: bool = False
    body: str = ""
    requires: tuple[str, ...] = ()
    kernel: str = ""
    meta_skips: tuple[str, ...] = ()
    init_in_constructor: bool = False
    router_loss: bool = False


_UNKNOWN = Traits(note="flame_gin has not checked this family's layers")

_TRAITS = {
    # flame_gin's reference kernels cover GLA, DeltaNet and Gated DeltaNet; softmax attention layers (FLA's
    # transformer, hybrids' `attn` layers, Samba) run through SDPA and reference rotary embeddings.
    "gla": Traits(varlen=True, cpu=True),
    "delta_net": Traits(varlen=True, cpu=True),
    "gated_deltanet": Traits(varlen=True, cpu=True, gated_delta_backward=True),
    "transformer": Traits(varlen=True, cpu=True),
    "llama": Traits(cpu=True, note="the HF baseline takes no cu_seqlens"),
    # Mamba's and Mamba2's layers fall back to PyTorch without mamba_ssm/causal_conv1d; both ignore cu_seqlens.
    "mamba": Traits(cpu=True, note="Mamba layers ignore cu_seqlens"),
    "mamba2": Traits(cpu=True, note="Mamba2 layers ignore cu_seqlens"),
    "samba": Traits(cpu=True, note="Samba's Mamba layers ignore cu_seqlens"),
    # Triton-only families whose layers honour cu_seqlens.
    "gsa": Traits(varlen=True, cpu=True),
    "hgrn2": Traits(varlen=True, cpu=True),
    "hgrn": Traits(varlen=True, cpu=True),
    "retnet": Traits(varlen=True, cpu=True),
    "rwkv6": Traits(varlen=True, cpu=True, init_in_constructor=True),
    "rwkv7": Traits(
        varlen=True,
        cpu=True,
        init_in_constructor=True,
        meta_skips=("fla.layers.rwkv7:RWKV7Attention._initialize_weights",),
    ),
    "linear_attn": Traits(varlen=True),
    "comba": Traits(varlen=True, cpu=True, gated_delta_backward=True),
    "kda": Traits(varlen=True, cpu=True),
    # With its forget gate on (gin/model/gated_deltaproduct.gin), its backward is the gated delta rule's.
    "gated_deltaproduct": Traits(
        varlen=True, cpu=True, note="FLA's chunked kernel runs in bfloat16 only", gated_delta_backward=True
    ),
    "mesa_net": Traits(varlen=True, cpu=True),
    "lightnet": Traits(varlen=True, cpu=True, body="model"),
    # FLA's Triton attention variants: their layers take cu_seqlens, not yet checked against documents alone.
    "path_attn": Traits(varlen=True, cpu=True),
    "forgetting_transformer": Traits(varlen=True, cpu=True),
    "abc": Traits(note="FLA's ABC layer raises on cu_seqlens"),
    "mamba3": Traits(
        note="Mamba3 layers ignore cu_seqlens",
        requires=("mamba_ssm",),
        kernel="fla.layers.mamba3:mamba3_siso_combined",
    ),
    "log_linear_mamba2": Traits(note="log-linear Mamba2 has no PyTorch fallback in FLA 0.6"),
    "mom": Traits(cpu=True, gated_delta_backward=True, router_loss=True, body="model", init_in_constructor=True),
    "yoco": Traits(gated_delta_backward=True),
    "precond_gated_deltanet": Traits(gated_delta_backward=True),
}


def register(*, name: str, traits: Traits) -> None:
    """Records the traits of a family registered from a user's module (``models.register_family``)."""
    _TRAITS[name] = traits


def traits(family: str) -> Traits:
    """The traits of ``family`` (a config's ``model_type``); unchecked families get none (no varlen, no CPU)."""
    return _TRAITS.get(family, _UNKNOWN)


def router_loss(*, model: nn.Module, outputs) -> torch.Tensor | None:
    """The load-balancing term FLA's forward adds to the loss of a routing family (MoM), from the body's or the
    whole model's ``outputs`` (their ``router_logits``, one tensor per block), already scaled by the config's
    ``aux_loss_scale``; None for other families. FLA's own function computes it, so the term is FLA's."""
    config = model.config
    if not traits(config.model_type).router_loss:
        return None
    from fla.models.mom.modeling_mom import load_balancing_loss_func

    logits = getattr(outputs, "router_logits", None)
    if not logits:
        raise ValueError(f"model family {config.model_type!r} returned no router_logits for its balance loss")
    balance = load_balancing_loss_func(tuple(logits), config.num_memories, config.topk, None)
    return balance * config.aux_loss_scale


def supports_varlen(config) -> bool:
    """Whether the family's layers honour ``cu_seqlens`` (documents never see each other when packed)."""
    return traits(config.model_type).varlen


def check_device(*, config, device_type: str) -> None:
    """Raises a ``ValueError`` naming the family when it cannot run on ``device_type``, before anything is built."""
    family = config.model_type
    if device_type == "cpu" and not traits(family).cpu:
        note = traits(family).note
        runnable = ", ".join(sorted(name for name, t in _TRAITS.items() if t.cpu))
        raise ValueError(
            f"model family {family!r} has no CPU kernels (its layers launch Triton kernels that need a GPU"
            f"{'; ' + note if note else ''}): run it on a GPU. Families that train on a CPU: {runnable}"
        )
    missing = (
        [n for n in traits(family).requires if importlib.util.find_spec(n) is None] if device_type == "cuda" else []
    )
    if missing:
        raise ValueError(
            f"model family {family!r} needs {', '.join(missing)} for its GPU kernels (FLA has no fallback): "
            f"install it, or pick another family"
        )
    if device_type == "cuda" and traits(family).kernel:
        module, name = traits(family).kernel.split(":")
        if getattr(importlib.import_module(module), name) is None:
            raise ValueError(
                f"model family {family!r}: {', '.join(traits(family).requires)} is installed but FLA found no "
                f"{name} kernel in it ({module}): reinstall it with its CUDA extension built for this GPU "
                f"(`pip install {traits(family).requires[0].replace('_', '-')} --no-build-isolation`)"
            )
    if device_type == "cuda" and traits(family).gated_delta_backward:
        reason = fla_refuses_gated_delta_backward()
        if reason:
            raise ValueError(f"model family {family!r} cannot train here: {reason}")


_MAMBA_KERNELS = ("mamba_ssm", "causal_conv1d")
_NEEDS_MAMBA_KERNELS = frozenset({"mamba", "mamba2", "samba"})


def speed_warning(*, config, device_type: str) -> str | None:
    """A warning for a family that trains on a GPU but through FLA's pure-PyTorch fallback, or None.

    FLA's Mamba, Mamba2 and Samba layers take the CUDA kernels of ``mamba-ssm`` and ``causal-conv1d`` when
    those packages are installed, and otherwise a Python-level scan: on one H200 at 8 x 512, 4 x 2048
    (benchmarks/RESULTS.md) Mamba ran at 91 tokens/s, Samba at 232 and Mamba2 at 1,662 (39.7 GiB), against
    ~100,000 for GLA at the same shape."""
    if device_type != "cuda" or config.model_type not in _NEEDS_MAMBA_KERNELS:
        return None
    missing = [name for name in _MAMBA_KERNELS if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"model family {config.model_type!r} runs FLA's pure-PyTorch fallback on this GPU because "
        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: expect a few hundred to a "
        f"few thousand tokens/s. Install mamba-ssm and causal-conv1d for their CUDA kernels."
    )


def unchecked_warning(*, config) -> str | None:
    """A warning for a family flame_gin has no traits for (one of FLA's that the zoo has no file for, such as
    BitNet, NSA or Rodimus), or None: nothing says its layers honour the trainer's assumptions (where the body
    lives, packed documents), so a failure may come from FLA's layers mid-run rather than a check up front."""
    if config.model_type in _TRAITS:
        return None
    return (
        f"model family {config.model_type!r}: {_UNKNOWN.note} (it has no gin/model/ file and was never trained "
        f"here); packed documents are not kept apart. Families with checked traits: {', '.join(sorted(_TRAITS))}"
    )


def fla_refuses_gated_delta_backward() -> str | None:
    """Why FLA 0.6 would refuse the gated delta-rule backward on this GPU (its own test, asked up front so the
    run stops before building anything rather than at the first backward), or None. Never bypassed: the fix is
    Triton >= 3.7.1, or TileLang installed for FLA's TileLang backend to take the call."""
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0
    from fla.utils.env import TRITON_ABOVE_3_7_1

    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return None
    if importlib.util.find_spec("tilelang") is not None and os.environ.get("FLA_TILELANG", "1") != "0":
        return None
    import triton

    return (
        f"FLA refuses its gated delta-rule backward on Hopper with Triton {triton.__version__} (wrong "
        f"gradients with Triton 3.4-3.7.0, FLA #640); install Triton >= 3.7.1 or TileLang "
        f"(`pip install -e '.[tilelang]'`, FLA then runs that kernel through TileLang)"
    )


def _prefix(model: nn.Module) -> str:
    """transformers' ``base_model_prefix``, or the family's known body attribute where the class leaves it empty."""
    family = getattr(getattr(model, "config", None), "model_type", "")
    return getattr(model, "base_model_prefix", "") or traits(family).body


def body_name(model: nn.Module) -> str:
    """The attribute that holds the model's body (``model`` or ``backbone``), from transformers' convention."""
    name = _prefix(model)
    if not name or not isinstance(getattr(model, name, None), nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no body at base_model_prefix={name!r}: a causal-LM class "
            f"must keep its decoder under the attribute its base_model_prefix names"
        )
    return name


def body(model: nn.Module) -> nn.Module:
    """The model's body: embeddings, blocks and final norm, without the LM head (``model`` itself when it is
    already a body, as transformers' ``base_model`` does)."""
    name = _prefix(model)
    inner = getattr(model, name, None) if name else None
    return inner if isinstance(inner, nn.Module) else model


def blocks(model: nn.Module) -> nn.ModuleList | nn.ModuleDict:
    """The model's blocks (a pipeline stage keeps its share in a ``ModuleDict`` under the original indices)."""
    layers = getattr(body(model), "layers", None)
    if not isinstance(layers, (nn.ModuleList, nn.ModuleDict)):
        raise ValueError(
            f"{type(model).__name__} has no block list `layers` in its body (base_model_prefix="
            f"{getattr(model, 'base_model_prefix', None)!r})"
        )
    return layers


def embedding_name(inner: nn.Module) -> str | None:
    """The body's token embedding attribute (FLA: ``embeddings``; HF: ``embed_tokens``), None if dropped."""
    return next((n for n in ("embeddings", "embed_tokens") if getattr(inner, n, None) is not None), None)


def final_norm_name(inner: nn.Module) -> str | None:
    """The body's final norm attribute (``norm``, or Mamba's ``norm_f``), None if dropped."""
    return next((n for n in ("norm", "norm_f") if getattr(inner, n, None) is not None), None)
