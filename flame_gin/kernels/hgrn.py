"""Pure-PyTorch stand-ins for FLA 0.6's HGRN entry points, `chunk_hgrn` and `fused_recurrent_hgrn`.

Why: HGRN's kernels are Triton only, so without these the family cannot train on a CPU. The recurrence is FLA's
own element-wise reference (`fla.ops.hgrn.naive.naive_recurrent_hgrn`: h_t = exp(g_t) h_{t-1} + x_t); what is
added is packed documents run one by one with their own states (``cu_seqlens``) through the shared
per-document runner, in float32 with plain autograd.
"""

from __future__ import annotations

from flame_gin.kernels import attention


def fused_recurrent_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
    """Reference for `fla.ops.hgrn.fused_recurrent_hgrn`: x, g [B, T, D] (g in log space); states [N, D]."""
    from fla.ops.hgrn.naive import naive_recurrent_hgrn

    def core(x_, g_, h0):
        return naive_recurrent_hgrn(x_, g_, initial_state=h0, output_final_state=True)

    return attention.run_segments(
        core=core,
        tensors=[x.float(), g.float()],
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=False,
        cu_seqlens=cu_seqlens,
        out_dtype=x.dtype,
    )


def chunk_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
    """Reference for `fla.ops.hgrn.chunk_hgrn`: the same recurrence (FLA's layer never passes it ``cu_seqlens``)."""
    return fused_recurrent_hgrn(
        x, g, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens
    )
