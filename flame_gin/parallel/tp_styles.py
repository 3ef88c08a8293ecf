"""`LocalCompute`: the tensor-parallel style for modules that FLA runs with fused kernels on its own weights.

Why its own style: torch's column- and row-wise styles cover `nn.Linear` only. FLA's RMSNorm with residual,
gated per-head norms, short convolutions and per-head decay parameters read their weights inside Triton kernels,
so they must see plain local tensors; their weights still live as DTensors on the tensor-parallel mesh (so
`clip_grad_norm_` and FSDP see one kind of tensor), and a replicated weight's gradient is summed over the mesh
when each rank saw only part of the activations (its sequence shard or its heads).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


class _ReplicatedToLocal(torch.autograd.Function):
    """Local view of a replicated DTensor weight whose backward sums the per-rank partial gradients."""

    @staticmethod
    def forward(ctx, weight: DTensor):
        ctx.mesh = weight.device_mesh
        return weight.to_local().view_as(weight.to_local())

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.mesh.get_group())
        return DTensor.from_local(grad, ctx.mesh, [Replicate()], run_check=False)


class LocalCompute(ParallelStyle):
    """Runs a module on local tensors with its parameters held as DTensors on the tensor-parallel mesh.

    `shard_params` names parameters sharded on dim 0 (per-channel or per-head); all others are replicated.
    `partial_grads`: the module sees only part of the activations (sequence or head shard), so replicated
    weight gradients are summed across ranks. `gather_sequence`: the first input (positional or
    `hidden_states`/`x`) arrives sequence-sharded and is all-gathered on dim 1 first. `local_counts` names
    attributes holding per-head sizes that the module uses to shape its local tensors (a head count, a channel
    count); each is divided by the mesh size, so the module sees its rank's share. `include` names submodules
    whose parameters (all of them, replicated unless in `shard_params`) the module reads directly, without
    calling them (FLA's RWKV-6 reads `x_proj[2].weight` in its own einsum). `scatter_sequence`: the module
    computes its output on the full sequence, identical on every rank, and the next module takes its rank's
    sequence shard (the first output, split on dim 1; its gradient is gathered back, so nothing is partial).
    `shard_kwargs` names keyword inputs that arrive whole over a per-head last dimension (HGRN2's per-layer
    forget-gate floor): the module takes its rank's slice.
    """

    def __init__(
        self,
        *,
        shard_params: tuple[str, ...] = (),
        partial_grads: bool = False,
        gather_sequence: bool = False,
        recurse: bool = True,
        local_counts: tuple[str, ...] = (),
        include: tuple[str, ...] = (),
        scatter_sequence: bool = False,
        shard_kwargs: tuple[str, ...] = (),
    ):
        super().__init__()
        self.shard_kwargs = tuple(shard_kwargs)
        self.include = tuple(include)
        self.scatter_sequence = scatter_sequence
        self.local_counts = tuple(local_counts)
        self.shard_params = tuple(shard_params)
        self.partial_grads = partial_grads
        self.gather_sequence = gather_sequence
        self.recurse = recurse

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for attr in self.local_counts:
            count, size = getattr(module, attr), device_mesh.size()
            if count % size:
                raise ValueError(f"tensor parallel: {type(module).__name__}.{attr}={count} does not split over {size}")
            setattr(module, attr, count // size)
        owners = list(module.named_modules()) if self.recurse else [("", module)]
        for name in self.include:
            owners += [(f"{name}.{p}" if p else name, sub) for p, sub in module.get_submodule(name).named_modules()]
        slots = []
        for prefix, sub in owners:
            for name, param in list(sub.named_parameters(recurse=False)):
                full = f"{prefix}.{name}" if prefix else name
                placement: Placement = (
                    Shard(0) if (name in self.shard_params or full in self.shard_params) else Replicate()
                )
                if not isinstance(param, DTensor):
                    dparam = nn.Parameter(
                        distribute_tensor(param.data, device_mesh, [placement]), requires_grad=param.requires_grad
                    )
                    for attr in ("_no_weight_decay",):
                        if hasattr(param, attr):
                            setattr(dparam, attr, getattr(param, attr))
                    sub.register_parameter(name, dparam)
                slots.append((sub, name, placement))
        saved: list = []
        partial = self.partial_grads
        gather = self.gather_sequence
        scatter = self.scatter_sequence
        shard_kwargs = self.shard_kwargs

        def pre_hook(mod, args, kwargs):
            saved.append([(sub, name, sub._parameters[name]) for sub, name, _ in slots])
            for sub, name, placement in slots:
                p = sub._parameters[name]
                if not isinstance(p, DTensor):
                    continue
                if isinstance(placement, Replicate) and partial and p.requires_grad:
                    local = _ReplicatedToLocal.apply(p)
                else:
                    local = p.to_local()
                sub._parameters[name] = local
            if gather:
                args, kwargs = _gather_first(args, kwargs, device_mesh)
            for key in shard_kwargs:
                if isinstance(kwargs.get(key), torch.Tensor):
                    kwargs = {**kwargs, key: kwargs[key].chunk(device_mesh.size(), -1)[device_mesh.get_local_rank()]}
            return args, kwargs

        def post_hook(mod, args, output):
            for sub, name, param in saved.pop():
                sub._parameters[name] = param
            if scatter:
                return _scatter_first(output, device_mesh)
            return output

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        module.register_forward_hook(post_hook)
        return module


def _scatter_first(output, mesh):
    def scatter(x):
        return DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()

    if isinstance(output, tuple):
        return (scatter(output[0]), *output[1:])
    return scatter(output)


def _gather_first(args, kwargs, mesh):
    def gather(x):
        if isinstance(x, DTensor):
            return x.redistribute(mesh, [Replicate()]).to_local()
        return DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()]).to_local()

    if args:
        return (gather(args[0]), *args[1:]), kwargs
    for key in ("hidden_states", "x"):
        if key in kwargs:
            return args, {**kwargs, key: gather(kwargs[key])}
    raise ValueError("LocalCompute(gather_sequence=True): module called without a hidden_states input")
