"""Gin plumbing of the command line: search paths, the ``--gin.NAME=VALUE`` shorthand, parsing, config files.

Conventions follow T5X: ``--gin_file`` repeats (later files override earlier ones), ``--gin_bindings`` repeat
and apply after all files, ``--gin.NAME=VALUE`` is rewritten to the binding ``NAME = VALUE`` before absl
parses flags, and the resolved config is written to the run directory as ``config.gin`` (re-parseable) at start
and ``operative_config.gin`` (what was really used) after the first step.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import re
import sys
from typing import Any, Callable, Sequence

import gin

CONFIG_FILE = "config.gin"
OPERATIVE_CONFIG_FILE = "operative_config.gin"
_SHORTHAND = re.compile(r"^--gin\.([A-Za-z_][\w.]*(?:/[\w.]+)*)=(.*)$", re.DOTALL)


def _not_a_search_miss(record: logging.LogRecord) -> bool:
    """False for gin's "Path not found" error, which its package-resource reader logs for every search path that
    does not hold an included file, even when a later one does; a real miss still fails as a ConfigError."""
    return not (
        record.levelno == logging.ERROR
        and record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
        and record.getMessage().startswith("Path not found")
    )


logging.getLogger().addFilter(_not_a_search_miss)  # gin logs it on the root logger


class ConfigError(ValueError):
    """A config problem found before anything expensive was built; the message names what is at fault."""


def package_gin_dir() -> pathlib.Path:
    """The ``gin/`` folder shipped beside the ``flame_gin`` package (the repository's own configs)."""
    return pathlib.Path(__file__).resolve().parent.parent / "gin"


def default_search_paths() -> list[str]:
    """The shipped ``gin/`` folder, the current directory, then the repository root.

    With these, ``--gin_file=gin/gla.gin`` works from any directory (``--gin_file`` names are resolved against
    the current directory first, see ``resolve_file``), and includes inside gin files (``include
    'model/gla.gin'``) resolve against the shipped ``gin/`` folder at the first try.
    """
    gin_dir = package_gin_dir()
    return [str(gin_dir), os.getcwd(), str(gin_dir.parent)]


def rewrite_shorthand(argv: Sequence[str]) -> list[str]:
    """Turns each ``--gin.NAME=VALUE`` into ``--gin_bindings=NAME = VALUE`` so absl never sees unknown flags."""
    out = []
    for arg in argv:
        match = _SHORTHAND.match(arg)
        if match:
            out.append(f"--gin_bindings={match.group(1)} = {match.group(2)}")
        elif arg.startswith("--gin.") and "=" not in arg:
            raise ConfigError(f"{arg!r}: the shorthand needs a value, as in --gin.TRAIN_STEPS=20")
        else:
            out.append(arg)
    return out


def run_command(main: Callable[[list[str]], int], *, prog: str) -> None:
    """Console-script entry of a command that reads gin files: rewrites the ``--gin.X=V`` shorthand (a malformed
    one exits 2 with one line naming ``prog``), then hands ``main`` over to absl; its return is the exit status."""
    from absl import app

    try:
        argv = rewrite_shorthand(sys.argv)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(lambda a: sys.exit(main(a)), argv=argv)


def resolve_file(name: str, search_paths: Sequence[str]) -> str:
    """The first existing ``search_path/name``; a missing file is a ``ConfigError`` listing where it looked."""
    if os.path.isabs(name):
        if os.path.exists(name):
            return name
        raise ConfigError(f"gin file {name!r} does not exist")
    for base in search_paths:
        candidate = os.path.join(base, name)
        if os.path.exists(candidate):
            return candidate
    raise ConfigError(f"gin file {name!r} not found in the search paths {list(search_paths)}")


def parse(*, gin_files: Sequence[str], gin_bindings: Sequence[str], search_paths: Sequence[str]) -> None:
    """Parses files then bindings into gin's global config and finalises it.

    Every error comes back as a ``ConfigError`` carrying gin's own location (file and line) of the fault.
    All configurables must already be registered (import ``flame_gin.configurables`` first).
    """
    gin.clear_config()
    for path in search_paths:
        gin.add_config_file_search_path(path)
    files = [resolve_file(f, [os.getcwd(), *search_paths]) for f in gin_files]
    try:
        gin.parse_config_files_and_bindings(files, list(gin_bindings), finalize_config=True)
    except (ValueError, SyntaxError, TypeError, IOError) as e:
        raise ConfigError(f"Bad gin config: {e}") from None


_REQUIRED = object()


def bound_value(name: str, default=_REQUIRED):
    """The value bound to the gin parameter ``name``, macros resolved, for tools that read a parsed config
    without running it (benchmarks); ``default`` when nothing is bound (a ``ValueError`` without one)."""
    try:
        value = gin.query_parameter(name)
    except ValueError:
        if default is _REQUIRED:
            raise
        return default
    while isinstance(value, gin.config.ConfigurableReference) and value.configurable.name == "macro":
        value = value.scoped_configurable_fn()
    return value


def bound_keyword(fn: Callable[..., Any] | None, name: str, default: Any = None) -> Any:
    """The value ``fn`` will get for its keyword ``name`` when it is called: a ``functools.partial``'s keyword,
    or else the gin binding of a configurable (gin hands ``@flame_gin.parallelize`` over as the configurable
    itself, whose bindings apply only at its call); ``default`` otherwise. For a choice that must be made
    before ``fn`` runs: FSDP's offload, bound on ``parallelize``, decides the process group's backend."""
    if fn is None:
        return default
    if isinstance(fn, functools.partial):
        if name in fn.keywords:
            return fn.keywords[name]
        fn = fn.func
    try:
        return gin.get_bindings(fn).get(name, default)
    except ValueError:  # not a gin configurable: a plain function binds nothing
        return default


def config_text() -> str:
    """The resolved config as gin text (every binding set by files and flags), re-parseable."""
    return gin.config_str()


def write_config(*, workdir: str | os.PathLike, text: str, name: str = CONFIG_FILE) -> pathlib.Path:
    """Writes ``text`` to ``workdir/name`` atomically (temp file then rename), so readers never see half."""
    path = pathlib.Path(workdir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def unreached_bindings(*, root: str) -> list[str]:
    """The bound parameters (``selector.param``) of configurables that no call reachable from ``root`` refers to.

    Why: gin applies a binding only when gin calls its configurable, i.e. when a parameter of a configurable it
    calls refers to it (``@name`` or ``@name()``, directly, inside a list or dict, or through a macro). A binding
    no such chain reaches, like ``flame_gin.parallelize.activation_checkpointing = 'full'`` in a run that binds no
    ``flame_gin.run.parallelize``, parses without a word and changes nothing: the run trains without what the user
    asked for. Macros themselves are not reported (a file may define one that its includes never use). Reads
    gin's parsed bindings (``gin.config._CONFIG``): gin 0.5 has no public reader for them.
    """
    bindings = gin.config._CONFIG
    params_of: dict[str, list[dict]] = {}
    for (scope, selector), params in bindings.items():
        params_of.setdefault(selector if selector != "gin.macro" else f"%{scope}", []).append(params)
    reached, todo = set(), [root]
    while todo:
        key = todo.pop()
        if key in reached:
            continue
        reached.add(key)
        for params in params_of.get(key, []):
            todo.extend(_references(list(params.values())))
    return sorted(
        f"{selector}.{param}" if not scope else f"{scope}/{selector}.{param}"
        for (scope, selector), params in bindings.items()
        if selector != "gin.macro" and selector not in reached
        for param in params
    )


def _references(value) -> list[str]:
    """The configurables (``%NAME`` for a macro) that ``value`` refers to, inside lists, tuples and dicts too."""
    if isinstance(value, gin.config.ConfigurableReference):
        selector = value.configurable.selector
        return [f"%{'/'.join(value.scopes)}" if selector == "gin.macro" else selector]
    if isinstance(value, dict):
        return _references([*value.keys(), *value.values()])
    if isinstance(value, (list, tuple, set)):
        return [ref for item in value for ref in _references(item)]
    return []


def check_bindings_reached(*, root: str, command_line: Sequence[str]) -> None:
    """Refuses the bindings ``unreached_bindings`` finds that ``command_line`` (the ``--gin_bindings`` strings)
    sets, with a ``ConfigError`` naming them and the reference that would apply them; logs a warning for those
    set in files.

    Why the split: a file's bindings become unreached when the command line turns their part off on purpose
    (``flame_gin.run.checkpointer = None`` leaves the file's ``flame_gin.checkpointer.*`` unused), which must
    not stop the run; a binding typed on the command line that changes nothing is a mistake."""
    unreached = unreached_bindings(root=root)
    keys = {m[1] for text in command_line for m in re.finditer(r"^\s*([\w./]+)\s*=", text, re.M)}
    typed = [name for name in unreached if any(name == k or name.endswith("." + k) for k in keys)]
    from_files = [name for name in unreached if name not in typed]
    if from_files:
        logging.getLogger(__name__).warning(
            "gin binding(s) from the config files that this run never applies (nothing %s calls refers to %s): %s",
            root,
            ", ".join("@" + c for c in _configurables(from_files)),
            ", ".join(from_files),
        )
    if typed:
        configurables = _configurables(typed)
        example = (
            " (flame_gin.run.parallelize = @flame_gin.parallelize, as the files in gin/parallel/ do)"
            if "flame_gin.parallelize" in configurables
            else ""
        )
        raise ConfigError(
            f"gin binding(s) that this run never applies: {', '.join(typed)}. gin applies a binding only when it "
            f"calls the configurable, and nothing {root} calls refers to {', '.join('@' + c for c in configurables)}: "
            f"refer to it from a parameter that the run uses{example}, or drop the binding"
        )


def _configurables(names: list[str]) -> list[str]:
    """The configurables (selectors) of bound parameter names like ``scope/module.name.param``."""
    return sorted({name.rsplit(".", 1)[0].split("/")[-1] for name in names})
