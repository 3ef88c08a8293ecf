"""float8 refusal without torchao, memory estimate on meta, refusal of families without a TP plan."""

from __future__ import annotations

import importlib
import importlib.util
import logging

import dist_models
import pytest
import torch

from flame_gin.mesh import ParallelDims
from flame_gin.parallel.memory import estimate_memory, estimate_memory_modes, format_estimate
from flame_gin.parallel.tp_plans import apply_tensor_parallel


def test_float8_says_torchao_is_missing(monkeypatch):
    import sys

    from flame_gin.parallel.float8 import apply_float8

    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as if torchao were not installed
    with pytest.raises(RuntimeError, match="torchao is not installed"):
        apply_float8(torch.nn.Sequential(torch.nn.Linear(16, 16)))


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_float8_converts_only_large_linears_and_never_the_head():
    """torchao's real conversion (CPU: modules only; float8 matmuls need an H100) under the size filter."""
    from torchao.float8.float8_linear import Float8Linear

    from flame_gin.parallel.float8 import apply_float8

    model = dist_models.build("gla", hidden=64, heads=4)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    want = {n for n, m in linears.items() if "lm_head" not in n and min(m.in_features, m.out_features) >= 64}
    assert want and len(want) < len(linears)
    assert apply_float8(model, min_features=64) == len(want)
    got = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert got == want


def test_memory_estimate_scales_with_sharding():
    model = dist_models.build("llama").to("meta")
    one = estimate_memory(model=model, dims=ParallelDims(world_size=1), local_batch=2, seq_len=32)
    eight = estimate_memory(model=model, dims=ParallelDims(world_size=8), local_batch=2, seq_len=32)
    n = sum(p.numel() for p in model.parameters())
    assert one["params"] == pytest.approx(n * 4 / 1024**3)
    assert eight["optimizer"] == pytest.approx(one["optimizer"] / 8)
    assert one["activations"] is not None and one["activations"] > 0


def test_tensor_parallel_refuses_unknown_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="no plan for model family 'gpt2'.*gla"):
        apply_tensor_parallel(model, tp_mesh=None)


@pytest.mark.parametrize("family", ["llama", "gla"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_gradients(family, mode):
    """Recomputation replays the same forward: gradients equal those without checkpointing (HF Llama with
    SDPA included, called as the trainer calls it, without a KV cache)."""
    from flame_gin.parallel.activation_checkpointing import apply_activation_checkpointing

    ids, _ = dist_models.batch(rows=2, seq=16)
    grads = []
    for checkpointing in ("none", mode):
        model = dist_models.build(family, layers=2)
        apply_activation_checkpointing(model.model.layers, mode=checkpointing)
        model(input_ids=ids, use_cache=False).logits.square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    assert len(grads[0]) == len(grads[1])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain)


def test_memory_estimate_can_skip_running_blocks():
    model = dist_models.build("gla").to("meta")
    ran = estimate_memory(model=model, dims=ParallelDims(world_size=1), local_batch=2, seq_len=32)
    skipped = estimate_memory(model=model, dims=ParallelDims(world_size=1), local_batch=2, seq_len=32, run_blocks=False)
    assert ran["activations"] is not None and skipped["activations"] is None
    assert skipped["params"] == ran["params"]
    assert "upper bound" in format_estimate(ran, compiled=True) and "upper bound" not in format_estimate(ran)
    assert "upper bound" not in format_estimate(skipped, compiled=True)  # nothing measured, nothing to qualify
    assert "checkpointed" not in format_estimate(skipped, checkpointed=skipped)


def test_memory_estimate_with_every_block_checkpointed_keeps_one_hidden_state_per_block():
    """Full checkpointing keeps each block's input (batch x seq x hidden) and one block's saved tensors while it
    recomputes, instead of every block's; the log line gives both estimates."""
    model = dist_models.build("gla", layers=4).to("meta")
    kw = dict(model=model, dims=ParallelDims(world_size=1), local_batch=2, seq_len=64, param_dtype="float32")
    plain = estimate_memory(**kw)
    full = estimate_memory(**kw, activation_checkpointing="full")
    logits = 2 * 64 * model.config.vocab_size * 4 * 2 / 1024**3
    per_block = (plain["activations"] - logits) / 4
    inputs = 4 * 2 * 64 * model.config.hidden_size * 4 / 1024**3
    assert full["activations"] == pytest.approx(inputs + per_block + logits)
    assert full["activations"] < plain["activations"] and full["params"] == plain["params"]
    both = estimate_memory_modes(**kw, modes=("none", "full"))  # the trainer's start: one probe for both
    assert both == {"none": plain, "full": full}
    line = format_estimate(plain, checkpointed=full)
    assert line.endswith(
        f"; with every block checkpointed: activations={full['activations']:.3f}, total={full['total']:.3f}"
    )


def test_async_tp_is_refused_without_tp_compile_or_cuda():
    from flame_gin.parallel.parallelize import parallelize

    model = dist_models.build("gla")
    with pytest.raises(ValueError, match="needs tensor parallel and compiled blocks: ParallelDims.tp=1"):
        parallelize(model, dims=ParallelDims(world_size=1), mesh=None, async_tp=True, compile=True)
    with pytest.raises(ValueError, match="parallelize.compile=False"):
        parallelize(model, dims=ParallelDims(world_size=2, tp=2, dp_shard=1), mesh=None, async_tp=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            parallelize(
                model, dims=ParallelDims(world_size=2, tp=2, dp_shard=1), mesh=None, async_tp=True, compile=True
            )


def test_cpu_offload_without_fsdp_is_refused_not_ignored():
    """FSDP's offload policy is the only offload: one rank without FSDP (or a pipeline stage with no data-parallel
    shard) would keep every parameter on the GPU while the user believes them on the host."""
    from flame_gin.parallel.parallelize import parallelize

    model = dist_models.build("gla")
    with pytest.raises(ValueError, match=r"cpu_offload=True .* does not apply \(world=1 .*fsdp_one_gpu.gin"):
        parallelize(model, dims=ParallelDims(world_size=1), mesh=None, cpu_offload=True)
    with pytest.raises(ValueError, match=r"cpu_offload=True .* does not apply \(world=2 pp=2"):
        parallelize(model, dims=ParallelDims(world_size=2, pp=2, dp_shard=1), mesh=None, cpu_offload=True)
    assert parallelize(model, dims=ParallelDims(world_size=1), mesh=None) is model  # without offload: as before


def test_a_resume_refused_while_building_keeps_its_run_directory(tmp_path, train_tiny):
    """A config error in phase 5 removes only a run directory the run itself made; a resumed run's stays whole."""
    from flame_gin.config import ConfigError

    workdir = train_tiny(tmp_path / "run", steps=2)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    offload = ("flame_gin.run.parallelize = @flame_gin.parallelize", "flame_gin.parallelize.cpu_offload = True")
    with pytest.raises(ConfigError, match="cpu_offload=True keeps parameters on the host"):
        train_tiny(workdir, steps=4, bindings=offload)
    after = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    assert any(p.parts[0] == "checkpoints" and "2" in p.name for p in after)
    assert set(before) <= set(after)  # nothing of the run removed (the failed start may add its event file)
    with pytest.raises(ConfigError):
        train_tiny(tmp_path / "new", steps=4, bindings=offload)
    assert not (tmp_path / "new").exists()


def _gpu_compiled_table(monkeypatch):
    """Installs compiled mode's GPU table on this CPU (FLA's Triton ops stay, but for GLA's and DeltaNet's)."""
    import flame_gin.kernels as kernels

    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        assert kernels.select(mode="compiled") == "compiled"


def test_the_activation_probe_runs_a_block_on_meta_only_where_no_triton_kernel_can_launch(monkeypatch, caplog):
    """On a GPU the memory estimate's meta forward may only run blocks whose ops all have meta kernels: in
    compiled mode GLA's (its chunked op a custom op, its norms PyTorch's), never Gated DeltaNet's (FLA's Triton
    op, which faults the device on a meta pointer), and nothing in triton mode. The GLA block really runs
    there with the GPU's compiled table installed; a Triton launch it makes anyway (its short-sequence path)
    is stopped before it reaches a device. On a CPU every block may run."""
    import flame_gin.kernels as kernels

    try:
        gla = dist_models.build("gla", kernel_mode="compiled").to("meta")
        gdn = dist_models.build("gated_deltanet", kernel_mode="compiled").to("meta")
        assert kernels.traceable(model=gdn)  # the CPU's compiled table: references
        _gpu_compiled_table(monkeypatch)
        assert kernels.traceable(model=gla)
        assert not kernels.traceable(model=gdn)
        probed = estimate_memory(model=gla, dims=ParallelDims(world_size=1), local_batch=2, seq_len=128)
        assert probed["activations"] is not None and probed["activations"] > 0
        # at 64 tokens or fewer FLA's GLA takes its fused recurrent Triton kernel: the launch is stopped
        with caplog.at_level(logging.INFO, logger="flame_gin.parallel.memory"):
            short = estimate_memory(model=gla, dims=ParallelDims(world_size=1), local_batch=2, seq_len=32)
        assert short["activations"] is None
        assert "launches the Triton kernel fused_recurrent" in caplog.text, caplog.text
        with monkeypatch.context() as patch:
            patch.setattr(torch.cuda, "is_available", lambda: True)
            kernels.select(mode="triton")
        assert not kernels.traceable(model=gla)
    finally:
        kernels.select(mode="reference")


def test_compiling_a_family_with_flas_compiler_disabled_ops_turns_fullgraph_off(monkeypatch, caplog):
    """`gin/parallel/compile.gin` asks for one graph per block. On a GPU Gated DeltaNet's attention op is FLA's,
    which FLA keeps out of torch.compile (Gated DeltaNet-340M stopped at its first step with dynamo's "Skip
    inlining `torch.compiler.disable()`d function"): its blocks compile without fullgraph, with a warning
    naming the layer module; GLA's keep fullgraph."""
    import flame_gin.kernels as kernels

    parallelize_lib = importlib.import_module("flame_gin.parallel.parallelize")  # the package exports the function

    asked = {}
    monkeypatch.setattr(parallelize_lib, "apply_compile", lambda blocks, **kw: asked.update(kw))
    try:
        gla = dist_models.build("gla", kernel_mode="compiled")
        gdn = dist_models.build("gated_deltanet", kernel_mode="compiled")
        _gpu_compiled_table(monkeypatch)
        for model, whole in ((gla, True), (gdn, False)):
            with caplog.at_level(logging.WARNING, logger="flame_gin.parallel.parallelize"):
                parallelize_lib.parallelize(
                    model, dims=ParallelDims(world_size=1), mesh=None, compile=True, compile_fullgraph=True
                )
            assert asked["fullgraph"] is whole
        assert "fullgraph off: fla.layers.gated_deltanet" in caplog.text
        assert "flame_gin.parallelize.compile=False" in caplog.text  # the way to compare with no compile
    finally:
        kernels.select(mode="reference")


def test_states_that_cannot_fit_the_device_are_refused_before_the_optimizer():
    """Parameters + gradients + AdamW's two states, 16 bytes per fp32 parameter, against the device's capacity;
    a parameter kept elsewhere (FSDP's CPU offload on a GPU rank) counts nothing."""
    from flame_gin.parallel.memory import check_states_fit, device_state_bytes

    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 10, bias=False))
    n = 1000 * 1000 + 1000 + 1000 * 10
    assert device_state_bytes(model=model, device_type="cpu", optimizer_states=2) == (n, n * 4 * 4)
    assert device_state_bytes(model=model, device_type="cpu", optimizer_states=0) == (n, n * 4 * 2)
    cpu = torch.device("cpu")
    check_states_fit(model=model, device=cpu, capacity_bytes=n * 16, optimizer_states=2)  # exactly fits
    with pytest.raises(ValueError) as err:
        check_states_fit(model=model, device=cpu, capacity_bytes=n * 16 - 1, optimizer_states=2)
    text = str(err.value)
    assert f"{n:,} parameters" in text and "2 optimizer states" in text and "need 0.0 GiB on cpu" in text
    assert "gin/parallel/fsdp.gin" in text and "cpu_offload=True" in text and "fsdp_one_gpu.gin under torchrun" in text
    # On a GPU rank whose parameters FSDP offloaded to the host, nothing is counted against the GPU.
    assert device_state_bytes(model=model, device_type="cuda", optimizer_states=2) == (0, 0)
    check_states_fit(model=model, device=torch.device("cuda", 0), capacity_bytes=0, optimizer_states=2)


def test_a_sharded_parameter_counts_its_local_shard():
    """FSDP's parameters are DTensors whose numel() is the whole tensor; the rank holds only its shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from flame_gin.parallel.memory import device_state_bytes

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (4,))
        shard = DTensor.from_local(torch.zeros(25, 8), mesh, [Shard(0)])
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(shard)
        assert module.weight.numel() == 800
        assert device_state_bytes(model=module, device_type="cpu", optimizer_states=2) == (200, 200 * 16)
    finally:
        dist.destroy_process_group()


def test_the_optimizer_phase_refuses_states_beyond_the_device_as_a_config_error(monkeypatch):
    """The trainer's phase 5 with the device's capacity stubbed (a CPU machine has no GPU to ask): the shipped
    AdamW counts its two states and the refusal comes as a ConfigError (one line, exit 2), before any state."""
    from flame_gin import assembly, optim, process
    from flame_gin.config import ConfigError

    model = torch.nn.Linear(100, 100)
    built = assembly.Built(
        model=model, runtime=None, mesh=None, mesh_groups=[], group=None, loss_fn=None, prepare=None, pp_group=None
    )
    need = 10_100 * 4 * 4
    monkeypatch.setattr(process, "device_capacity", lambda device: need - 1)
    with pytest.raises(ConfigError, match="10,100 parameters on this rank with their gradients and 2 optimizer"):
        assembly.optimizer(built=built, settings=optim.AdamW(lr=1e-3), device=torch.device("cpu"))
    seed_only = assembly.optimizer(  # a seed checkpoint for a larger mesh: no step, no state, no refusal
        built=built, settings=optim.AdamW(lr=1e-3), device=torch.device("cpu"), steps_follow=False
    )
    assert isinstance(seed_only, torch.optim.AdamW)
    monkeypatch.setattr(process, "device_capacity", lambda device: need)
    opt = assembly.optimizer(built=built, settings=optim.AdamW(lr=1e-3), device=torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    monkeypatch.setattr(process, "device_capacity", lambda device: None)  # the host: nothing checked
    assert isinstance(
        assembly.optimizer(built=built, settings=optim.AdamW(lr=1e-3), device=torch.device("cpu")), torch.optim.AdamW
    )


def test_offloaded_states_beyond_the_host_are_refused_before_the_optimizer(monkeypatch, caplog):
    """FSDP's offload on a GPU rank: the parameters already sit on the host; their gradients and AdamW's two
    states (12 of the 16 bytes per fp32 parameter) must fit what the host has left, times the node's ranks.
    The optimizer phase asks psutil for the host's memory, here stubbed, and refuses with a ConfigError."""
    from flame_gin import assembly, optim, process
    from flame_gin.config import ConfigError
    from flame_gin.parallel.memory import check_host_fits

    model = torch.nn.Linear(100, 100)
    still = 10_100 * 4 * 3
    with caplog.at_level(logging.INFO, logger="flame_gin.parallel.memory"):
        check_host_fits(model=model, optimizer_states=2, available_bytes=still, local_ranks=1)  # exactly fits
    assert "10,100 parameters with their gradients and 2 optimizer states each take 0.0 GiB" in caplog.text
    # Pinned gradients (a GPU run) take power-of-two blocks: 40,000 weight bytes -> 65,536, 400 bias -> 512.
    pinned = 65_536 + 512 + 10_100 * 4 * 2
    check_host_fits(model=model, optimizer_states=2, available_bytes=pinned, local_ranks=1, pinned_gradients=True)
    with pytest.raises(ValueError, match="will add 0.0 GiB"):
        check_host_fits(
            model=model, optimizer_states=2, available_bytes=pinned - 1, local_ranks=1, pinned_gradients=True
        )
    with pytest.raises(ValueError) as err:
        check_host_fits(model=model, optimizer_states=2, available_bytes=2 * still - 1, local_ranks=2)
    text = str(err.value)
    assert "keeps 10,100 parameters of this rank on the host" in text and "2 rank(s) on this host" in text
    assert "more GPUs or hosts" in text
    built = assembly.Built(
        model=model, runtime=None, mesh=None, mesh_groups=[], group=None, loss_fn=None, prepare=None, pp_group=None
    )
    monkeypatch.setattr(process, "device_capacity", lambda device: 2**40)  # a GPU with room; states on the host
    monkeypatch.setattr(process, "host_available", lambda: still - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="add 0.0 GiB there"):
        assembly.optimizer(built=built, settings=optim.AdamW(lr=1e-3), device=torch.device("cpu"))
    monkeypatch.setattr(process, "host_available", lambda: still)
    assert isinstance(
        assembly.optimizer(built=built, settings=optim.AdamW(lr=1e-3), device=torch.device("cpu")), torch.optim.AdamW
    )
