"""AdamW parameter groups: no decay for norms, biases, embeddings and FLA's _no_weight_decay parameters."""

import pytest
import torch
from torch import nn

from flame_gin import models, optim
from flame_gin.config import ConfigError


def _groups(model):
    groups = optim.parameter_groups(model=model, weight_decay=0.1)
    return {g["weight_decay"]: set(g["names"]) for g in groups}


def test_gla_groups_cover_every_parameter_once():
    config = models.build_config(
        family="gla", overrides=dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=64)
    )
    model = models.build_meta_model(config=config)
    groups = _groups(model)
    decay, no_decay = groups[0.1], groups[0.0]
    names = {n for n, _ in model.named_parameters()}
    assert decay | no_decay == names and not decay & no_decay
    assert "model.embeddings.weight" in no_decay
    assert all(n in no_decay for n in names if "norm" in n)
    assert all(n in no_decay for n in names if n.endswith(".bias"))
    assert "model.layers.0.attn.q_proj.weight" in decay
    assert "model.layers.0.mlp.gate_proj.weight" in decay


def test_decay_all_decays_every_parameter_and_takes_only_a_bool():
    config = models.build_config(
        family="gla", overrides=dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=64)
    )
    model = models.build_meta_model(config=config)
    groups = optim.parameter_groups(model=model, weight_decay=0.1, decay_all=True)
    assert groups[0]["names"] == [n for n, _ in model.named_parameters()] and groups[1]["names"] == []
    with pytest.raises(ConfigError, match=r"flame_gin.adamw.decay_all='yes' must be True or False"):
        optim.AdamW(lr=1e-3, decay_all="yes")


def test_no_weight_decay_attribute_is_honoured():
    class Block(nn.Module):
        _no_weight_decay = ("scale",)

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4, 4))
            self.proj = nn.Linear(4, 4)

    groups = _groups(Block())
    assert groups[0.0] == {"scale", "proj.bias"}
    assert groups[0.1] == {"proj.weight"}


def test_adamw_applies_decay_only_to_decay_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optim.adamw(params=optim.parameter_groups(model=model, weight_decay=0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    # With zero gradients AdamW only applies decoupled decay: w <- w * (1 - lr * wd).
    torch.testing.assert_close(after["0.weight"].detach(), before["0.weight"] * (1 - 0.1 * 0.5))
    for name in ("0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(after[name].detach(), before[name])
