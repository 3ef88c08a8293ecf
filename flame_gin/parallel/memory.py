"""Per-rank memory estimate of a model on a mesh and batch, before the first step (no real allocation).

Parameters, gradients and optimizer states come from the parameter count and the sharding degrees; the
activations saved for backward are measured by running one block forward on the `meta` device with a
saved-tensor hook (works wherever the block's ops have meta implementations; on ops without one, such as
Triton kernels, the activation figure is reported as unknown rather than guessed). Activations are measured
on the full (tensor-unsharded) block, so with tp > 1 they are an upper bound.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

from flame_gin import families
from flame_gin.mesh import ParallelDims, local_tensor

log = logging.getLogger(__name__)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024**3


def _block_activation_bytes(
    block: nn.Module, *, batch: int, seq: int, hidden: int, dtype: torch.dtype, rotary: nn.Module | None
) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.empty(batch, seq, hidden, device="meta", dtype=dtype, requires_grad=True)
    extra = {}
    if rotary is not None:  # softmax-attention blocks take position embeddings from the model
        extra["position_embeddings"] = rotary(x, position_ids=torch.arange(seq, device="meta").unsqueeze(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, **extra)
    return total


@contextlib.contextmanager
def _no_triton_launch():
    """While the block runs on meta, a Triton launch raises instead of reaching the device.

    Why: a Triton kernel handed a meta tensor gets a null pointer and faults a GPU, an illegal memory access
    that poisons the process; a layer may pick a Triton path the caller did not foresee (FLA's GLA takes its
    fused recurrent kernel for sequences of at most 64 tokens). Every launch (``kernel[grid](...)``, autotuned
    or not) goes through ``KernelInterface.__getitem__``; without Triton there is nothing to guard."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        yield
        return
    original = KernelInterface.__getitem__

    def refuse(kernel, grid):
        while hasattr(kernel, "fn"):  # heuristics -> autotuner -> jit function -> the Python function
            kernel = kernel.fn
        name = getattr(kernel, "__name__", type(kernel).__name__)
        raise RuntimeError(f"the block launches the Triton kernel {name}, which cannot run on meta tensors")

    KernelInterface.__getitem__ = refuse
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


def estimate_memory(
    *,
    model: nn.Module,
    dims: ParallelDims,
    local_batch: int,
    seq_len: int,
    param_dtype: str = "bfloat16",
    optimizer_states: int = 2,
    activation_checkpointing: str = "none",
    run_blocks: bool = True,
) -> dict:
    """GiB per rank: `params` (fp32 shards), `grads`, `optimizer`, `gathered` (one block unsharded in
    `param_dtype`), `activations` (None when unmeasurable) and `total`, under `activation_checkpointing`
    ("none" or "full"); `estimate_memory_modes` says how activations are measured."""
    return estimate_memory_modes(
        model=model,
        dims=dims,
        local_batch=local_batch,
        seq_len=seq_len,
        modes=(activation_checkpointing,),
        param_dtype=param_dtype,
        optimizer_states=optimizer_states,
        run_blocks=run_blocks,
    )[activation_checkpointing]


def estimate_memory_modes(
    *,
    model: nn.Module,
    dims: ParallelDims,
    local_batch: int,
    seq_len: int,
    modes: tuple[str, ...] = ("none", "full"),
    param_dtype: str = "bfloat16",
    optimizer_states: int = 2,
    run_blocks: bool = True,
) -> dict[str, dict]:
    """`estimate_memory`'s figures for each activation checkpointing mode of `modes`, from one probe of the
    block (seconds on a CPU for a 1B model). `model` may live on `meta`.

    Activations are measured by running one block on meta tensors; `run_blocks=False` skips that, which the
    caller must do when the block would launch GPU kernels (FLA's Triton kernels take a meta tensor's null
    pointer and fault the device: an illegal memory access that poisons the whole process).
    """
    blocks = list(families.blocks(model))
    n_params = sum(p.numel() for p in model.parameters())
    shard = dims.dp_shard * dims.cp * dims.tp * dims.pp
    per_rank = n_params / shard
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks) / dims.tp
    base = {
        "params": per_rank * 4 / GIB,
        "grads": per_rank * 4 / GIB,
        "optimizer": per_rank * 4 * optimizer_states / GIB,
        "gathered": 2 * block_params * _BYTES[param_dtype] / GIB,
    }
    seq = seq_len // dims.cp
    hidden = model.config.hidden_size
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[param_dtype]
    try:
        if not run_blocks:
            raise RuntimeError("the block's kernels do not run on meta tensors")
        meta_block = (
            blocks[0].to_empty(device="meta") if next(blocks[0].parameters()).device.type != "meta" else blocks[0]
        )
        rotary = getattr(families.body(model), "rotary_emb", None)
        with _no_triton_launch():
            per_block = _block_activation_bytes(
                meta_block.to(dtype),
                batch=local_batch,
                seq=seq,
                hidden=hidden,
                dtype=dtype,
                rotary=rotary.to_empty(device="meta") if rotary else None,
            )
    except Exception as err:  # an op without a meta kernel (e.g. a Triton kernel)
        log.info("memory estimate: activations not measurable on meta: %s", err)
        per_block = None
    layers_here = -(-len(blocks) // dims.pp)
    logits = local_batch * seq * model.config.vocab_size / dims.tp * 4 * 2
    estimates = {}
    for mode in modes:
        out = dict(base, activations=None)
        if per_block is not None:
            if mode == "full":
                kept = layers_here * local_batch * seq * hidden * _BYTES[param_dtype] + per_block
            else:
                kept = layers_here * per_block
            out["activations"] = (kept + logits) / GIB
        out["total"] = sum(v for v in out.values() if v is not None)
        estimates[mode] = out
    return estimates


def format_estimate(estimate: dict, *, compiled: bool = False, checkpointed: dict | None = None) -> str:
    """One log line. `compiled`: the blocks will be compiled, so the activation figure (saved tensors of the
    uncompiled block) is an upper bound, and the line says so rather than presenting it as a forecast.
    `checkpointed`: the same estimate with every block checkpointed, added so that a run too large without
    activation checkpointing (a 1B model at 16 x 2048 on one 80 GB GPU) shows what checkpointing leaves."""
    parts = [f"{k}={v:.3f}" if v is not None else f"{k}=unknown" for k, v in estimate.items()]
    line = "memory estimate per rank (GiB): " + ", ".join(parts)
    if checkpointed is not None and checkpointed.get("activations") is not None:
        line += (
            f"; with every block checkpointed: activations={checkpointed['activations']:.3f}, "
            f"total={checkpointed['total']:.3f}"
        )
    if compiled and estimate.get("activations") is not None:
        line += (
            " (activations and total are upper bounds: measured on the uncompiled block, whose unfused ops "
            "save more than inductor's compiled graph does)"
        )
    return line


def device_state_bytes(*, model: nn.Module, device_type: str, optimizer_states: int) -> tuple[int, int]:
    """(parameters, bytes) that this rank's parameters, their gradients and ``optimizer_states`` optimizer
    tensors per parameter (AdamW: 2) will hold on devices of ``device_type``, before any activation.

    Counted from the parameters as placed, so it is exact where the estimate above is arithmetic: a sharded
    parameter (FSDP's DTensor) counts its local shard, and one that FSDP's CPU offload keeps on the host counts
    nothing on the GPU. Gradients and optimizer states take the parameter's dtype (torch's AdamW does)."""
    count = nbytes = 0
    for param in model.parameters():
        local = local_tensor(param)
        if local.device.type == device_type:
            count += local.numel()
            nbytes += local.numel() * local.element_size() * (2 + optimizer_states)
    return count, nbytes


def check_states_fit(*, model: nn.Module, device: torch.device, capacity_bytes: int, optimizer_states: int) -> None:
    """Raises ValueError when the parameters, gradients and optimizer states alone exceed the device.

    Why: such a run builds, spends minutes autotuning FLA's kernels on its first forward, and only runs out of
    memory at the first optimizer step, when the states are allocated; no activation checkpointing can save it.
    Called once the model is placed and before the optimizer exists."""
    count, need = device_state_bytes(model=model, device_type=device.type, optimizer_states=optimizer_states)
    if need > capacity_bytes:
        raise ValueError(
            f"{count:,} parameters on this rank with their gradients and {optimizer_states} optimizer states each "
            f"need {need / GIB:.1f} GiB on {device}, which has {capacity_bytes / GIB:.1f} GiB in all, before any "
            "activation: shard them over more GPUs (gin/parallel/fsdp.gin), keep them on the host with FSDP's "
            "offload (gin/parallel/fsdp.gin, or gin/parallel/fsdp_one_gpu.gin under torchrun --nproc_per_node=1 on "
            "one GPU, plus --gin.flame_gin.parallelize.cpu_offload=True), or train a smaller model"
        )


def check_host_fits(
    *, model: nn.Module, optimizer_states: int, available_bytes: int, local_ranks: int, pinned_gradients: bool = False
) -> None:
    """Raises ValueError when the gradients and optimizer states that FSDP's CPU offload will add on the host
    exceed what the host has left (``local_ranks`` processes of this node each add their share).

    Why: they are allocated at the first backward and the first optimizer step, after minutes of autotuning,
    and a host out of memory ends the run by the kernel's kill: no message, nothing saved. Called once the
    model is placed (the offloaded parameters themselves are already on the host) and before the optimizer.
    ``pinned_gradients`` (a GPU run: FSDP copies the gradients into pinned memory) counts each gradient at its
    size rounded up to a power of two, the blocks torch's pinned host allocator hands out: for GLA-7B that is
    7.9 GiB more than the gradients' own 25.1 GiB, and on one H100 host the run took 9.3 GiB more than the
    plain count (benchmarks/RESULTS.md, tenth round)."""
    held = [t for t in map(local_tensor, model.parameters()) if t.device.type == "cpu"]
    count = sum(t.numel() for t in held)
    if not count:  # nothing offloaded
        return
    sizes = [t.numel() * t.element_size() for t in held]
    nbytes = sum(sizes) * (2 + optimizer_states)
    grads = sum((1 << (n - 1).bit_length()) if pinned_gradients and n else n for n in sizes)
    still = grads + optimizer_states * sum(sizes)  # each parameter's own bytes are already held
    log.info(  # the start-up estimate counted these as the rank's device memory
        "FSDP's CPU offload: %s parameters with their gradients and %d optimizer states each take %.1f GiB "
        "of the host's memory on this rank (%.1f GiB free)",
        f"{count:,}",
        optimizer_states,
        nbytes / GIB,
        available_bytes / GIB,
    )
    if still * local_ranks > available_bytes:
        raise ValueError(
            f"FSDP's CPU offload keeps {count:,} parameters of this rank on the host; their gradients and "
            f"{optimizer_states} optimizer states each will add {still / GIB:.1f} GiB there ({local_ranks} rank(s) "
            f"on this host: {still * local_ranks / GIB:.1f} GiB), but it has {available_bytes / GIB:.1f} GiB left "
            "(available memory and free swap): the run would be killed at its first step. Spread the model over "
            "more GPUs or hosts (each rank offloads only its shard), or train a smaller model"
        )
