"""FSDP2, HSDP, DDP, TP(+SP, loss parallel), FSDPxTP on 2-4 gloo processes vs. a single-process run."""

from __future__ import annotations

import pytest

from dist_launch import launch
import dist_equivalence

CASES = {
    "fsdp_llama": (2, "llama", dict(), dict()),
    "fsdp_bf16_params_llama": (2, "llama", dict(), dict(reshard_after_forward=False)),
    "ddp_llama": (2, "llama", dict(dp_replicate=2, dp_shard=1), dict(data_parallel="ddp")),
    "tp_sp_llama": (2, "llama", dict(tp=2), dict()),
    "tp_nosp_llama": (2, "llama", dict(tp=2), dict(sequence_parallel=False, loss_parallel=False)),
    "tp_sp_gla": (2, "gla", dict(tp=2), dict()),
    "tp_sp_delta_net_conv": (2, "delta_net", dict(tp=2), dict()),
    "hsdp_tp_gla": (4, "gla", dict(dp_replicate=2, tp=2), dict()),
    "fsdp_tp_ac_gla": (4, "gla", dict(tp=2), dict(activation_checkpointing="full")),
}

CP_CASES = {
    "cp_fsdp_gla": (2, "gla", dict(cp=2), dict(), dict(rows=2)),
    "cp_gla_varlen": (2, "gla", dict(cp=2), dict(), dict(rows=1, varlen=True)),
    "cp_delta_net_conv_varlen": (2, "delta_net", dict(cp=2), dict(),
                                 dict(rows=1, varlen=True, model_kwargs=dict(use_short_conv=True))),
}


@pytest.mark.parametrize("case", sorted(CP_CASES))
def test_context_parallel_matches_single_process(case):
    world, family, dims, par, extra = CP_CASES[case]
    launch(dist_equivalence.check, world_size=world, args=(family, dims, par), kwargs=extra)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_single_process(case):
    world, family, dims, par = CASES[case]
    launch(dist_equivalence.check, world_size=world, args=(family, dims, par))
