"""Model builder: any FLA causal-LM family, or HF Llama (SDPA) as the softmax baseline.

Why a builder of our own: FLA and HF config classes take ``**kwargs`` and silently keep any key, so a typo
in a gin file (``num_head = 8``) would train the wrong model without a word. ``build_config`` rejects every key
the config class does not declare and lists the valid ones. Models are built on the meta device for parameter
counts, FLOPs and memory estimates (no memory), and on the target device, initialised with the family's own
initialiser under a fixed seed, for training.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import os
import time
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.distributed as dist
from absl import logging
from torch import nn

from flame_gin import families
from flame_gin import mesh as mesh_lib

if TYPE_CHECKING:
    import transformers

_BASELINE_FAMILIES = {"llama": "LlamaConfig"}  # HF's Llama through SDPA, the softmax baseline: transformers' class
_CUSTOM_FAMILIES: dict[str, type] = {}


def _transformers():
    """transformers, imported on first use: about 0.8 s, which a config error should not wait for."""
    import transformers

    return transformers


def _fla_families() -> dict[str, type]:
    """Maps each FLA model_type (``gla``, ``delta_net``, ...) to its config class, as FLA registers them."""
    import fla.models  # noqa: F401  (registers FLA configs and models with transformers' Auto classes)

    classes = {}
    for name in dir(fla.models):
        obj = getattr(fla.models, name)
        if isinstance(obj, type) and name.endswith("Config") and getattr(obj, "model_type", None):
            classes[obj.model_type] = obj
    return classes


def config_classes() -> dict[str, type]:
    """All known families: FLA's, the softmax baseline and the user-registered ones, name -> config class."""
    baseline = {name: getattr(_transformers(), cls) for name, cls in _BASELINE_FAMILIES.items()}
    return {**_fla_families(), **baseline, **_CUSTOM_FAMILIES}


def register_family(
    *, name: str, config_class: type, model_class: type, traits: families.Traits = families.Traits()
) -> None:
    """Registers a family FLA does not ship (a config class and a causal-LM class) under ``name``.

    After this, ``family = "<name>"`` in a gin file builds it like any FLA model. The config class must set
    ``model_type = name``; both classes are registered with transformers' Auto classes so export and reload work.
    The causal-LM class keeps its body under the attribute its ``base_model_prefix`` names (transformers'
    convention), and ``traits`` says whether it runs on a CPU and honours ``cu_seqlens``.
    """
    if getattr(config_class, "model_type", None) != name:
        raise ValueError(
            f"register_family: {config_class.__name__}.model_type is {getattr(config_class, 'model_type', None)!r}, "
            f"expected {name!r}"
        )
    if name not in _CUSTOM_FAMILIES:
        _transformers().AutoConfig.register(name, config_class, exist_ok=True)
        _transformers().AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    _CUSTOM_FAMILIES[name] = config_class
    families.register(name=name, traits=traits)


def valid_config_keys(config_class: type) -> set[str]:
    """Keys a config class really understands: its constructor's named arguments and its default attributes."""
    params = {
        n
        for n, p in inspect.signature(config_class.__init__).parameters.items()
        if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    return params | set(config_class().to_dict())


def build_config(
    *,
    family: str,
    overrides: Mapping[str, Any] | None = None,
    extra_overrides: Mapping[str, Any] | None = None,
    attn: Mapping[str, Any] | None = None,
) -> transformers.PretrainedConfig:
    """Builds the config of ``family`` with ``overrides``; unknown families or keys are a ``ValueError``.

    ``extra_overrides`` is applied on top of ``overrides``: a gin dict binding replaces the whole dict, so an
    ablation file changes one model key with ``flame_gin.model_config.extra_overrides = {'key': value}`` and
    leaves the family file's ``overrides`` alone. ``attn`` makes a hybrid: FLA's softmax attention at the
    layer indices it names (FLA's ``attn`` config key: ``layers``, ``num_heads``, ``num_kv_heads``, ...), kept
    apart from both dicts so a hybrid file and an ablation file never replace each other's settings.
    """
    known = config_classes()
    if family not in known:
        raise ValueError(f"Unknown model family {family!r}. Known families: {', '.join(sorted(known))}")
    config_class = known[family]
    overrides = {**(overrides or {}), **(extra_overrides or {}), **({"attn": dict(attn)} if attn else {})}
    valid = valid_config_keys(config_class)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        hint_text = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
        raise ValueError(
            f"Unknown key(s) for model family {family!r} ({config_class.__name__}): {hint_text}. "
            f"Valid keys: {', '.join(sorted(valid))}"
        )
    if family in _BASELINE_FAMILIES:
        overrides.setdefault("attn_implementation", "sdpa")
    config = config_class(**overrides)
    if family in _BASELINE_FAMILIES:
        config._attn_implementation = "sdpa"  # FLA's own transformer needs flash-attn; the baseline uses SDPA.
    return config


@contextlib.contextmanager
def _skipped(methods: tuple[str, ...]):
    """Replaces each ``module:Class.method`` by a no-op while the block runs (``families.Traits.meta_skips``).

    One that another FLA version no longer has is left alone: the build is then only slower.
    """
    saved = []
    try:
        for spec in methods:
            module_name, qualname = spec.split(":")
            class_name, method = qualname.rsplit(".", 1)
            owner = getattr(importlib.import_module(module_name), class_name, None)
            if owner is None or method not in owner.__dict__:
                continue
            saved.append((owner, method, owner.__dict__[method]))
            setattr(owner, method, lambda *args, **kwargs: None)
        yield
    finally:
        for owner, method, original in reversed(saved):
            setattr(owner, method, original)


def build_meta_model(*, config: transformers.PretrainedConfig) -> nn.Module:
    """The model with every tensor on the meta device: no memory, exact shapes (for counts and estimates)."""
    try:
        with torch.device("meta"), _skipped(families.traits(config.model_type).meta_skips):
            return _transformers().AutoModelForCausalLM.from_config(config)
    except (AssertionError, ArithmeticError, ImportError, KeyError, TypeError, ValueError) as e:
        # Layer constructors check their shapes with asserts and divisions; nothing is allocated on meta, so any
        # such failure is the config's fault and is reported as one, naming the family.
        raise ValueError(
            f"model family {config.model_type!r} cannot be built from its config: {type(e).__name__}: {e}"
        ) from e


def build_model(
    *, config: transformers.PretrainedConfig, device: torch.device | str, seed: int, restoring: bool = False
) -> nn.Module:
    """The model on ``device``, initialised identically for a given seed.

    Built on meta, then its storage allocated on ``device`` and filled with NaN; modules' own
    ``reset_parameters`` (norm weights to one, biases) and then the family's ``init_weights`` (HF/FLA
    initialisation of linear and embedding weights, tying, rotary buffers) run under the seed. Some layers set
    values only in their constructor (Samba's Mamba mixers set ``A_log`` and ``D`` there and Samba's
    initialiser leaves them alone): whatever is still NaN afterwards comes from a copy of the model constructed
    on the CPU under the same seed, so no uninitialised memory is ever trained; a family whose layers initialise
    themselves in their constructors (``families.Traits.init_in_constructor``) takes every value from there.
    Anything still not finite is an error naming the tensor.

    ``restoring``: the run resumes its own checkpoint, which overwrites every tensor of the state dict before
    the first step. The constructor's values are then taken only for tensors outside it (RWKV-6, RWKV-7 and
    MoM have none, so a resumed run of theirs builds no CPU copy: minutes at 7B); the others stay NaN until
    the restore, after which ``check_restored`` confirms that none is left.
    """
    device = torch.device(device)
    model = build_meta_model(config=config)
    model.to_empty(device=device)
    tensors = dict(_floating_tensors(model))
    with torch.no_grad():
        for tensor in tensors.values():
            tensor.fill_(float("nan"))
    if not families.traits(config.model_type).init_in_constructor:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for module in model.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset) and module is not model:
                    reset()
            model.init_weights()
    untouched = [name for name, tensor in tensors.items() if torch.isnan(tensor).any()]
    saved = set(model.state_dict()) if restoring else set()
    left = [name for name in untouched if name in saved]
    if left:
        logging.info(
            "model family %s: %d tensor(s) set only by the constructor are left to the checkpoint being resumed",
            config.model_type,
            len(left),
        )
    if len(left) < len(untouched):
        _fill_from_constructor(model=model, config=config, names=[n for n in untouched if n not in saved], seed=seed)
    for name, tensor in tensors.items():
        if name not in left and not torch.isfinite(tensor).all():
            raise ValueError(f"model family {config.model_type!r}: {name} is not finite after initialisation")
    return model


def check_restored(*, model: nn.Module) -> None:
    """Raises ValueError naming the first parameter or buffer that still holds NaN after a restore: one that
    ``build_model(restoring=True)`` left to a checkpoint that did not bring it (or a checkpoint saved with NaN
    in it). Each rank checks its own shards."""
    for name, tensor in _floating_tensors(model):
        if torch.isnan(mesh_lib.local_tensor(tensor)).any():
            raise ValueError(f"{name} holds NaN after the restore: the checkpoint did not set it")


def _floating_tensors(model: nn.Module):
    """(name, tensor) of every floating-point parameter and buffer, tied ones once."""
    seen = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor


def _fill_from_constructor(*, model: nn.Module, config, names: list[str], seed: int) -> None:
    """Fills the NaN entries of ``names`` with the values the family's constructor gives on the CPU. The log
    line gives the CPU build's seconds: it is part of the start-up (11 s for RWKV-7-340M on a GPU machine,
    most of it the orthogonal initialisations' QR decompositions, which grow with the cube of the width).

    Under a process group only rank 0 constructs the copy, with the threads of every rank of its node
    (torchrun gives each rank one), and broadcasts the tensors, so every rank holds the same values without one
    copy of the whole model per rank in the host's memory (28 GB each at 7B) and one single-threaded
    construction per rank competing for the cores. The others wait for it within the start-up timeout
    (``init_timeout_seconds``). The values are FLA's construction under the seed; their last bits follow the
    thread count (the QR decompositions round differently with more threads), as in any one-process build."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    tensors = dict(_floating_tensors(model))
    if world == 1 or dist.get_rank() == 0:
        start = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(min(os.cpu_count() or 1, threads * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        try:
            reference = _constructed(config=config, seed=seed)
        finally:
            torch.set_num_threads(threads)
        logging.info(
            "model family %s: %d tensor(s) set only by the constructor (%s); taken from a CPU build (%.1f s%s)",
            config.model_type,
            len(names),
            ", ".join(names[:4]) + (", ..." if len(names) > 4 else ""),
            time.perf_counter() - start,
            f", on rank 0 for all {world} ranks" if world > 1 else "",
        )
        with torch.no_grad():
            for name in names:
                tensor = tensors[name]
                tensor.copy_(torch.where(torch.isnan(tensor), reference[name].to(tensor), tensor))
    if world > 1:
        for name in names:
            dist.broadcast(tensors[name].detach(), src=0)


def _constructed(*, config, seed: int) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of the model as the family's own constructor builds it on the CPU under
    ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            return dict(_floating_tensors(_transformers().AutoModelForCausalLM.from_config(config)))


def count_parameters(model: nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once), optionally without the input embedding."""
    seen, total = set(), 0
    embedding = model.get_input_embeddings() if exclude_embeddings else None
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
