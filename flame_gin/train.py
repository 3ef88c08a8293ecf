"""Command line of the trainer: absl flags plus layered gin files and bindings.

    python -m flame_gin.train --gin_file=gin/gla.gin --gin_file=gin/ablations/x.gin \
        --gin_bindings='run.max_grad_norm = 0.5' --gin.LR=3e-4 --workdir=runs/gla

``--gin_file`` repeats (later files win), ``--gin_bindings`` repeat and apply after the files, ``--gin.NAME=V`` is
shorthand for the binding ``NAME = V``, and ``--workdir`` sets the ``MODEL_DIR`` macro. A bad config exits with
status 2 and a message naming the file, line or value at fault, before anything is built or written.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from flame_gin import config as config_lib

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin config files, applied in order (later override).")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after all files.")
_GIN_SEARCH_PATHS = flags.DEFINE_list(
    "gin_search_paths",
    None,
    "Where gin files and includes are looked up (default: cwd, then the repository's gin/ folder).",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (the MODEL_DIR macro); re-running resumes.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")


def _bindings() -> list[str]:
    bindings = list(_GIN_BINDINGS.value)
    if _WORKDIR.value:
        bindings.append(f"MODEL_DIR = {_WORKDIR.value!r}")
    return bindings


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from flame_gin import quiet

    quiet.install()  # before the libraries are imported
    import gin
    from flame_gin import configurables  # registers every configurable before parsing
    from flame_gin.checkpoint import CheckpointError
    from flame_gin.out_of_memory import OutOfDeviceMemory

    search_paths = _GIN_SEARCH_PATHS.value or config_lib.default_search_paths()
    try:
        config_lib.parse(gin_files=_GIN_FILES.value, gin_bindings=_bindings(), search_paths=search_paths)
    except config_lib.ConfigError as e:
        print(f"flame_gin: {_said(e)}", file=sys.stderr)
        return 2
    text = config_lib.config_text()
    if _PRINT_CONFIG.value:
        print(text)
        return 0
    try:
        config_lib.check_bindings_reached(root="flame_gin.run", command_line=_bindings())
        return configurables.run(config_text=text, on_first_step=gin.operative_config_str, stop_requested=_stop_flag())
    except config_lib.ConfigError as e:
        print(f"flame_gin: {_said(e)}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # damaged beyond fallback, or not the model's checkpoint
        print(f"flame_gin: checkpoint: {_said(e)}", file=sys.stderr)
        return 1
    except OutOfDeviceMemory as e:  # the step, the micro-batch, what was kept and the ways out
        print(f"flame_gin: {_said(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "Required bindings" in str(e) or "REQUIRED" in str(e):
            print(f"flame_gin: {_said(e)}", file=sys.stderr)
            return 2
        raise


def _said(error: BaseException) -> str:
    """The error's own text, without the line gin appends to every error raised inside a configurable ("In call
    to configurable 'run' (<function ...>)"): the command line names the fault, not the call path."""
    return "\n".join(line for line in str(error).splitlines() if not line.startswith("  In call to configurable"))


def _stop_flag():
    """A poll function that turns True once SIGTERM or SIGUSR2 arrived (None when preemption is unavailable)."""
    try:
        from flame_gin.checkpoint import preemption
    except ImportError:
        logging.warning("preemption handling unavailable")
        return None
    return preemption.PreemptionFlag().requested


def run_main() -> None:
    """Console-script entry (the ``--gin.X=V`` shorthand accepted)."""
    config_lib.run_command(main, prog="flame_gin")


if __name__ == "__main__":
    run_main()
