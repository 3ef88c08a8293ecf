"""The hand-written reference loop of the throughput benchmarks, the synthetic batches both loops read, and the
measures they share (steady-state rate, peak memory, the device's measured matrix-product peak).

Kept apart from `throughput.py` so that its plain loop (the FLA model from ``AutoModelForCausalLM.from_config``,
autocast bf16, fused AdamW, no compile, FLA's own loss) reads as what it is: the yardstick, not flame_gin.
"""

from __future__ import annotations

import gc
import sys
import time


class SyntheticLoader:
    """Endless random-token batches in the data loader's interface (iterator, state, vocabulary).

    ``varlen``: one row of ``batch_size * seq_len`` tokens cut into documents of random length, with
    ``cu_seqlens`` and the label at each document's end masked. Lengths are uniform in [seq_len / 8, seq_len], or,
    with ``doc_tokens`` > 0, uniform in [doc_tokens / 2, 3 doc_tokens / 2] and cut at ``seq_len``: a packed
    corpus's documents do not grow with the context, so comparing context lengths needs the second form. A few
    distinct batches are made once (pinned on GPU hosts) and cycled, so the loader costs nothing measurable.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        batch_size: int,
        seed: int,
        varlen: bool,
        distinct: int = 4,
        doc_tokens: int = 0,
    ):
        import torch

        self.vocab_size, self.tokens_per_source, self._i = vocab_size, {}, 0
        gen = torch.Generator().manual_seed(seed)
        pin = torch.cuda.is_available()
        self._batches = []
        for _ in range(distinct):
            rows, width = (1, batch_size * seq_len) if varlen else (batch_size, seq_len)
            ids = torch.randint(0, vocab_size, (rows, width + 1), generator=gen)
            batch = {"input_ids": ids[:, :-1].clone(), "labels": ids[:, 1:].clone()}
            if varlen:
                lengths, total = [], 0
                while total < width:
                    low, high = (doc_tokens // 2, doc_tokens * 3 // 2) if doc_tokens > 0 else (seq_len // 8, seq_len)
                    n = min(int(torch.randint(max(low, 1), high + 1, (1,), generator=gen)), seq_len, width - total)
                    lengths.append(n)
                    total += n
                cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
                batch["labels"][0, cu[1:] - 1] = -100
                batch["cu_seqlens"] = cu
            self._batches.append({k: (v.pin_memory() if pin else v) for k, v in batch.items()})

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self._batches[self._i % len(self._batches)]
        self._i += 1
        return batch

    def state_dict(self) -> dict:
        return {"i": self._i}

    def load_state_dict(self, state) -> None:
        self._i = int((state[0] if isinstance(state, list) else state)["i"])


def steady_rate(*, times: dict[int, float], warmup: int, steps: int, tokens_per_step: int) -> float:
    """Tokens/s between the end of step ``warmup`` and the end of step ``steps`` (``times``: step -> time)."""
    if steps <= warmup or warmup not in times or steps not in times:
        raise ValueError(f"need step times at warmup={warmup} and steps={steps} (have {sorted(times)[:3]}...)")
    return (steps - warmup) * tokens_per_step / max(times[steps] - times[warmup], 1e-9)


def measured_peak_tflops(device) -> float | None:
    """bf16 matrix-product TFLOP/s measured here (8192^3, best of a few), the honest ceiling for MFU."""
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 10 / 1e3)
    del a, b
    return 2 * 8192**3 / best / 1e12


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _progress(message: str) -> None:
    """One line to stderr as the loop goes: a measurement stopped by a time limit (FLA's first-use autotuning
    can take 10 minutes for a 1B model) still tells how far it got."""
    print(f"hand loop: {message}", file=sys.stderr, flush=True)


def run_baseline(
    *,
    config,
    loader,
    device,
    steps: int,
    warmup: int,
    lr: float,
    weight_decay: float,
    max_grad_norm: float,
    syncs: bool,
    checkpointing: bool = False,
) -> dict:
    """The hand-written loop: FLA model, autocast bf16, fused AdamW (on GPU), no compile, FLA's own loss.

    FLA's causal-LM head shifts ``labels`` itself, so the loop passes the (unshifted) inputs as labels, with
    ``cu_seqlens`` in varlen mode. ``syncs`` adds the trainer's three host read-backs per step;
    ``checkpointing`` recomputes every block in the backward (torch's non-reentrant checkpoint wrapper).
    """
    import torch
    import transformers

    free_memory(device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config)
    if checkpointing:  # FLA 0.6 declares HF gradient checkpointing, but its models never read the flag
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        layers = model.model.layers
        for i, block in enumerate(layers):
            layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    model.train()
    _progress(f"model built on {device} in {time.perf_counter() - t0:.1f} s; first step (cold kernels autotune)")
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, first_step, loss = {}, None, None
    tokens_per_step = 0
    for step in range(1, steps + 1):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
        tokens_per_step = batch["input_ids"].numel()
        kwargs = {"cu_seqlens": batch["cu_seqlens"]} if "cu_seqlens" in batch else {}
        if syncs:
            int((batch["labels"] != -100).sum())
        with autocast:
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False, **kwargs).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if syncs:
            float(loss), float(norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step == warmup or step == steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[step] = time.perf_counter()
            if step == 1:
                first_step = times[1] - t0
            _progress(f"step {step}/{steps} done at {times[step] - t0:.1f} s")
    result = {
        "tokens_per_second": steady_rate(times=times, warmup=warmup, steps=steps, tokens_per_step=tokens_per_step),
        "peak_memory_gib": peak_gib(device),
        "time_to_first_step_s": first_step,
        "final_loss": float(loss),
    }
    del model, opt, loss
    free_memory(device)
    return result


def run_baseline_or_oom(**kwargs) -> dict:
    """`run_baseline`, or ``{"out_of_memory": ...}`` when the hand loop does not fit the device.

    Why: a family and batch that the plain loop cannot hold (RWKV-7-340M at 16 x 2048 on an 80 GB card) is
    itself a result, and the trainer's own figure is still wanted from the same process, after minutes of
    autotuning. The exception (and with it the loop's model and optimizer, held by its frames) is dropped
    before the memory is freed for the trainer."""
    import torch

    try:
        return run_baseline(**kwargs)
    except torch.OutOfMemoryError as err:
        message = str(err).splitlines()[0]
    free_memory(kwargs["device"])
    _progress(f"out of memory: {message}")
    return {"out_of_memory": message}
