"""The step's device-side pieces: skipping a non-finite step without a host read-back, and the tally that
holds loss, gradient norm and skipped steps until they are logged."""

from __future__ import annotations

import math

import pytest
import torch

from flame_gin import steps


def _model_and_optimizer(*, fused: bool):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused or None)


def _step(model, optimizer, *, poison: bool):
    loss = model(torch.ones(2, 4)).square().mean() * (math.nan if poison else 1.0)
    loss.backward()
    norm = steps.clip_grad_norm(model=model, max_grad_norm=1.0, device=torch.device("cpu"))
    return steps.apply(optimizer=optimizer, lr_now=0.1, loss=loss.detach(), grad_norm=norm, skip_nonfinite=True)


def _snapshot(model, optimizer):
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in optimizer.state.items()}
    return [p.detach().clone() for p in model.parameters()], state


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_step_changes_nothing_and_is_counted(fused):
    model, optimizer = _model_and_optimizer(fused=fused)
    assert float(_step(model, optimizer, poison=False)) == 0.0
    params, state = _snapshot(model, optimizer)
    skipped = _step(model, optimizer, poison=True)
    assert float(skipped) == 1.0
    for before, after in zip(params, model.parameters()):
        torch.testing.assert_close(after.detach(), before, rtol=0, atol=0)
    for key, per_param in optimizer.state.items():
        for name, value in per_param.items():
            torch.testing.assert_close(value, state[key][name], rtol=0, atol=0, msg=name)
    assert not hasattr(optimizer, "found_inf")
    assert all(p.grad is None for p in model.parameters())


def test_fused_and_plain_adamw_take_the_same_steps_around_a_skip():
    runs = []
    for fused in (False, True):
        model, optimizer = _model_and_optimizer(fused=fused)
        for poison in (False, True, False):
            _step(model, optimizer, poison=poison)
        runs.append([p.detach() for p in model.parameters()])
    for plain, fused in zip(*runs):
        torch.testing.assert_close(fused, plain)


def test_the_norm_comes_back_where_the_loss_is_and_the_skip_flag_goes_where_the_parameters_are():
    """FSDP's CPU offload keeps gradients and the fused AdamW step on the host while the loss is on the GPU.
    Here the meta device stands in for the other device: the norm follows ``device``, not the gradients, and
    the fused step's ``found_inf`` follows the parameters, not the loss."""
    model, optimizer = _model_and_optimizer(fused=False)
    model(torch.ones(2, 4)).square().mean().backward()
    norm = steps.clip_grad_norm(model=model, max_grad_norm=1.0, device=torch.device("meta"))
    assert norm.device.type == "meta" and all(p.grad.device.type == "cpu" for p in model.parameters())

    class HostFused:  # a fused optimizer whose parameters sit on another device than the loss
        defaults = {"fused": True}
        param_groups = [{"params": [torch.empty(3, device="meta")]}]

        def step(self):
            self.flag_device = self.found_inf.device

        def zero_grad(self, set_to_none):
            pass

    host = HostFused()
    steps.apply(optimizer=host, lr_now=0.1, loss=torch.tensor(1.0), grad_norm=torch.tensor(0.5), skip_nonfinite=True)
    assert host.flag_device.type == "meta"


def test_tally_reads_last_values_and_skips_and_tokens_since_last_read():
    tally = steps.StepTally(device=torch.device("cpu"))
    tally.add(loss=torch.tensor(2.0), grad_norm=torch.tensor(0.5), skipped=torch.tensor(1.0), tokens=7)
    big = torch.tensor(2**40 + 3, dtype=torch.int64)  # a device count, exact beyond float32's 2**24
    tally.add(loss=torch.tensor(3.0), grad_norm=torch.tensor(0.25), skipped=torch.tensor(1.0), tokens=big)
    assert tally.read() == (3.0, 0.25, 2, 2**40 + 10)
    tally.add(loss=torch.tensor(1.0), grad_norm=torch.tensor(0.75), skipped=torch.tensor(0.0))
    assert tally.read() == (1.0, 0.75, 0, 0)


def test_a_tally_read_before_any_step_stacks_values_of_one_device(monkeypatch):
    """A finished run started again reads its tally without having taken a step: the NaN it reports for loss
    and gradient norm must sit on the tally's device, or stacking them with the device counts fails on a GPU
    (on a CPU every tensor is on the host anyway). The meta device stands in for the GPU."""
    stacked = []
    real = torch.stack

    def stack(tensors, *args, **kwargs):
        stacked.append({t.device.type for t in tensors})
        return real([torch.zeros(()) for _ in tensors])  # host values, so the read-back can go on

    tally = steps.StepTally(device=torch.device("meta"))
    monkeypatch.setattr(torch, "stack", stack)
    tally.read()
    assert stacked == [{"meta"}]


def test_stop_vote_on_one_process_answers_at_once():
    asked = iter([False, True])
    vote = steps.StopVote(stop_requested=lambda: next(asked), device=torch.device("cpu"), world_size=1)
    assert [vote.poll(), vote.poll()] == [False, True]


def test_fused_loss_setting_is_checked_and_read_as_documented():
    from flame_gin import loss

    with pytest.raises(ValueError, match=r"fused_loss='logit': expected one of"):
        loss.fused_mode(fused_loss="logit", device_type="cuda")
    assert loss.fused_mode(fused_loss="auto", device_type="cuda") == loss.DEFAULT_FUSED
    assert loss.fused_mode(fused_loss="auto", device_type="cpu") is False
    assert loss.fused_mode(fused_loss="linear", device_type="cpu") == "linear"
    assert loss.fused_mode(fused_loss=False, device_type="cuda") is False
    assert loss.fused_mode(fused_loss="on", device_type="cpu") == loss.DEFAULT_FUSED
