"""Settings users get wrong stop the run before anything is built or written, with a ConfigError naming the
setting and the value: through the real trainer (in process), and the run directory is never left behind."""

import os
import subprocess

import pytest

from flame_gin import config as config_lib
from flame_gin import configurables


def _run(workdir, *bindings):
    config_lib.parse(
        gin_files=["gin/tiny.gin"],
        gin_bindings=[
            f"MODEL_DIR = {str(workdir)!r}",
            "TRAIN_STEPS = 2",
            "WARMUP_STEPS = 0",
            "flame_gin.evaluation.interval = 0",
            *bindings,
        ],
        search_paths=config_lib.default_search_paths(),
    )
    return configurables.run(config_text="", on_first_step=None)


@pytest.mark.parametrize(
    "bindings, message",
    [
        (["LR = 'abc'"], r"LR='abc' \(flame_gin.adamw.lr\) must be a positive number"),
        (["LR = -1e-3"], r"LR=-0.001 .* must be a positive number"),
        (["flame_gin.run.kernel_mode = 'fastest'"], r"kernel_mode='fastest': expected one of"),
        (["flame_gin.run.kernel_mode = 'triton'"], r"kernel_mode='triton' needs a CUDA GPU"),
        (["NUM_HEADS = 3"], r"model family 'gla' cannot be built from its config"),
        (
            ["include 'model/llama.gin'", "NUM_HEADS = 2", "HIDDEN_SIZE = 64"],
            r"num_key_value_heads=16 \(NUM_KV_HEADS\) must divide num_attention_heads=2 \(NUM_HEADS\) .*'llama'",
        ),
        (
            ["include 'model/gla_hybrid.gin'", "ATTN_HEADS = 4", "ATTN_KV_HEADS = 3"],
            r"num_kv_heads=3 \(ATTN_KV_HEADS\) must divide num_heads=4 \(ATTN_HEADS\) .*'gla'",
        ),
        (["KEEP_CHECKPOINTS = 0"], r"keep=0: must be >= 1"),
        (["flame_gin.build_loader.bad_rows = 'ignore'"], r"bad_rows='ignore' \(flame_gin.build_loader.bad_rows\)"),
    ],
)
def test_bad_setting_is_named_and_leaves_no_run_directory(tmp_path, bindings, message):
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError, match=message):
        _run(workdir, *bindings)
    assert not workdir.exists()


def test_unusable_run_directories_are_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(config_lib.ConfigError, match=r"--workdir=.*afile' is a file"):
        _run(afile)
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    immutable = False
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: the immutable flag stops root too
            immutable = subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("root, and no chattr +i on this file system: a read-only directory cannot be made here")
        with pytest.raises(config_lib.ConfigError, match=r"is not writable"):
            _run(locked / "run")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        os.chmod(locked, 0o700)


def test_a_missing_text_field_is_named_before_the_model_is_built(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"body": "def f():\\n    return 1\\n"}\n' * 4)
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError, match=r"text field 'text' not found; the columns are \['body'\]"):
        _run(workdir, f"flame_gin.build_loader.sources = [{{'path': {str(data)!r}, 'holdout': 0.5}}]")
    assert not workdir.exists()


def test_an_unreachable_tokenizer_is_named(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries (read at import)
    workdir = tmp_path / "run"
    with pytest.raises(
        config_lib.ConfigError,
        match=r"tokenizer 'no-such-org/no-such-tokenizer' \(flame_gin.build_loader"
        r".tokenizer\): neither a local tokenizer directory nor loadable",
    ):
        _run(workdir, "flame_gin.build_loader.tokenizer = 'no-such-org/no-such-tokenizer'")
    assert not workdir.exists()


def test_rows_without_text_are_named_by_file_and_line_or_skipped(tmp_path, caplog):
    data = tmp_path / "docs.jsonl"
    data.write_text(
        "".join(f'{{"text": "def f{i}():\\n    return {i}\\n"}}\n' for i in range(40))
        + '{"text": null}\n'
        + '{"text": "x = 1\\n"}\n' * 40
    )
    source = f"flame_gin.build_loader.sources = [{{'path': {str(data)!r}, 'holdout': 0.2}}]"
    workdir = tmp_path / "run"
    with pytest.raises(
        config_lib.ConfigError,
        match=rf"1 row\(s\) without text in field 'text': {data} line 41; "
        r"fix the data, or set flame_gin.build_loader.bad_rows = 'skip'",
    ):
        _run(workdir, source)
    assert not workdir.exists()
    with caplog.at_level("WARNING"):
        assert _run(workdir, source, "flame_gin.build_loader.bad_rows = 'skip'") == 0
    assert any(
        f"skipping 1 row(s) without text in field 'text' (first: {data} line 41)" in r.getMessage()
        for r in caplog.records
    )


# Libraries a config error must not wait for: each takes 0.6-12 s to import on a 2-core machine (FLA alone ~12 s).
_HEAVY = (
    "fla",
    "transformers",
    "tensorstore",
    "jax",
    "clu",
    "datasets",
    "torch._dynamo",
    "torch.distributed.tensor",
    "torch.distributed.checkpoint",
)


@pytest.mark.parametrize(
    "args, status, text",
    [
        (["--gin.LR='abc'"], 2, "LR='abc' (flame_gin.adamw.lr) must be a positive number"),
        (["--gin.TRAIN_STEPS=-1"], 2, "TRAIN_STEPS=-1 must be >= 0"),
        (["--gin.flame_gin.adamw.decay_all='yes'"], 2, "flame_gin.adamw.decay_all='yes' must be True or False"),
        (["--gin.flame_gin.run.trian_steps=3"], 2, "trian_steps"),
        (["--gin.BATCH_SIZE=3", "--gin.flame_gin.run.grad_accum_steps=2"], 2, "BATCH_SIZE=3 (global, in sequences)"),
        (
            ["--gin.KEEP_CHECKPOINTS=0"],
            2,
            "keep=0: must be >= 1 or None (flame_gin.checkpointer.keep, KEEP_CHECKPOINTS)",
        ),
        (["--print_config"], 0, "run.train_steps = %TRAIN_STEPS"),
    ],
)
def test_config_errors_come_before_the_heavy_imports(tmp_path, args, status, text):
    """The command reports these after importing torch and the registry only (about 2.5 s here, was 7-8 s):
    Python's own import log of the command names every module it imported."""
    import sys

    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "flame_gin.train", "--gin_file=gin/tiny.gin"]
        + [f"--workdir={tmp_path / 'run'}", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == status, proc.stderr[-2000:]
    assert text in proc.stdout + proc.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported  # the log is read correctly
    heavy = sorted(m for m in imported for h in _HEAVY if m == h or m.startswith(h + "."))
    assert not heavy, heavy
    assert not (tmp_path / "run").exists()
