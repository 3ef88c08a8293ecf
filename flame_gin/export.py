"""Export a flame_gin checkpoint to Hugging Face format.

    python -m flame_gin.export --checkpoint_dir=runs/x/checkpoints \
        --output=runs/x/hf --dtype=bfloat16 --tokenizer=path/to/tokenizer

The result loads with `transformers.AutoModelForCausalLM.from_pretrained`.
"""

from absl import app, flags

from flame_gin.checkpoint import hf
from flame_gin.data import embedded

_CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir", None, "Checkpoint root (holds one folder per step).", required=True
)
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write the HF model to.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Step to export (default: latest committed).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", sorted(hf.DTYPES), "Dtype of the saved weights.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer name or folder to save alongside (optional; 'embedded': the tiny default's)."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = hf.export_checkpoint(
        checkpoint_dir=_CHECKPOINT_DIR.value,
        output=_OUTPUT.value,
        step=_STEP.value,
        dtype=_DTYPE.value,
        tokenizer=embedded.resolve_tokenizer(_TOKENIZER.value),
    )
    print(f"exported to {out}")


if __name__ == "__main__":
    app.run(main)
