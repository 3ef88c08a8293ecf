"""What comes out of a trained family: its export reloads in `transformers` with the same logits, and cached
generation picks the tokens that full forwards pick (CPU paths, tiny shapes).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from flame_gin import kernels, models

SOFTMAX_VARIANTS = ("forgetting_transformer", "path_attn")


@pytest.mark.parametrize(
    "family",
    [
        *("gla", "delta_net", "gated_deltanet", "mamba", "mamba2", "samba", "transformer", "gla_hybrid"),
        *("mom", "hgrn2", "retnet", "gsa", "kda", "comba", "gated_deltaproduct", "hgrn", "lightnet", "rwkv6"),
        *SOFTMAX_VARIANTS,
        *("rwkv7", "mesa_net"),
    ],
)
def test_export_reloads_in_transformers_with_identical_logits(tmp_path, family):
    """Every family that trains on a CPU exports to a folder that `AutoModelForCausalLM.from_pretrained` loads
    (after `import fla`) with the same float32 logits, and the tokenizer's special ids."""
    from flame_gin.checkpoint import hf
    from flame_gin.data import embedded

    spec = {"gla_hybrid": dict(family="gla", attn={"layers": [1], "num_heads": 2})}.get(family, dict(family=family))
    overrides = {"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 512}
    if family in (
        "gla",
        "gla_hybrid",
        "delta_net",
        "transformer",
        "retnet",
        "gsa",
        "rwkv6",
        "forgetting_transformer",
        "path_attn",
    ):
        overrides["num_heads"] = 2
    if family in ("gated_deltanet", "mom", "kda", "comba", "gated_deltaproduct", "mesa_net"):
        overrides.update(num_heads=2, head_dim=16)
    if family == "hgrn2":
        overrides.update(num_heads=2, expand_ratio=16)
    if family == "lightnet":
        overrides.update(expand_ratio=16)
    if family == "rwkv7":
        overrides.update(head_dim=16)
    if family == "samba":
        overrides["attn"] = {"layers": [1], "num_heads": 2}
    kernels.select(mode="reference")
    try:
        config = models.build_config(family=spec["family"], overrides=overrides, attn=spec.get("attn"))
        model = models.build_model(config=config, device="cpu", seed=0).eval()
        tokenizer = embedded.tokenizer_path()
        hf.export_model(model=model, output=tmp_path / "hf", dtype="float32", tokenizer=tokenizer)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            # no cache: FLA's PaTH layer refuses a cache without an attention mask (its prefill path)
            assert torch.equal(
                loaded(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits
            )
    finally:
        kernels.restore()
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert loaded.generation_config.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("gla", dict(num_heads=2)),
        ("gated_deltanet", dict(num_heads=2, head_dim=16)),
        ("rwkv6", dict(num_heads=2)),
    ],
)
def test_cached_generation_gives_the_tokens_full_forwards_give(family, overrides):
    """Greedy ``generate()`` decodes one token at a time against the model's cache (recurrent states, or FoX's
    keys through the decoding reference); re-running the whole prefix each step must pick the same tokens. This
    catches a cache that never reaches the model (transformers 5.24 renamed the argument FLA 0.6 reads)."""
    kernels.select(mode="reference")
    try:
        config = models.build_config(
            family=family, overrides={"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64, **overrides}
        )
        model = models.build_model(config=config, device="cpu", seed=0).eval()
        prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            cached = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, use_cache=True
            )
            ids = prompt
            for _ in range(5):
                ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    finally:
        kernels.restore()
    assert torch.equal(cached, ids)


def test_forgetting_transformer_decodes_against_its_cached_keys_as_a_full_forward_would():
    """FoX decodes a token against its cached keys and gates (the decoding reference) only when given the attention
    mask (FLA's layer asserts otherwise, so ``generate()`` with an all-ones mask dropped fails in FLA itself): each
    step's logits equal the full forward's at that position."""
    kernels.select(mode="reference")
    try:
        config = models.build_config(
            family="forgetting_transformer",
            overrides={"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64, "num_heads": 2, "num_kv_heads": 1},
        )
        model = models.build_model(config=config, device="cpu", seed=0).eval()
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits
            out = model(input_ids=ids[:, :6], use_cache=True, attention_mask=torch.ones(2, 6, dtype=torch.long))
            for t in range(6, 9):
                mask = torch.ones(2, t + 1, dtype=torch.long)
                out = model(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, attention_mask=mask)
                torch.testing.assert_close(out.logits[:, -1], full[:, t], rtol=1e-5, atol=1e-5)
    finally:
        kernels.restore()
