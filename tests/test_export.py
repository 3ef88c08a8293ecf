"""Hugging Face export (library and CLI) and import, checked with transformers."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from flame_gin.checkpoint import Checkpointer, CheckpointError, hf

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _tokenizer(path: pathlib.Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(97 + i): i + 1 for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_export_cli_and_library_then_import(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _tiny_llama(seed=0)
    Checkpointer(directory=tmp_path / "ckpt").save(step=4, model=model, optimizer=None, extra={}, config_text="")
    tok = _tokenizer(tmp_path / "tok")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    # CLI, bfloat16 with tokenizer.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flame_gin.export",
            f"--checkpoint_dir={tmp_path / 'ckpt'}",
            f"--output={tmp_path / 'hf_bf16'}",
            "--dtype=bfloat16",
            f"--tokenizer={tok}",
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()[-3000:]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_bf16").eval()
    assert loaded.dtype == torch.bfloat16
    # Weights are the bf16 rounding of the originals, bit for bit; logits
    # agree to bf16 precision (a plain .to(bf16) also rounds the rotary
    # buffers, which HF loading keeps in float32, hence no bitwise check).
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.to(torch.bfloat16)), name
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits.float(), model(input_ids=ids).logits, atol=2e-2, rtol=2e-2
        )
    assert AutoTokenizer.from_pretrained(tmp_path / "hf_bf16")("abc")["input_ids"] == [1, 2, 3]

    # Library, float32: same logits as the original model.
    hf.export_checkpoint(checkpoint_dir=tmp_path / "ckpt", output=tmp_path / "hf32", dtype="float32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf32").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    # Import as a starting point into a differently initialised model.
    fresh = _tiny_llama(seed=1)
    hf.import_hf(path=tmp_path / "hf32", model=fresh)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="dtype='int3'"):
        hf.export_checkpoint(checkpoint_dir=tmp_path, output=tmp_path / "o", dtype="int3")
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        hf.export_checkpoint(checkpoint_dir=tmp_path, output=tmp_path / "o")
    plain = torch.nn.Linear(2, 2)
    Checkpointer(directory=tmp_path).save(step=1, model=plain, optimizer=None, extra={}, config_text="")
    with pytest.raises(CheckpointError, match="model_config.json is missing"):
        hf.export_checkpoint(checkpoint_dir=tmp_path, output=tmp_path / "o")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_run_export_generates_and_stops_at_the_tokenizers_eos(tmp_path):
    """The tiny run's export with its tokenizer: `generate()` stops at the tokenizer's `</s>`. The export's
    weights are then set so that greedy decoding always picks `</s>` (blocks' outputs zeroed, every embedding
    the same, the head's `</s>` row aligned with it): a wrong eos id in the generation config (FLA's default 2
    is `<pad>` here) would let it run to `max_new_tokens`."""
    import fla  # noqa: F401  (FLA's model types for transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flame_gin import config as config_lib
    from flame_gin import configurables, kernels

    run = tmp_path / "run"
    config_lib.parse(
        gin_files=["gin/tiny.gin"],
        gin_bindings=[
            f"MODEL_DIR = {str(run)!r}",
            "TRAIN_STEPS = 2",
            "WARMUP_STEPS = 0",
            "flame_gin.evaluation.interval = 0",
        ],
        search_paths=config_lib.default_search_paths(),
    )
    assert configurables.run(config_text="", on_first_step=None) == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flame_gin.export",
            f"--checkpoint_dir={run / 'checkpoints'}",
            f"--output={tmp_path / 'hf'}",
            "--dtype=float32",
            "--tokenizer=embedded",
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    kernels.select(mode="reference")
    try:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert model.generation_config.eos_token_id == tok.eos_token_id == model.config.eos_token_id
        with torch.no_grad():
            for layer in model.model.layers:
                layer.attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.embeddings.weight.fill_(1.0)
            model.lm_head.weight.zero_()
            model.lm_head.weight[tok.eos_token_id].fill_(1.0)
        prompt = tok("def f():", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    finally:
        kernels.restore()
    new = out[0, prompt["input_ids"].shape[1] :].tolist()
    assert new == [tok.eos_token_id], new


def test_checkpoint_export_keeps_an_infinite_config_value(tmp_path):
    """Mamba2's `dt_limit` holds an infinity, which the checkpoint's config file encodes as transformers does
    ({"__float__": "Infinity"}). The model read from the checkpoint (what export and evaluation run) gets it
    back as a float, and so does its export: both give the trained model's logits (a dict there made the
    restored Mamba2 fail at its first forward)."""
    from transformers import AutoModelForCausalLM

    from flame_gin import kernels, models

    kernels.select(mode="reference")
    try:
        config = models.build_config(family="mamba2", overrides={"hidden_size": 32, "num_hidden_layers": 1})
        model = models.build_model(config=config, device="cpu", seed=0).eval()
        assert model.config.dt_limit[1] == float("inf")
        Checkpointer(directory=tmp_path / "ckpt").save(step=1, model=model, optimizer=None, extra={}, config_text="")
        restored, _ = hf.load_checkpoint_model(checkpoint_dir=tmp_path / "ckpt")
        hf.export_model(model=restored, output=tmp_path / "hf", dtype="float32")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        ids = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
        for reloaded in (restored.eval(), loaded):
            assert list(reloaded.config.dt_limit) == [0.0, float("inf")]
            with torch.no_grad():
                assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    finally:
        kernels.restore()
