"""Pipeline parallel with `torch.distributed.pipelining`: stage split, schedules, and a one-step function.

A stage is a copy of the whole model with the blocks of other stages deleted (and the embedding / final norm
/ head dropped where they do not belong), so parameter names stay those of the unsplit model and checkpoints
need no renaming. Blocks live in a `ModuleDict` keyed by their original index. Each stage is then
parallelised like a whole model (TP -> AC -> compile -> FSDP) by the caller.

Schedules: "GPipe", "1F1B" (one stage per rank) and "Interleaved1F1B" (`stages_per_rank` stages per rank,
looped). The loss of each micro-batch is its token-loss sum divided by the step's global valid-token count,
and the schedule does not rescale gradients, so a pipelined step equals an unpipelined one.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from flame_gin import families
from flame_gin.parallel import fsdp

# torch's schedule classes by name; torch.distributed.pipelining (which imports torch._dynamo, about a second)
# is imported only when a pipeline is built.
SCHEDULES = {"GPipe": "ScheduleGPipe", "1F1B": "Schedule1F1B", "Interleaved1F1B": "ScheduleInterleaved1F1B"}


def stage_layer_ranges(
    *, num_layers: int, num_stages: int, split_points: list[int] | None = None
) -> list[tuple[int, int]]:
    """[start, end) block indices of each stage. `split_points`: first block of every stage after the first
    (e.g. [4, 8, 12] for 4 stages of a 16-block model); default: as even as possible."""
    if num_stages < 1 or num_stages > num_layers:
        raise ValueError(f"pipeline: {num_stages} stages for {num_layers} blocks (need 1 <= stages <= blocks)")
    if split_points is None:
        base, extra = divmod(num_layers, num_stages)
        sizes = [base + (1 if i < extra else 0) for i in range(num_stages)]
        split_points = [sum(sizes[:i]) for i in range(1, num_stages)]
    points = list(split_points)
    if (
        len(points) != num_stages - 1
        or points != sorted(set(points))
        or (points and not 0 < points[0] <= points[-1] < num_layers)
    ):
        raise ValueError(
            f"pipeline: split_points={split_points} must be {num_stages - 1} increasing block indices "
            f"in (0, {num_layers})"
        )
    bounds = [0, *points, num_layers]
    return [(bounds[i], bounds[i + 1]) for i in range(num_stages)]


def _stage_forward(self, x):
    """Forward of one stage: token ids (first stage) or hidden states in; hidden states or logits out."""
    inner = families.body(self)
    embed = families.embedding_name(inner)
    h = getattr(inner, embed)(x) if embed is not None else x
    extra = {}
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None:
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        extra["position_embeddings"] = rotary(h, position_ids=positions)
    for block in inner.layers.values():
        out = block(h, **extra)
        h = out[0] if isinstance(out, tuple) else out
    if self.lm_head is not None:
        h = self.lm_head(getattr(inner, families.final_norm_name(inner))(h))
    return h


def split_model(model: nn.Module, *, ranges: list[tuple[int, int]], stage_ids: list[int]) -> list[nn.Module]:
    """Stage modules for `stage_ids` (this rank's stages) of a model split at `ranges`."""
    stages = []
    last = len(ranges) - 1
    for sid in stage_ids:
        start, end = ranges[sid]
        stage = copy.deepcopy(model)
        inner = getattr(stage, families.body_name(stage))
        inner.layers = nn.ModuleDict({str(i): inner.layers[i] for i in range(start, end)})
        if sid != 0:
            setattr(inner, families.embedding_name(inner), None)
        if sid != last:
            setattr(inner, families.final_norm_name(inner), None)
            stage.lm_head = None
        stage.forward = types.MethodType(_stage_forward, stage)
        stages.append(stage)
    return stages


@dataclasses.dataclass
class PipelineRuntime:
    """What the trainer needs: this rank's stages as one module under the unsplit model's names (``model``, for
    the optimizer, clipping and checkpoints), and what `pipeline_step` needs: the stage modules, the schedule,
    and whether this rank owns the loss."""

    model: nn.Module
    stages: list[nn.Module]
    schedule: object
    has_first: bool
    has_last: bool
    group: object
    _tokens: list


def build_pipeline(
    model: nn.Module,
    *,
    pp_mesh,
    microbatches: int,
    schedule: str = "1F1B",
    stages_per_rank: int = 1,
    split_points: list[int] | None = None,
    parallelize_stage=None,
    stage_mesh=None,
    device: torch.device | str = "cpu",
    token_loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> PipelineRuntime:
    """Splits `model` over `pp_mesh`, parallelises each stage with `parallelize_stage(module) -> module`
    (e.g. `functools.partial(parallelize, dims=..., mesh=...)`), and builds the schedule. A stage left with
    plain parameters becomes FSDP over this rank alone when `stage_mesh` (a one-rank mesh, the trainer's
    ``dp_shard_cp``) is given, so each rank's checkpoint writes its own stage. The last stage's
    loss is `token_loss_sum(logits, labels)` (the trainer passes `flame_gin.loss.token_loss_sum` with the
    run's kernel choice), divided by the step's global valid-token count."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline: schedule={schedule!r}; expected one of {sorted(SCHEDULES)}")
    if schedule != "Interleaved1F1B" and stages_per_rank != 1:
        raise ValueError(
            f"pipeline: schedule {schedule} runs one stage per rank, got stages_per_rank={stages_per_rank}"
        )
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    num_stages = pp * stages_per_rank
    if microbatches < pp:
        raise ValueError(f"pipeline: microbatches={microbatches} must be >= pp={pp}")
    ranges = stage_layer_ranges(
        num_layers=len(families.blocks(model)), num_stages=num_stages, split_points=split_points
    )
    stage_ids = [rank + i * pp for i in range(stages_per_rank)]  # looped placement
    modules = split_model(model, ranges=ranges, stage_ids=stage_ids)
    if parallelize_stage is not None:
        modules = [parallelize_stage(m) for m in modules]
    if stage_mesh is not None:
        modules = [shard_plain_stage(m, mesh=stage_mesh) for m in modules]
    for module in modules:
        module.train()
    from torch.distributed import pipelining
    from torch.distributed.pipelining import PipelineStage

    group = pp_mesh.get_group()
    stages = [
        PipelineStage(m, sid, num_stages, torch.device(device), group=group) for m, sid in zip(modules, stage_ids)
    ]
    tokens: list = [None]

    def loss_fn(logits, labels):
        return token_loss_sum(logits, labels) / tokens[0]

    cls = getattr(pipelining.schedules, SCHEDULES[schedule])
    sched = cls(
        stages if schedule == "Interleaved1F1B" else stages[0],
        n_microbatches=microbatches,
        loss_fn=loss_fn,
        scale_grads=False,
    )
    return PipelineRuntime(
        model=stage_union(modules),
        stages=modules,
        schedule=sched,
        has_first=0 in stage_ids,
        has_last=num_stages - 1 in stage_ids,
        group=group,
        _tokens=tokens,
    )


def pipeline_step(
    runtime: PipelineRuntime, *, input_ids: torch.Tensor, labels: torch.Tensor, global_tokens: torch.Tensor
) -> torch.Tensor:
    """Runs forward and backward of one batch (split into the runtime's micro-batches) and returns this
    data shard's loss share (sum over micro-batches of token-loss sum / `global_tokens`), the same on every
    pipeline rank. Gradients are left in the stage parameters for the optimizer."""
    runtime._tokens[0] = global_tokens.clamp_min(1).to(torch.float32)
    losses: list = []
    kwargs = {"target": labels, "losses": losses} if runtime.has_last else {}
    args = (input_ids,) if runtime.has_first else ()
    runtime.schedule.step(*args, **kwargs)
    if losses:
        total = torch.stack([part.detach().float() for part in losses]).sum()
    else:  # a stage before the last: its share is zero, on the device the all-reduce runs on
        total = torch.zeros((), device=global_tokens.device)
    total = total.reshape(()).clone()
    dist.all_reduce(total, group=runtime.group)
    return total


class _StageUnion(nn.Module):
    """Several stages of one rank as one module (parameters and state dict only; never called)."""

    def get_input_embeddings(self):
        inner = families.body(self)
        name = families.embedding_name(inner)
        return getattr(inner, name) if name is not None else None

    def get_output_embeddings(self):
        return getattr(self, "lm_head", None)


def stage_union(stages: list[nn.Module]) -> nn.Module:
    """One module holding this rank's pipeline stages (shared, not copied) under the unsplit model's names
    (the body's embedding, ``layers.<i>`` and final norm, ``lm_head``), for the optimizer, clipping and
    checkpoints. A single stage already has those names and is returned as is."""
    if len(stages) == 1:
        return stages[0]
    prefix = families.body_name(stages[0])
    union, inner = _StageUnion(), nn.Module()
    union.config, union.base_model_prefix = stages[0].config, prefix
    setattr(union, prefix, inner)
    inner.layers = nn.ModuleDict()
    for stage in stages:
        for name, child in families.body(stage).named_children():
            if name == "layers":
                for index, block in child.items():
                    inner.layers[index] = block
            elif child is not None:
                setattr(inner, name, child)
        for name, child in stage.named_children():
            if name != prefix and child is not None:
                setattr(union, name, child)
    return union


def shard_plain_stage(stage: nn.Module, *, mesh) -> nn.Module:
    """A stage with plain (unsharded) parameters becomes an FSDP module over this rank alone (``mesh``: a
    one-rank mesh), so the checkpointer, which writes a plain tensor from the first rank only, lets every
    pipeline rank write its own stage's arrays. No data is exchanged."""
    from torch.distributed.tensor import DTensor

    if mesh.size() != 1 or any(isinstance(p, DTensor) for p in stage.parameters()):
        return stage
    return fsdp.apply_data_parallel(
        stage, mesh=mesh, mode="fsdp", blocks=list(families.blocks(stage).values()), reshard_after_forward=False
    )


def stage_local_optimizer_state(optimizer, *, mesh) -> None:
    """Lets every pipeline stage's optimizer state reach the checkpoint.

    The optimizer's per-parameter ``step`` counters are plain tensors even under FSDP, and the checkpointer
    writes a plain tensor from the first rank only, which holds none of the other stages' parameters. In the
    state dict handed out they become DTensors replicated over ``mesh`` (the ranks of this pipeline stage:
    every non-pipeline dimension), so one rank per stage writes them; a state dict loaded back gets plain
    tensors again.
    """
    from torch.distributed.tensor import DTensor, Replicate

    def to_stage(_, state_dict):
        for per_param in state_dict["state"].values():
            for key, value in per_param.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor):
                    per_param[key] = DTensor.from_local(
                        value, device_mesh=mesh, placements=[Replicate()] * mesh.ndim, run_check=False
                    )
        return state_dict

    def to_local(_, state_dict):
        for per_param in state_dict["state"].values():
            for key, value in per_param.items():
                if isinstance(value, DTensor) and all(p.is_replicate() for p in value.placements):
                    per_param[key] = value.to_local()
        return state_dict

    optimizer.register_state_dict_post_hook(to_stage)
    optimizer.register_load_state_dict_pre_hook(to_local)
