"""Model builder: any FLA causal-LM family, or HF Llama (SDPA) as the softmax baseline.

Why a builder of our own: FLA and HF config classes take ``**kwargs`` and silently keep any key, so a typo
in a gin file (``num_head = 8``) would train the wrong model without a word. ``build_config`` rejects every key
the config class does not declare and lists the valid ones. Models are first built on the meta device (cheap,
so parameter counts, FLOPs and memory estimates cost nothing), then materialised on the target device and
initialised with the family's own initialiser under a fixed seed.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Mapping

import torch
from torch import nn
import transformers

_BASELINE_FAMILIES = {"llama": transformers.LlamaConfig}
_CUSTOM_FAMILIES: dict[str, type] = {}


def _fla_families() -> dict[str, type]:
  """Maps each FLA model_type (``gla``, ``delta_net``, ...) to its config class, as FLA registers them."""
  import fla.models  # noqa: F401  (registers FLA configs and models with transformers' Auto classes)

  families = {}
  for name in dir(fla.models):
    obj = getattr(fla.models, name)
    if isinstance(obj, type) and name.endswith("Config") and getattr(obj, "model_type", None):
      families[obj.model_type] = obj
  return families


def families() -> dict[str, type]:
  """All known families: FLA's, the softmax baseline and the user-registered ones, name -> config class."""
  return {**_fla_families(), **_BASELINE_FAMILIES, **_CUSTOM_FAMILIES}


def register_family(*, name: str, config_class: type, model_class: type) -> None:
  """Registers a family FLA does not ship (a config class and a causal-LM class) under ``name``.

  After this, ``family = "<name>"`` in a gin file builds it like any FLA model. The config class must set
  ``model_type = name``; both classes are registered with transformers' Auto classes so export and reload work.
  """
  if getattr(config_class, "model_type", None) != name:
    raise ValueError(
        f"register_family: {config_class.__name__}.model_type is {getattr(config_class, 'model_type', None)!r}, "
        f"expected {name!r}")
  if name not in _CUSTOM_FAMILIES:
    transformers.AutoConfig.register(name, config_class, exist_ok=True)
    transformers.AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
  _CUSTOM_FAMILIES[name] = config_class


def valid_config_keys(config_class: type) -> set[str]:
  """Keys a config class really understands: its constructor's named arguments and its default attributes."""
  params = {
      n for n, p in inspect.signature(config_class.__init__).parameters.items()
      if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
  }
  return params | set(config_class().to_dict())


def build_config(*, family: str, overrides: Mapping[str, Any] | None = None,
                 extra_overrides: Mapping[str, Any] | None = None) -> transformers.PretrainedConfig:
  """Builds the config of ``family`` with ``overrides``; unknown families or keys are a ``ValueError``.

  ``extra_overrides`` is applied on top of ``overrides``: a gin dict binding replaces the whole dict, so an
  ablation file changes one model key with ``flame_gin.model_config.extra_overrides = {'key': value}`` and
  leaves the family file's ``overrides`` alone.
  """
  known = families()
  if family not in known:
    raise ValueError(f"Unknown model family {family!r}. Known families: {', '.join(sorted(known))}")
  config_class = known[family]
  overrides = {**(overrides or {}), **(extra_overrides or {})}
  valid = valid_config_keys(config_class)
  unknown = sorted(set(overrides) - valid)
  if unknown:
    hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
    hint_text = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
    raise ValueError(
        f"Unknown key(s) for model family {family!r} ({config_class.__name__}): {hint_text}. "
        f"Valid keys: {', '.join(sorted(valid))}")
  if family in _BASELINE_FAMILIES:
    overrides.setdefault("attn_implementation", "sdpa")
  config = config_class(**overrides)
  if family in _BASELINE_FAMILIES:
    config._attn_implementation = "sdpa"  # FLA's own transformer needs flash-attn; the baseline uses SDPA.
  return config


def build_meta_model(*, config: transformers.PretrainedConfig) -> nn.Module:
  """The model with every tensor on the meta device: no memory, exact shapes (for counts and estimates)."""
  with torch.device("meta"):
    return transformers.AutoModelForCausalLM.from_config(config)


def materialize(*, model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
  """Allocates a meta model's storage on ``device`` and initialises it, identically for a given seed.

  Modules' own ``reset_parameters`` run first (norm weights to one, biases), then the family's
  ``init_weights`` (HF/FLA initialisation of linear and embedding weights, tying, rotary buffers).
  """
  model.to_empty(device=device)
  with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
    torch.manual_seed(seed)
    for module in model.modules():
      reset = getattr(module, "reset_parameters", None)
      if callable(reset) and module is not model:
        reset()
    model.init_weights()
  return model


def build_model(*, config: transformers.PretrainedConfig, device: torch.device | str, seed: int) -> nn.Module:
  """Meta build, then materialisation on ``device`` with the seeded initialiser."""
  return materialize(model=build_meta_model(config=config), device=device, seed=seed)


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


def supports_varlen(config: transformers.PretrainedConfig) -> bool:
  """Whether the family's layers honour ``cu_seqlens`` (documents never see each other when packed).

  FLA's linear-attention layers take ``cu_seqlens`` through the model's keyword arguments; the HF baseline
  and recurrent families whose layers drop it would leak state across documents, so they must refuse varlen.
  """
  return config.model_type in _VARLEN_FAMILIES


_VARLEN_FAMILIES = frozenset({
    # Checked against FLA 0.6's layers: each passes cu_seqlens to its ops, convolutions and token shifts.
    # (abc raises on cu_seqlens; Mamba/Mamba2/Samba layers ignore it; transformer/path_attn need flash-attn.)
    "gla", "delta_net", "gated_deltanet", "gsa", "hgrn2", "hgrn", "retnet", "rwkv6", "rwkv7", "linear_attn",
    "comba", "kda", "gated_deltaproduct", "mesa_net", "lightnet",
})
