"""Hugging Face export (library and CLI) and import, checked with transformers."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from flame_gin.checkpoint import Checkpointer, CheckpointError
from flame_gin.checkpoint import hf

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
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
    Checkpointer(directory=tmp_path / "ckpt").save(
        step=4, model=model, optimizer=None, extra={}, config_text=""
    )
    tok = _tokenizer(tmp_path / "tok")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    # CLI, bfloat16 with tokenizer.
    proc = subprocess.run(
        [sys.executable, "-m", "flame_gin.export", f"--checkpoint_dir={tmp_path / 'ckpt'}",
         f"--output={tmp_path / 'hf_bf16'}", "--dtype=bfloat16", f"--tokenizer={tok}"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, timeout=120,
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
