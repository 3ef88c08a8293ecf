"""Every shipped model gin file builds, and its parameter count is what its name and header say.

Tolerance: the count without the input embedding (the convention behind "340M": GLA-340M has 341.7M) must be
within 10% of the size in the file name, unless the file's header says "Misses its name", in which case it must
be within 40% (flame's "1B" shapes are the literature's 1.3B: +29% to +34%). The exact total written in each
header must match the built model, so headers cannot rot.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import torch
import transformers
from torch import nn

import gin
from flame_gin import families, flops, models

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin"
SIZE_FILES = sorted(p for p in (GIN_DIR / "model").glob("*.gin") if re.search(r"_\d+[mb]\.gin$", p.name))
NOMINAL = {"m": 1e6, "b": 1e9}


def _model_config():
    """The gin-registered builder, as the package's registry names it (``flame_gin.model_config``)."""
    from flame_gin import configurables  # noqa: F401  (registers every configurable)

    return gin.config._REGISTRY.get_match("flame_gin.model_config").wrapper


def _parse(text: str):
    gin.clear_config()
    gin.add_config_file_search_path(str(GIN_DIR))
    build = _model_config()
    gin.parse_config(text)
    return build()


@pytest.fixture
def flash_attn_stub(monkeypatch):
    """FLA 0.6's softmax Attention layer refuses to be constructed without flash-attn; meta builds never call it."""
    import fla.layers.attn

    def refuse(*args, **kwargs):
        raise AssertionError("flash-attn stub called: meta-device builds must not run attention")

    monkeypatch.setattr(fla.layers.attn, "flash_attn_func", refuse)


def test_every_family_has_340m_and_1b():
    names = {p.stem for p in SIZE_FILES}
    for family in (
        "gla",
        "delta_net",
        "gated_deltanet",
        "gsa",
        "hgrn2",
        "mamba",
        "mamba2",
        "samba",
        "rwkv7",
        "retnet",
        "llama",
        "gla_hybrid",
        "gated_deltanet_hybrid",
    ):
        assert {f"{family}_340m", f"{family}_1b"} <= names, family
    assert {"gla_7b", "llama_7b"} <= names


@pytest.mark.parametrize("path", SIZE_FILES, ids=[p.stem for p in SIZE_FILES])
def test_size_file_builds_with_named_size(path, flash_attn_stub):
    text = path.read_text()
    assert text.startswith("# ") and "-m flame_gin.train" in text.split("\n\n")[0], "header: command"  # or torchrun
    config = _parse(text)
    family, size = path.stem.rsplit("_", 1)
    if family.endswith("_hybrid"):  # a linear-attention family with softmax attention at chosen layers
        family = family.removesuffix("_hybrid")
        assert config.attn and config.attn["layers"], f"{path.name}: a hybrid names its attention layers"
    assert config.model_type == family
    model = models.build_meta_model(config=config)
    total = models.count_parameters(model)
    without_embedding = models.count_parameters(model, exclude_embeddings=True)

    stated = re.search(r"^# .*?: ([\d,]+) parameters \(([\d,]+) without the input embedding\)", text, re.M)
    assert stated, f"{path.name}: header must state the parameter count"
    assert (int(stated[1].replace(",", "")), int(stated[2].replace(",", ""))) == (total, without_embedding)

    nominal = float(size[:-1]) * NOMINAL[size[-1]]
    error = abs(without_embedding / nominal - 1)
    if "Misses its name" in text:
        assert 0.10 < error <= 0.40, f"{path.name}: {without_embedding:,} vs {nominal:,.0f} ({error:.0%})"
    else:
        assert error <= 0.10, f"{path.name}: {without_embedding:,} vs {nominal:,.0f} ({error:.0%}); say so in the file"
    assert config.vocab_size == 32000
    cost = re.search(r"^# Training cost at 2048 tokens: ([\d.]+) GFLOP per token", text, re.M)
    if cost:  # a stated cost is the count MFU uses
        assert f"{flops.flops_per_token(config=config, seq_len=2048) / 1e9:.2f}" == cost[1], path.name


def test_family_file_rejects_typo():
    with pytest.raises(ValueError, match="num_head"):
        _parse("include 'model/gla.gin'\nmodel_config.overrides = {'num_head': 2}")


# A family FLA does not ship: a bag-of-previous-token model, defined here as a user would in their own module.
class TinyMixConfig(transformers.PretrainedConfig):
    model_type = "tiny_mix_test"

    def __init__(self, vocab_size: int = 64, hidden_size: int = 16, num_hidden_layers: int = 2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


class TinyMixForCausalLM(transformers.PreTrainedModel):
    config_class = TinyMixConfig
    _input_embed_layer = "embed"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            nn.Linear(2 * config.hidden_size, config.hidden_size) for _ in range(config.num_hidden_layers)
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, labels=None, **kwargs):
        h = self.embed(input_ids)
        for layer in self.layers:
            previous = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # causal: token t sees t-1 only
            h = h + torch.tanh(layer(torch.cat([h, previous], dim=-1)))
        return transformers.modeling_outputs.CausalLMOutput(logits=self.lm_head(h))


def test_custom_family_from_gin_runs_forward_on_cpu():
    models.register_family(name="tiny_mix_test", config_class=TinyMixConfig, model_class=TinyMixForCausalLM)
    config = _parse(
        "model_config.family = 'tiny_mix_test'\n"
        "model_config.overrides = {'hidden_size': 24, 'num_hidden_layers': 3, 'vocab_size': 50}"
    )
    assert isinstance(config, TinyMixConfig) and config.hidden_size == 24
    with pytest.raises(ValueError, match="hidden_sise"):
        _parse("model_config.family = 'tiny_mix_test'\nmodel_config.overrides = {'hidden_sise': 24}")
    model = models.build_model(config=config, device="cpu", seed=0)
    assert models.count_parameters(model) == 50 * 24 + 3 * (48 * 24 + 24) + 24 * 50
    x = torch.randint(0, 50, (2, 7))
    logits = model(input_ids=x).logits
    assert logits.shape == (2, 7, 50) and torch.isfinite(logits).all()
    y = x.clone()
    y[:, 4:] = (y[:, 4:] + 1) % 50  # changing tokens 4.. must not change logits before position 4
    torch.testing.assert_close(model(input_ids=y).logits[:, :4], logits[:, :4])
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# Every family file at a tiny shape: the macros each needs beside these to build at hidden size 64.
FAMILY_FILES = sorted(p.stem for p in (GIN_DIR / "model").glob("*.gin") if not re.search(r"_\d+[mb]\.gin$", p.name))
TINY = "HIDDEN_SIZE = 64\nNUM_LAYERS = 2\nVOCAB_SIZE = 512\n"
TINY_DELTAS = {
    "delta_net": "NUM_HEADS = 2",
    "gated_deltanet": "NUM_HEADS = 2\nHEAD_DIM = 16",
    "gated_deltanet_hybrid": "NUM_HEADS = 2\nHEAD_DIM = 16\nATTN_LAYERS = [1]\nATTN_HEADS = 2\nATTN_KV_HEADS = 1",
    "gla_hybrid": "ATTN_LAYERS = [1]\nATTN_HEADS = 2\nATTN_KV_HEADS = 1",
    "llama": "NUM_HEADS = 2\nNUM_KV_HEADS = 1\nINTERMEDIATE_SIZE = 128",
    "samba": "ATTN_LAYERS = [1]\nATTN_HEADS = 2",
    "hgrn2": "model_config.extra_overrides = {'expand_ratio': 16}",
    "lightnet": "model_config.extra_overrides = {'expand_ratio': 16}",
}


def _fla_values(config, seed: int) -> dict[str, torch.Tensor]:
    """Every floating tensor of FLA's own construction on the CPU under ``seed`` (what any other trainer gets)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    return _floating(model)


def _floating(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_floating_point()}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_FILES)
def test_the_trained_model_starts_from_flas_own_initialisation(family, flash_attn_stub):
    """``build_model`` (built on meta, then initialised on the device) gives what FLA's construction gives: the
    values FLA sets the same under any seed (norms, decay and LoRA biases, token-shift ramps, zero projections)
    exactly, random ones at the same scale. RWKV-6 and RWKV-7, whose layers initialise in their constructors,
    once started from other values: random LoRA weights where FLA has zeros, no decay ramp."""
    config = _parse(f"include 'model/{family}.gin'\n{TINY}{TINY_DELTAS.get(family, '')}")
    first, second = _fla_values(config, 0), _fla_values(config, 1)
    ours = _floating(models.build_model(config=config, device="cpu", seed=0))
    assert ours.keys() == first.keys()
    if families.traits(config.model_type).init_in_constructor:  # built by FLA itself on the CPU: every value
        assert all(torch.equal(ours[name], value) for name, value in first.items())
    checked = 0
    for name, value in first.items():
        if torch.equal(value, second[name]):
            assert torch.equal(ours[name], value), f"{family}: {name} differs from FLA's (seed-independent) value"
        elif value.numel() >= 256:
            ratio = (ours[name].float().std() / value.float().std()).item()
            assert 0.8 < ratio < 1.25, f"{family}: {name} has {ratio:.2f}x the spread of FLA's"
        checked += 1
    assert checked == len(first)


def test_meta_skips_are_undone_after_the_build_and_a_missing_one_is_ignored(monkeypatch):
    """RWKV-7's constructor initialiser is skipped only while a meta build runs; a name another FLA version
    lacks leaves the build as it was."""
    import fla.layers.rwkv7

    original = fla.layers.rwkv7.RWKV7Attention.__dict__["_initialize_weights"]
    skips = (*families.traits("rwkv7").meta_skips, "fla.layers.rwkv7:RWKV7Attention._gone", "fla.layers.rwkv7:Gone.x")
    monkeypatch.setitem(families._TRAITS, "rwkv7", dataclasses.replace(families.traits("rwkv7"), meta_skips=skips))
    config = _parse(f"include 'model/rwkv7.gin'\n{TINY}")
    assert models.count_parameters(models.build_meta_model(config=config)) > 0
    assert fla.layers.rwkv7.RWKV7Attention.__dict__["_initialize_weights"] is original
    assert not hasattr(fla.layers.rwkv7.RWKV7Attention, "_gone")


def constructor_values_from_rank_0(rank: int, world: int) -> None:
    """(Run by ``tests/test_parallel_dist.py`` on 2 gloo ranks.) A family whose layers initialise in their
    constructors: only rank 0 constructs the CPU copy, and every rank ends with the values FLA's own
    construction gives one process under the seed."""
    config = _parse(f"include 'model/rwkv7.gin'\n{TINY}")
    calls = []
    real = models._constructed
    models._constructed = lambda **kwargs: calls.append(kwargs["seed"]) or real(**kwargs)
    try:
        ours = _floating(models.build_model(config=config, device="cpu", seed=4))
    finally:
        models._constructed = real
    assert calls == ([4] if rank == 0 else []), f"rank {rank} constructed {len(calls)} copies"
    expected = _fla_values(config, 4)
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[name], value) for name, value in expected.items())
