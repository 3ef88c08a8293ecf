"""Every parallelism on real gloo process groups vs. a single-process run of the same model and batch.

Compared per step: the global loss, every parameter's gradient (SGD, so scale errors show) and the updated
weights. Two-process cases share one spawn, four-process cases another (the machine has 2 cores).
"""

from __future__ import annotations

import json

import dist_suite
import pytest
from dist_launch import launch

pytestmark = pytest.mark.slow  # subprocess / multi-process runs: the full suite only

EQ, PP, MESH = "dist_equivalence:check", "dist_pipeline:check", "test_mesh:_mesh_worker"
TWO = {
    "fsdp_llama": (EQ, ("llama", dict(), dict()), {}),
    "fsdp_no_reshard_llama": (EQ, ("llama", dict(), dict(reshard_after_forward=False)), {}),
    "ddp_llama": (EQ, ("llama", dict(dp_replicate=2, dp_shard=1), dict(data_parallel="ddp")), {}),
    "tp_sp_loss_parallel_llama": (EQ, ("llama", dict(tp=2), dict()), {}),
    "tp_no_sp_llama": (EQ, ("llama", dict(tp=2), dict(sequence_parallel=False, loss_parallel=False)), {}),
    "tp_sp_gla": (EQ, ("gla", dict(tp=2), dict()), {}),
    "tp_sp_delta_net_conv": (EQ, ("delta_net", dict(tp=2), dict()), dict(model_kwargs=dict(use_short_conv=True))),
    "tp_sp_gated_deltanet": (EQ, ("gated_deltanet", dict(tp=2), dict()), {}),
    "tp_sp_kda": (EQ, ("kda", dict(tp=2), dict()), {}),
    "tp_sp_comba": (EQ, ("comba", dict(tp=2), dict()), {}),
    "tp_sp_fox": (EQ, ("forgetting_transformer", dict(tp=2), dict()), {}),
    "tp_sp_path": (EQ, ("path_attn", dict(tp=2), dict()), dict(model_kwargs=dict(use_forget_gate=True))),
    "tp_sp_mesa_net_gate": (EQ, ("mesa_net", dict(tp=2), dict()), dict(model_kwargs=dict(use_output_gate=True))),
    "tp_sp_path_full_rank": (EQ, ("path_attn", dict(tp=2), dict()), dict(model_kwargs=dict(use_low_rank_w=False))),
    "tp_sp_gla_hybrid": (
        EQ,
        ("gla", dict(tp=2), dict()),
        dict(model_kwargs=dict(attn=dict(layers=[1], num_heads=4, num_kv_heads=2, qkv_bias=True))),
    ),
    "tp_no_sp_gated_deltanet_hybrid_varlen": (
        EQ,
        ("gated_deltanet", dict(tp=2), dict(sequence_parallel=False, loss_parallel=False)),
        dict(rows=1, varlen=True, model_kwargs=dict(attn=dict(layers=[0], num_heads=4, window_size=5))),
    ),
    "tp_sp_hgrn2_conv": (EQ, ("hgrn2", dict(tp=2), dict()), dict(model_kwargs=dict(use_short_conv=True))),
    "tp_no_sp_hgrn2": (EQ, ("hgrn2", dict(tp=2), dict(sequence_parallel=False, loss_parallel=False)), {}),
    "tp_sp_hgrn_conv": (EQ, ("hgrn", dict(tp=2), dict()), dict(model_kwargs=dict(use_short_conv=True))),
    "tp_sp_lightnet": (EQ, ("lightnet", dict(tp=2), dict()), dict(model_kwargs=dict(gate_low_rank_dim=8))),
    "tp_no_sp_lightnet_conv": (
        EQ,
        ("lightnet", dict(tp=2), dict(sequence_parallel=False, loss_parallel=False)),
        dict(model_kwargs=dict(use_short_conv=True, gate_low_rank_dim=8)),
    ),
    "tp_sp_retnet_gqa": (EQ, ("retnet", dict(tp=2), dict()), dict(model_kwargs=dict(num_kv_heads=2))),
    "tp_no_sp_retnet": (EQ, ("retnet", dict(tp=2), dict(sequence_parallel=False, loss_parallel=False)), {}),
    "tp_sp_gsa_gqa": (EQ, ("gsa", dict(tp=2), dict()), dict(model_kwargs=dict(num_kv_heads=2, num_slots=4))),
    "tp_sp_rwkv7": (EQ, ("rwkv7", dict(tp=2), dict()), {}),
    "tp_sp_rwkv6": (EQ, ("rwkv6", dict(tp=2), dict()), {}),
    "tp_no_sp_rwkv6": (EQ, ("rwkv6", dict(tp=2), dict(sequence_parallel=False, loss_parallel=False)), {}),
    "cp_fsdp_gla": (EQ, ("gla", dict(cp=2), dict()), dict(rows=2)),
    "cp_gla_varlen": (EQ, ("gla", dict(cp=2), dict()), dict(rows=1, varlen=True)),
    "cp_delta_net_conv_varlen": (
        EQ,
        ("delta_net", dict(cp=2), dict()),
        dict(rows=1, varlen=True, model_kwargs=dict(use_short_conv=True)),
    ),
    "cp_gated_deltanet_varlen": (EQ, ("gated_deltanet", dict(cp=2), dict()), dict(rows=1, varlen=True)),
    "cp_kda_varlen": (EQ, ("kda", dict(cp=2), dict()), dict(rows=1, varlen=True)),
    "cp_comba": (EQ, ("comba", dict(cp=2), dict()), dict(rows=2)),
    "cp_hgrn_conv_varlen": (
        EQ,
        ("hgrn", dict(cp=2), dict()),
        dict(rows=1, varlen=True, model_kwargs=dict(use_short_conv=True)),
    ),
    "cp_hgrn2_varlen": (EQ, ("hgrn2", dict(cp=2), dict()), dict(rows=1, varlen=True)),
    "pp_gpipe_llama": (PP, ("llama", dict(pp=2), "GPipe"), {}),
    "pp_1f1b_gla": (PP, ("gla", dict(pp=2), "1F1B"), {}),
    "pp_interleaved_llama": (PP, ("llama", dict(pp=2), "Interleaved1F1B"), dict(stages_per_rank=2, microbatches=4)),
    "constructor_values_from_rank_0_rwkv7": ("test_model_zoo:constructor_values_from_rank_0", (), {}),
}
FOUR = {
    "named_meshes": (MESH, (), {}),
    "hsdp_tp_gla": (EQ, ("gla", dict(dp_replicate=2, tp=2), dict()), {}),
    "fsdp_tp_full_ac_gla": (EQ, ("gla", dict(tp=2), dict(activation_checkpointing="full")), {}),
    "hsdp_selective_ac_gla": (EQ, ("gla", dict(dp_replicate=2), dict(activation_checkpointing="selective")), {}),
    "pp_1f1b_fsdp_llama": (PP, ("llama", dict(pp=2), "1F1B"), {}),
}


def _run(world, cases, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"dist{world}") / "results")
    launch(dist_suite.run_cases, world_size=world, args=(cases, out))
    return [json.load(open(f"{out}.{r}.json")) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _run(2, TWO, tmp_path_factory)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _run(4, FOUR, tmp_path_factory)


@pytest.mark.parametrize("case", list(TWO))
def test_two_processes(two, case):
    for rank, results in enumerate(two):
        assert results[case] == "ok", f"rank {rank}:\n{results[case]}"


@pytest.mark.parametrize("case", list(FOUR))
def test_four_processes(four, case):
    for rank, results in enumerate(four):
        assert results[case] == "ok", f"rank {rank}:\n{results[case]}"
