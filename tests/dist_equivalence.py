"""Worker: a parallelised model must match a single-process model (losses, gradients, SGD updates)."""

from __future__ import annotations

import contextlib
import copy

import dist_models
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from flame_gin.loss import global_valid_tokens, normalized_loss, reduce_for_logging, token_loss_sum
from flame_gin.mesh import ParallelDims
from flame_gin.parallel import parallelize
from flame_gin.parallel.context import context_parallel, enable_context_parallel, shard_batch

ATOL, RTOL = 2e-5, 2e-4


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


VARLEN_CUTS = ([0, 10, 16, 27, 32], [0, 5, 21, 32])  # a document starting at the cp split; one crossing it


def check(rank, world, family, dims_kwargs, par_kwargs, rows=4, seq=32, steps=2, model_kwargs=None, varlen=False):
    dims = ParallelDims(world_size=world, **dims_kwargs)
    mesh = dims.build(device_type="cpu")
    model_kwargs = model_kwargs or {}
    ref = dist_models.build(family, **model_kwargs)
    dims.validate_for_model(config=ref.config)
    par = copy.deepcopy(ref)
    if dims.cp > 1:
        enable_context_parallel(par)
    par = parallelize(par, dims=dims, mesh=mesh, **par_kwargs)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt_par = torch.optim.SGD(par.parameters(), lr=0.5)
    dp_rank, per = dims.dp_rank(rank=rank), rows // dims.dp_size
    dp_cp = mesh["dp_cp"].get_group()
    for step in range(steps):
        ids, labels = dist_models.batch(rows=rows, seq=seq, seed=step + 1)
        cu = torch.tensor(VARLEN_CUTS[step % 2], dtype=torch.int32) if varlen else None
        extra = {"cu_seqlens": cu} if varlen else {}
        # reference: the whole global batch in one process
        opt_ref.zero_grad()
        ref_logits = ref(input_ids=ids, **extra).logits
        ref_loss = token_loss_sum(logits=ref_logits, labels=labels, fused=False) / (labels != -100).sum()
        ref_loss.backward()
        # parallel: this rank's data shard
        opt_par.zero_grad()
        local_ids, local_labels = ids[dp_rank * per : (dp_rank + 1) * per], labels[dp_rank * per : (dp_rank + 1) * per]
        scope, kwargs = contextlib.nullcontext(), dict(extra)
        if dims.cp > 1:
            local = shard_batch(input_ids=local_ids, labels=local_labels, cu_seqlens=cu, cp_mesh=mesh["cp"])
            local_ids, local_labels, scope = local["input_ids"], local["labels"], context_parallel(local["cp"])
            kwargs = {"cu_seqlens": local["cu_seqlens"]} if varlen else {}
        count = global_valid_tokens(labels=local_labels, group=dp_cp)
        with scope:
            logits = par(input_ids=local_ids, **kwargs).logits
        share = normalized_loss(logits=logits, labels=local_labels, global_tokens=count, fused=False)
        share.backward()
        got = reduce_for_logging(loss_share=share, group=dp_cp)
        assert abs(got - float(ref_loss)) < 1e-5, (step, got, float(ref_loss))
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        seen = 0
        for name, p in par.named_parameters():
            name = _clean(name)
            assert p.grad is not None, f"no gradient for {name}"
            grad = _full(p.grad)
            torch.testing.assert_close(
                grad, ref_grads[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"step {step} grad {name}: {m}"
            )
            # relative to the gradient's own size too: a doubled gradient of size 1e-6 passes atol alone
            err, size = float((grad - ref_grads[name]).norm()), float(ref_grads[name].norm())
            assert err <= 1e-3 * size + 1e-9, f"step {step} grad {name}: |diff| {err:.3g} against |grad| {size:.3g}"
            seen += 1
        assert seen == len(ref_grads), (seen, len(ref_grads))
        opt_ref.step()
        opt_par.step()
    for name, p in par.named_parameters():
        torch.testing.assert_close(
            _full(p.detach()), dict(ref.named_parameters())[_clean(name)].detach(), atol=ATOL, rtol=RTOL
        )
    dist.barrier()
