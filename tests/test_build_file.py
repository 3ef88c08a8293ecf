"""BUILD stays true to the tree: every module is in a py_library, every test file has a py_test.

Bazel cannot run on the CI machines, so the BUILD file (Starlark, a subset of Python syntax) is parsed with
``ast`` and its targets are compared with the files on disk, in both directions.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
_RULES = ("py_library", "py_binary", "py_test")


def _targets():
    tree = ast.parse((ROOT / "BUILD").read_text(), filename="BUILD")
    targets = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _RULES:
            kwargs = {k.arg: k.value for k in node.keywords}
            srcs = [e.value for e in kwargs["srcs"].elts] if "srcs" in kwargs else []
            deps = [e.value for e in kwargs["deps"].elts] if "deps" in kwargs else []
            targets.append(dict(kind=node.func.id, name=kwargs["name"].value, srcs=srcs, deps=deps))
    return targets


def test_every_module_is_in_a_library():
    srcs = {s for t in _targets() if t["kind"] in ("py_library", "py_binary") for s in t["srcs"]}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "flame_gin").rglob("*.py")}
    assert modules - srcs == set(), "modules missing from BUILD"
    assert {s for s in srcs if not (ROOT / s).is_file()} == set(), "BUILD names files that do not exist"


def test_every_test_file_has_a_py_test():
    tests = {s for t in _targets() if t["kind"] == "py_test" for s in t["srcs"]}
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")}
    assert files - tests == set(), "test files missing from BUILD"
    assert tests - files == set(), "BUILD names test files that do not exist"


def test_deps_name_existing_targets_without_cycles():
    targets = _targets()
    graph = {f":{t['name']}": [d for d in t["deps"] if d.startswith(":")] for t in targets}

    def visit(node, path):
        assert node not in path, f"dependency cycle: {' -> '.join(path + [node])}"
        for dep in graph.get(node, []):
            visit(dep, path + [node])

    for node in graph:
        visit(node, [])
    names = {f":{t['name']}" for t in targets}
    for t in targets:
        for dep in t["deps"]:
            if dep.startswith(":"):
                assert dep in names, f"{t['name']} depends on unknown target {dep}"


def _imported_modules(path: pathlib.Path) -> set[str]:
    """The ``flame_gin`` modules a source file imports (at any depth: lazy imports inside functions count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("flame_gin")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flame_gin"):
            for alias in node.names:  # `from pkg import module` names the module, not the package
                full = f"{node.module}.{alias.name}"
                out.add(full if _module_file(full) is not None else node.module)
    return out


def _module_file(name: str) -> str | None:
    """``flame_gin.a.b`` -> the repository path of its module or package (None for a name inside a module)."""
    base = ROOT / pathlib.Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return str(candidate.relative_to(ROOT))
    return None


def test_imports_follow_the_deps_no_upward_arrows():
    """A library imports only its own files and those of the libraries it depends on (transitively), so BUILD
    shows every arrow and a lower layer never reaches up into the trainer's modules."""
    targets = [t for t in _targets() if t["kind"] in ("py_library", "py_binary")]
    owner = {src: f":{t['name']}" for t in targets for src in t["srcs"]}
    deps = {f":{t['name']}": {d for d in t["deps"] if d.startswith(":")} for t in targets}

    def closure(name, seen=None):
        seen = set() if seen is None else seen
        for dep in deps.get(name, ()):
            if dep not in seen:
                seen.add(dep)
                closure(dep, seen)
        return seen

    wrong = []
    for src, target in owner.items():
        allowed = closure(target) | {target}
        for name in _imported_modules(ROOT / src):
            file = _module_file(name)
            if file is not None and file in owner and owner[file] not in allowed:
                wrong.append(f"{src} ({target}) imports {name} ({owner[file]})")
    assert not wrong, "imports that BUILD's deps do not allow:\n" + "\n".join(sorted(set(wrong)))


def test_modules_stay_under_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "flame_gin").rglob("*.py")
        if (n := len(p.read_text().splitlines())) >= 400
    }
    assert long == {}, "split these modules (one module, one job)"


def test_only_the_registry_and_the_entry_points_import_gin():
    """gin stays at the edge: parts take plain keyword arguments and are registered in one place, so each can be
    built and tested without a config (``configurables`` registers, ``config`` parses, ``train`` and
    ``data.prepare`` are command lines that read a run's gin files)."""
    allowed = {"flame_gin/configurables.py", "flame_gin/config.py", "flame_gin/train.py", "flame_gin/data/prepare.py"}
    importers = set()
    for path in (ROOT / "flame_gin").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "gin" or n.startswith("gin.") for n in names):
                importers.add(str(path.relative_to(ROOT)))
    assert importers - allowed == set()
    assert importers, "the check sees no gin import at all: it is broken"
