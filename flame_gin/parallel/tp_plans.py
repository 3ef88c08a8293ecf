"""Tensor parallel (head sharding, sequence parallel, loss parallel) applied to a model of the zoo.

The embedding, final norm and head are planned here; each block's layers by its family's plan in `tp_layers`
(a hybrid's softmax attention layers by theirs). Families without a plan are refused with the list of those
that have one, before anything is built.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from flame_gin import families
from flame_gin.parallel import tp_layers
from flame_gin.parallel.tp_styles import LocalCompute


def supported_families() -> tuple[str, ...]:
    return tuple(sorted(tp_layers.FAMILIES))


def check_tensor_parallel_config(*, config) -> None:
    """Raises for a family without a plan, or a config no plan shards; the trainer asks before building."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if model_type not in tp_layers.FAMILIES:
        raise ValueError(
            f"tensor parallel: no plan for model family {model_type!r}; families with a plan: "
            f"{', '.join(supported_families())}"
        )
    if getattr(config, "attnres_block_size", None) is not None:
        raise ValueError("tensor parallel: attnres_block_size is not supported")
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError(
            "tensor parallel: tie_word_embeddings=True is not supported (embedding is row-wise, lm_head column-wise)"
        )


def _model_parts(model: nn.Module):
    """The body, and the state-dict names of its embedding, final norm and blocks (a pipeline stage may lack
    the first two; `_exists` then leaves them out)."""
    prefix = families.body_name(model)
    inner = getattr(model, prefix)
    embed, norm = families.embedding_name(inner) or "embeddings", families.final_norm_name(inner) or "norm"
    return inner, f"{prefix}.{embed}", f"{prefix}.{norm}", f"{prefix}.layers"


def apply_tensor_parallel(
    model: nn.Module, *, tp_mesh: DeviceMesh, sequence_parallel: bool = True, loss_parallel: bool = True
) -> nn.Module:
    """Shards `model` (a causal LM with a body of blocks and `.lm_head`) over `tp_mesh` in place.

    With `loss_parallel`, logits stay vocabulary-sharded DTensors; compute the loss with
    `flame_gin.loss.token_loss_sum`, which enters torch's `loss_parallel` context for them.
    """
    check_tensor_parallel_config(config=model.config)
    model_type = model.config.model_type
    mixer, mlp, norms, mixer_plan, *rest = tp_layers.FAMILIES[model_type]
    mlp_plan = rest[0] if rest else tp_layers.gated_mlp_plan
    sp = sequence_parallel
    inner, embed, final_norm, layers = _model_parts(model)
    top = {
        embed: RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate()),
        final_norm: LocalCompute(partial_grads=sp),
        "lm_head": ColwiseParallel(
            input_layouts=Shard(1) if sp else Replicate(),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if getattr(inner, "lower_bounds", None) is not None:
        # HGRN2's per-layer forget-gate floors: whole on every rank, each rank's gradient only for its channels
        top[families.body_name(model)] = LocalCompute(partial_grads=True, recurse=False)
    top = {name: style for name, style in top.items() if _exists(model, name)}
    parallelize_module(model, tp_mesh, top)
    blocks = inner.layers.items() if isinstance(inner.layers, nn.ModuleDict) else enumerate(inner.layers)
    for i, block in blocks:
        prefix = f"{layers}.{i}"
        plan = {f"{prefix}.{n}": LocalCompute(partial_grads=sp) for n in norms if hasattr(block, n)}
        layer = getattr(block, mixer)
        layer_plan = tp_layers.softmax_attention_plan if tp_layers.is_softmax_attention(layer) else mixer_plan
        plan.update(layer_plan(layer, f"{prefix}.{mixer}", sp=sp))
        plan.update(mlp_plan(f"{prefix}.{mlp}", sp=sp, mlp=getattr(block, mlp)))
        parallelize_module(model, tp_mesh, plan)
    if sp and model_type == "llama":
        inner.register_forward_pre_hook(_full_positions, with_kwargs=True)
    return model


def _exists(model: nn.Module, name: str) -> bool:
    """Pipeline stages drop the embedding, final norm or head that belong to other stages."""
    obj = model
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True


def _full_positions(module, args, kwargs):
    """Under sequence parallel the embedding output is sequence-sharded; positions must cover the full length."""
    if kwargs.get("position_ids") is None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            kwargs = {**kwargs, "position_ids": torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)}
    return args, kwargs
