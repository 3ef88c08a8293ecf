"""Model families train, not just build: every family with a CPU path trains through the real trainer on a CPU
(finite, falling loss read back from the run's TensorBoard events); the others are refused before anything is
built, with an error naming the family; a family whose body is not at ``.model`` trains too.
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
import transformers
from tensorboard.backend.event_processing import event_accumulator
from torch import nn

from flame_gin import config as config_lib
from flame_gin import configurables, families, kernels, models
from flame_gin import loss as loss_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["HIDDEN_SIZE = 64", "NUM_LAYERS = 2", "VOCAB_SIZE = 512"]
ATTN = ["ATTN_LAYERS = [1]", "ATTN_HEADS = 2", "ATTN_KV_HEADS = 1"]
# Family file -> the macro deltas that make it tiny (the family files' defaults are 340M shapes).
CPU_FAMILIES = {
    "gla": [],
    "delta_net": ["NUM_HEADS = 2"],
    "gated_deltanet": ["NUM_HEADS = 2", "HEAD_DIM = 16"],
    "gla_hybrid": ATTN,
    "gated_deltanet_hybrid": ["NUM_HEADS = 2", "HEAD_DIM = 16", *ATTN],
    "llama": ["NUM_HEADS = 2", "NUM_KV_HEADS = 1", "INTERMEDIATE_SIZE = 128"],
    "mamba": [],
    "mamba2": [],
    "samba": ["ATTN_LAYERS = [1]", "ATTN_HEADS = 2"],
    # Each memory sees only its routed tokens, so MoM learns more slowly per step at tiny.gin's LR (-0.02 in 4
    # steps at 3e-3; in a plain AdamW loop on random tokens its loss fell about a third as fast as GDN's).
    "mom": ["NUM_HEADS = 2", "HEAD_DIM = 16", "LR = 1e-2"],
    "hgrn2": ["NUM_HEADS = 2", "flame_gin.model_config.extra_overrides = {'expand_ratio': 16}"],
    "retnet": ["NUM_HEADS = 2"],
    "gsa": ["NUM_HEADS = 2", "flame_gin.model_config.extra_overrides = {'num_slots': 16}"],
    "kda": ["NUM_HEADS = 2", "HEAD_DIM = 16"],
    "comba": ["NUM_HEADS = 2", "HEAD_DIM = 16"],
    "gated_deltaproduct": ["NUM_HEADS = 2", "HEAD_DIM = 16"],
    "hgrn": [],
    "rwkv6": ["NUM_HEADS = 2"],
    "forgetting_transformer": ["NUM_HEADS = 2"],
    "path_attn": ["NUM_HEADS = 2"],
    "rwkv7": ["flame_gin.model_config.extra_overrides = {'head_dim': 16}"],
    "mesa_net": ["NUM_HEADS = 2", "HEAD_DIM = 16", "LR = 1e-2"],  # falls -0.03 in 4 steps at 3e-3
    "lightnet": ["flame_gin.model_config.extra_overrides = {'expand_ratio': 16, 'gate_low_rank_dim': 16}"],
}
GPU_ONLY = [
    "log_linear_mamba2",
    "mamba3",
]
STEPS = 4


def _parse(workdir: pathlib.Path, gin_files: list[str], bindings: list[str], *, checkpoints: bool = False) -> None:
    config_lib.parse(
        gin_files=["gin/tiny.gin", *gin_files],
        gin_bindings=[
            f"MODEL_DIR = {str(workdir)!r}",
            f"TRAIN_STEPS = {STEPS}",
            "WARMUP_STEPS = 1",
            *TINY,
            *bindings,
            "flame_gin.evaluation.interval = 0",
            "flame_gin.run.log_interval = 1",
            *([] if checkpoints else ["flame_gin.run.checkpointer = None"]),
            "flame_gin.run.kernel_cache = False",
        ],
        search_paths=config_lib.default_search_paths(),
    )


def _losses(workdir: pathlib.Path) -> list[float]:
    acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars("loss")]


def _train(workdir: pathlib.Path, gin_files: list[str], bindings: list[str]) -> list[float]:
    _parse(workdir, gin_files, bindings)
    assert configurables.run(config_text="", on_first_step=None) == 0
    return _losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CPU_FAMILIES))
def test_family_trains_on_cpu_through_the_trainer(tmp_path, family):
    losses = _train(tmp_path / family, [f"gin/model/{family}.gin"], CPU_FAMILIES[family])
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0] - 0.05, f"{family}: loss did not fall over {STEPS} steps: {losses}"


@pytest.mark.parametrize("family", GPU_ONLY)
def test_gpu_only_family_is_refused_on_cpu_before_anything_is_built(tmp_path, family):
    workdir = tmp_path / family
    _parse(workdir, [f"gin/model/{family}.gin"], [])
    with pytest.raises(config_lib.ConfigError, match=rf"model family '{family}' has no CPU kernels.*run it on a GPU"):
        configurables.run(config_text="", on_first_step=None)
    assert not workdir.exists()


def test_every_family_in_the_zoo_is_either_trained_or_refused_here():
    """A family file added to gin/model/ must join one of the two lists above, so none goes untried."""
    files = {p.stem for p in (ROOT / "gin" / "model").glob("*.gin") if not p.stem.split("_")[-1][:-1].isdigit()}
    assert files == set(CPU_FAMILIES) | set(GPU_ONLY)
    for family in CPU_FAMILIES:
        assert families.traits(family.removesuffix("_hybrid")).cpu, family
    for family in GPU_ONLY:
        assert not families.traits(family).cpu, family


# A family FLA does not ship, defined as a user would in their own module: its body lives at `.trunk`, not at
# `.model`, and a block mixes each token with the one before it.
class TrunkConfig(transformers.PretrainedConfig):
    model_type = "trunk_test"

    def __init__(self, vocab_size: int = 64, hidden_size: int = 16, num_hidden_layers: int = 2, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        super().__init__(**kwargs)


class TrunkModel(transformers.PreTrainedModel):
    config_class = TrunkConfig

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            nn.Linear(2 * config.hidden_size, config.hidden_size) for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        h = self.embeddings(input_ids)
        for layer in self.layers:
            previous = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
            h = h + torch.tanh(layer(torch.cat([h, previous], dim=-1)))
        return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=self.norm(h))


class TrunkForCausalLM(transformers.PreTrainedModel):
    config_class = TrunkConfig
    base_model_prefix = "trunk"

    def __init__(self, config):
        super().__init__(config)
        self.trunk = TrunkModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.trunk.embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        return transformers.modeling_outputs.CausalLMOutput(
            logits=self.lm_head(self.trunk(input_ids).last_hidden_state)
        )


@pytest.mark.slow
def test_custom_family_with_its_body_elsewhere_trains_through_the_trainer(tmp_path):
    models.register_family(
        name="trunk_test", config_class=TrunkConfig, model_class=TrunkForCausalLM, traits=families.Traits(cpu=True)
    )
    model = models.build_model(config=TrunkConfig(), device="cpu", seed=0)
    assert families.body(model) is model.trunk and len(families.blocks(model)) == 2
    losses = _train(
        tmp_path / "trunk",
        [],
        [
            "flame_gin.model_config.family = 'trunk_test'",
            "flame_gin.model_config.overrides = {'hidden_size': 32, 'num_hidden_layers': 2, 'vocab_size': 512}",
        ],
    )
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.05, losses


def test_a_model_without_a_body_at_its_prefix_is_named_in_the_error():
    class Headless(nn.Module):
        base_model_prefix = "model"

    with pytest.raises(ValueError, match=r"Headless has no body at base_model_prefix='model'"):
        families.body_name(Headless())


def test_a_family_whose_class_names_no_body_is_found_by_its_traits():
    """FLA 0.6's LightNetForCausalLM leaves base_model_prefix empty; its body is still found, blocks and all."""
    config = models.build_config(family="lightnet", overrides={"hidden_size": 256, "num_hidden_layers": 3})
    model = models.build_meta_model(config=config)
    assert type(model).base_model_prefix == ""
    assert families.body_name(model) == "model"
    assert len(families.blocks(model)) == 3
    assert families.body(model) is model.model


def test_a_family_needing_a_missing_package_is_refused_before_anything_is_built(monkeypatch):
    """FLA's Mamba-3 layers raise at the first forward without mamba_ssm's kernels; the trainer asks first."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mamba_ssm" else real_find_spec(name, *a)
    )
    config = models.build_config(family="mamba3", overrides={})
    with pytest.raises(ValueError, match=r"model family 'mamba3' needs mamba_ssm for its GPU kernels"):
        families.check_device(config=config, device_type="cuda")


def test_a_package_installed_without_the_kernel_fla_imports_is_refused_before_anything_is_built(monkeypatch):
    """mamba_ssm found by name but without its compiled extension: FLA's Mamba-3 layer then holds no SISO kernel
    (here for real, since this machine has no mamba_ssm) and would fail at the first forward; refused first."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "mamba_ssm" else real_find_spec(name, *a)
    )
    config = models.build_config(family="mamba3", overrides={})
    with pytest.raises(ValueError, match=r"'mamba3': mamba_ssm is installed but FLA found no mamba3_siso_combined"):
        families.check_device(config=config, device_type="cuda")


def test_values_only_the_constructor_sets_are_not_left_uninitialised():
    """Samba's Mamba mixers set A_log = log(1..state) and D = 1 in their constructor, and Samba's initialiser
    leaves them alone: a meta build would train uninitialised memory there."""
    kernels.select(mode="reference")
    try:
        config = models.build_config(
            family="samba",
            overrides={
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "vocab_size": 64,
                "state_size": 8,
                "attn": {"layers": [1], "num_heads": 2},
            },
        )
        model = models.build_model(config=config, device="cpu", seed=0)
    finally:
        kernels.restore()
    mixer = model.backbone.layers[0].mixer
    want = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand_as(mixer.A_log)
    torch.testing.assert_close(mixer.A_log.detach(), want)
    torch.testing.assert_close(mixer.D.detach(), torch.ones_like(mixer.D))


def test_gated_deltanet_is_refused_up_front_where_fla_would_refuse_its_backward(monkeypatch):
    """On Hopper with Triton 3.4-3.7.0 and no TileLang, FLA raises at the first backward (FLA #640); the trainer
    asks FLA's own flags before building, and lets the run through once TileLang or a fixed Triton is there."""
    import importlib.util

    import fla.utils
    import fla.utils.env

    config = models.build_config(family="gated_deltanet", overrides={"num_heads": 2, "head_dim": 16})
    monkeypatch.setattr(fla.utils, "IS_NVIDIA_HOPPER", True)
    monkeypatch.setattr(fla.utils, "TRITON_ABOVE_3_4_0", True)
    monkeypatch.setattr(fla.utils.env, "TRITON_ABOVE_3_7_1", False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tilelang" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"'gated_deltanet' cannot train here: .*FLA #640.*tilelang"):
        families.check_device(config=config, device_type="cuda")
    families.check_device(config=models.build_config(family="gla", overrides={}), device_type="cuda")  # not gated
    monkeypatch.setattr(fla.utils.env, "TRITON_ABOVE_3_7_1", True)
    families.check_device(config=config, device_type="cuda")


def test_mamba_style_families_warn_when_their_gpu_kernels_are_missing(monkeypatch):
    import importlib.util

    config = models.build_config(family="mamba2", overrides={})
    real_find_spec = importlib.util.find_spec
    installed = set()
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            (object() if name in installed else None) if name in families._MAMBA_KERNELS else real_find_spec(name, *a)
        ),
    )
    assert "mamba_ssm and causal_conv1d are not installed" in families.speed_warning(config=config, device_type="cuda")
    assert families.speed_warning(config=config, device_type="cpu") is None
    assert families.speed_warning(config=models.build_config(family="gla", overrides={}), device_type="cuda") is None
    installed.update(families._MAMBA_KERNELS)
    assert families.speed_warning(config=config, device_type="cuda") is None


def test_a_family_flame_gin_never_checked_is_named_in_a_warning():
    """FLA ships families the zoo has no file for (BitNet, NSA, Rodimus, ...): they are not refused on a GPU,
    but the run says up front that nothing here checked or trained them; a zoo family gets no warning."""
    known = models.config_classes()
    warning = families.unchecked_warning(config=known["bitnet"]())
    assert "model family 'bitnet': flame_gin has not checked this family's layers" in warning
    assert "gla" in warning.split("Families with checked traits: ")[1].split(", ")
    files = {p.stem for p in (ROOT / "gin" / "model").glob("*.gin") if not p.stem.split("_")[-1][:-1].isdigit()}
    for family in files - {"gla_hybrid", "gated_deltanet_hybrid"}:
        assert families.unchecked_warning(config=known[family]()) is None, family


def test_every_family_without_a_cpu_path_is_refused_on_cpu_by_name():
    """All of FLA's families (40 in FLA 0.6), not only the zoo's: either marked as training on a CPU (and then
    trained above) or refused with the one-line error before anything is built."""
    known = models.config_classes()
    assert len(known) >= 40
    refused = 0
    for family, config_class in sorted(known.items()):
        if families.traits(family).cpu:
            continue
        with pytest.raises(ValueError, match=rf"model family '{family}' has no CPU kernels.*run it on a GPU"):
            families.check_device(config=config_class(), device_type="cpu")
        refused += 1
    assert refused == 19  # FLA 0.6: 40 families, 21 of them with a CPU path


def test_a_routing_family_trains_on_flas_own_loss_with_its_balance_term():
    """MoM's forward adds its routers' load-balancing loss to the language-model loss; the trainer calls the
    body itself, so it must add the same term. Both of its loss paths (plain and the whole-model one of the
    parallel runs) equal FLA's ``model(input_ids, labels=input_ids).loss``, which differs from the plain
    cross-entropy by the balance term."""
    kernels.select(mode="reference")
    try:
        config = models.build_config(
            family="mom",
            overrides=dict(hidden_size=64, num_hidden_layers=2, vocab_size=256, num_heads=2, head_dim=16),
        )
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).float()
        ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)}
        fla_out = model(input_ids=ids, labels=ids, use_cache=False)
        plain_sum, count = loss_lib.loss_sum(model=model, batch=batch, fused=False)
        whole_sum, whole_count = loss_lib.parallel_loss_sum(model=model, batch=batch, fused=False)
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        kernels.restore()
    cross_entropy = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    balance = config.aux_loss_scale * fla_out.aux_loss
    assert float(balance) > 1e-3
    assert float(plain_sum / count) == pytest.approx(float(fla_out.loss), abs=1e-5)
    assert float(whole_sum / whole_count) == pytest.approx(float(fla_out.loss), abs=1e-5)
    assert float(cross_entropy + balance) == pytest.approx(float(fla_out.loss), abs=1e-5)
    plain_sum.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "gate" in n)


def test_every_fla_class_without_a_body_prefix_has_its_body_named_in_the_traits():
    """A causal-LM class that leaves ``base_model_prefix`` empty (FLA 0.6: LightNet, MoM) would make ``body``
    fall back to the whole model; each such family names its body in its traits instead."""
    unnamed = []
    for family, config_class in sorted(models.config_classes().items()):
        causal_lm = transformers.AutoModelForCausalLM._model_mapping[config_class]
        if not getattr(causal_lm, "base_model_prefix", ""):
            unnamed.append(family)
            assert families.traits(family).body, f"{family}: {causal_lm.__name__} names no body"
    assert "lightnet" in unnamed and "mom" in unnamed


@pytest.mark.slow
def test_a_resumed_rwkv7_run_takes_its_constructor_values_from_the_checkpoint_alone(tmp_path, monkeypatch):
    """RWKV-7's layers set every value in their constructors, so a fresh run builds a copy of the model on the
    CPU (minutes at 7B). A resumed run leaves those values to its checkpoint: it builds no copy, and its steps
    are the uninterrupted run's."""
    from flame_gin.checkpoint import REQUEUE_EXIT_CODE

    def train(workdir, stop_after=None):
        _parse(workdir, ["gin/model/rwkv7.gin"], CPU_FAMILIES["rwkv7"], checkpoints=True)
        polls = []
        stop = (lambda: polls.append(1) or len(polls) > stop_after) if stop_after else None
        return configurables.run(config_text="", on_first_step=None, stop_requested=stop)

    built = []
    real = models._constructed
    monkeypatch.setattr(models, "_constructed", lambda **kwargs: built.append(kwargs["seed"]) or real(**kwargs))
    assert train(tmp_path / "whole") == 0
    assert train(tmp_path / "resumed", stop_after=2) == REQUEUE_EXIT_CODE
    assert len(built) == 2  # the two fresh starts
    assert train(tmp_path / "resumed") == 0
    assert len(built) == 2, "the resumed run built a CPU copy of the model"
    whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "resumed")
    assert len(whole) == STEPS and resumed[-2:] == whole[-2:]


def test_a_tensor_left_to_a_checkpoint_that_did_not_set_it_is_named(tmp_path):
    model = models.build_model(
        config=models.build_config(family="gla", overrides=dict(hidden_size=32, num_hidden_layers=1, num_heads=2)),
        device="cpu",
        seed=0,
    )
    models.check_restored(model=model)  # every value set: nothing to say
    with torch.no_grad():
        model.model.layers[0].attn_norm.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.attn_norm\.weight holds NaN after the restore"):
        models.check_restored(model=model)
