"""Hugging Face export and import of model weights.

Export turns a checkpoint into a `save_pretrained` folder (weights in the
chosen dtype, config, tokenizer) that `transformers.AutoModelForCausalLM`
loads; the model is rebuilt from the HF config stored with the checkpoint.
Import loads an HF checkpoint's weights into an existing, possibly sharded,
model as a starting point for training.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch

from flame_gin.checkpoint import layout, reader, remote_code, shards
from flame_gin.checkpoint.seed import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _register_fla() -> None:
    """FLA registers its configs and models with the HF Auto classes on import."""
    try:
        import fla  # noqa: F401
    except ImportError:
        pass


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def export_model(
    *,
    model: torch.nn.Module,
    output: str | os.PathLike,
    dtype: str = "bfloat16",
    tokenizer: str | None = None,
) -> pathlib.Path:
    """`save_pretrained` an (unsharded) HF model in `dtype`, with a tokenizer.

    With a tokenizer, the export's special-token ids (config and generation config) are the tokenizer's:
    the family's defaults (FLA's configs say bos=1, eos=2) need not match the tokenizer a run trained with,
    and `generate()` stops on the generation config's eos id. An FLA model's export also carries a loader
    module and its `auto_map` (`remote_code`), so tools that never import FLA load it with
    `trust_remote_code=True` (`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`).
    """
    torch_dtype = _dtype(dtype)
    output = pathlib.Path(output)
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tok, key)
            setattr(model.config, key, value)
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, key, value)
    loader_module = remote_code.applies(model)
    if loader_module:
        remote_code.prepare(model)
    model.save_pretrained(output, safe_serialization=True)
    if loader_module:
        remote_code.write(model=model, output=output)
    if tok is not None:
        tok.save_pretrained(output)
    return output


def load_checkpoint_model(*, checkpoint_dir: str | os.PathLike, step: int | None = None) -> tuple[torch.nn.Module, int]:
    """The float32 HF model of a checkpoint (latest, or `step`) on the CPU, and the step it holds.

    The checkpoint must hold the model's HF config (saved automatically when the model has a `config`).
    Select kernels (`flame_gin.kernels.select`) before calling: some FLA layers pick their ops when built.
    """
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    _register_fla()
    root = pathlib.Path(checkpoint_dir)
    steps = layout.committed_steps(root)
    if not steps:
        raise reader.CheckpointError(f"no committed checkpoint in {root}")
    step = steps[-1] if step is None else step
    config_file = layout.step_dir(root=root, step=step) / layout.MODEL_CONFIG_FILE
    if not config_file.is_file():
        raise reader.CheckpointError(
            f"{config_file} is missing: the checkpoint was saved from a model "
            "without an HF config; use export_model() on a built model instead"
        )
    # the config class's own reader: it decodes what `to_json_string` encodes (an infinite float, as Mamba2's
    # `dt_limit` holds, is written as {"__float__": "Infinity"}), which plain `json.loads` leaves a dict
    model_type = json.loads(config_file.read_text())["model_type"]
    config = CONFIG_MAPPING[model_type].from_json_file(config_file)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_weights(directory=root, model=model, step=step)
    return model, step


def export_checkpoint(
    *,
    checkpoint_dir: str | os.PathLike,
    output: str | os.PathLike,
    step: int | None = None,
    dtype: str = "bfloat16",
    tokenizer: str | None = None,
) -> pathlib.Path:
    """Export the weights of a checkpoint (latest, or `step`) to HF format. Runs in one process on CPU."""
    _dtype(dtype)  # fail early on a bad dtype
    model, _ = load_checkpoint_model(checkpoint_dir=checkpoint_dir, step=step)
    return export_model(model=model, output=output, dtype=dtype, tokenizer=tokenizer)


def import_hf(*, path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load an HF checkpoint's weights into `model` (plain or sharded).

    Names must match the model's state_dict; every model tensor must be
    present (extra HF tensors are ignored). Values are cast to the model's
    dtypes; each rank copies only its own shards.
    """
    from transformers import AutoModelForCausalLM

    _register_fla()
    source = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    values = source.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    targets = get_model_state_dict(model)
    missing = [n for n in targets if n not in values]
    if missing:
        raise reader.CheckpointError(f"HF checkpoint {path} lacks tensors {missing[:5]}")
    for name, tensor in targets.items():
        value = values[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise reader.CheckpointError(
                f"HF checkpoint {path}: {name!r} has shape {tuple(value.shape)}, the model has {tuple(tensor.shape)}"
            )
        box = shards.box_of(name=name, tensor=tensor)
        if box.contiguous:
            value = value[box.slices()]
        reader.assign_box(tensor=tensor, value=value.to(tensor.dtype), box=box)
