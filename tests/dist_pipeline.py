"""Worker: pipelined (optionally x FSDP) training steps must match a single-process model."""

from __future__ import annotations

import functools

import dist_models
import torch
import torch.distributed as dist
from dist_equivalence import ATOL, RTOL, _clean, _full

from flame_gin.loss import global_valid_tokens, token_loss_sum
from flame_gin.mesh import ParallelDims
from flame_gin.parallel import parallelize
from flame_gin.parallel.pipeline import build_pipeline, pipeline_step


def check(rank, world, family, dims_kwargs, schedule, stages_per_rank=1, microbatches=2, rows=4, seq=16, steps=2):
    dims = ParallelDims(world_size=world, **dims_kwargs)
    mesh = dims.build(device_type="cpu")
    ref = dist_models.build(family, layers=4)
    dims.validate_for_model(config=ref.config)
    runtime = build_pipeline(
        ref,
        pp_mesh=mesh["pp"],
        microbatches=microbatches,
        schedule=schedule,
        stages_per_rank=stages_per_rank,
        parallelize_stage=functools.partial(parallelize, dims=dims, mesh=mesh),
        token_loss_sum=lambda logits, labels: token_loss_sum(logits=logits, labels=labels, fused=False),
    )
    params = [p for m in runtime.stages for p in m.parameters()]
    opt_par = torch.optim.SGD(params, lr=0.5)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    dp_rank, per = dims.dp_rank(rank=rank), rows // dims.dp_size
    for step in range(steps):
        ids, labels = dist_models.batch(rows=rows, seq=seq, seed=step + 1)
        opt_ref.zero_grad()
        ref_loss = token_loss_sum(logits=ref(input_ids=ids).logits, labels=labels, fused=False) / (labels != -100).sum()
        ref_loss.backward()
        opt_par.zero_grad()
        sl = slice(dp_rank * per, (dp_rank + 1) * per)
        count = global_valid_tokens(labels=labels[sl], group=mesh["dp_cp"].get_group())
        share = pipeline_step(runtime, input_ids=ids[sl], labels=labels[sl], global_tokens=count)
        dist.all_reduce(share, group=mesh["dp_cp"].get_group())
        assert abs(float(share) - float(ref_loss)) < 1e-5, (step, float(share), float(ref_loss))
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        for module in runtime.stages:
            for name, p in module.named_parameters():
                torch.testing.assert_close(
                    _full(p.grad),
                    ref_grads[_clean(name)],
                    atol=ATOL,
                    rtol=RTOL,
                    msg=lambda m: f"step {step} grad {name}: {m}",
                )
        opt_ref.step()
        opt_par.step()
