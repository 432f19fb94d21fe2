"""The architecture, checked: layers without upward imports, stages apart, backends apart, no import loop.

Every import counts, those inside functions too (a lazy import is still a dependency); a package's
__init__ imports nothing (no re-exports). docs/architecture.md explains
the layers; this table is their definition.

On 03109f0 (before the relayout) this file fails: no module sat in a layer package, and over all imports
the graph had 4 loops (model_files <-> graph_layers; model_args -> models -> zoo; stages -> audit ->
audit.stage -> engines -> stages; commands.audit <-> commands.build). Mapped onto these layers (the
mechanical relayout keeps the graph: 309 edges), that code had 11 imports that run up or across: the
runner in stages.py -> 5 stage modules, audit.stage -> engines, audit.engine -> export, export ->
prune, models -> model_args and data -> data_args (model code -> CLI code), and the trt backend ->
torch_sparse; and 10 `noqa: F401` re-export shims.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mpdeploy"

# package (or module) -> rank; an import may only go to the same or a lower rank.
LAYERS: dict[str, int] = {
    "mpdeploy": 0,  # the root package itself: __version__ only
    "mpdeploy.core": 0,
    "mpdeploy.models": 1,
    "mpdeploy.sparsity": 2,
    "mpdeploy.onnx": 3,
    "mpdeploy.backends": 4,
    "mpdeploy.analyze": 5,
    "mpdeploy.prune": 5,
    "mpdeploy.distill": 5,
    "mpdeploy.export": 5,
    "mpdeploy.engine": 5,
    "mpdeploy.audit": 5,
    "mpdeploy.densify": 5,  # gives an engine's dense-run layers their dense weights back (a pruned artifact)
    "mpdeploy.serve": 5,
    "mpdeploy.pipeline": 6,
    "mpdeploy.commands": 7,
    "mpdeploy.cli": 7,
    "mpdeploy.__main__": 7,
}
# Stages meet only through the artifact kinds (mpdeploy.core.kinds): none imports another.
STAGES = {name for name, rank in LAYERS.items() if rank == 5}
# Backends: each imports only the shared interface (and its own modules).
BACKENDS = ("mpdeploy.backends.ort", "mpdeploy.backends.torch_sparse", "mpdeploy.backends.trt")
BACKEND_BASE = "mpdeploy.backends.base"


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(mpdeploy module, line) of every import in the file, in functions too; `from pkg import mod` counts
    as an import of pkg.mod."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "mpdeploy":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name not in MODULES and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name.split(".")[0] == "mpdeploy":
                    found.append((name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    return {m: {d for d, _ in imports_of(p) if d in MODULES and d != m} for m, p in MODULES.items()}


def owner(module: str) -> str | None:
    """The LAYERS entry a module belongs to (the longest prefix; the root package only by itself)."""
    best = None
    for name in LAYERS:
        if module == name or (name != "mpdeploy" and module.startswith(name + ".")):
            best = name if best is None or len(name) > len(best) else best
    return best


def backend_of(module: str) -> str | None:
    return next((b for b in BACKENDS if module == b or module.startswith(b + ".")), None)


def rule_breaks(g: dict[str, set[str]]) -> list[str]:
    """Every import that runs up a layer, across stages, or from a backend to another backend."""
    out = []
    for module, deps in sorted(g.items()):
        src = owner(module)
        for dep in sorted(deps):
            dst = owner(dep)
            if src is None or dst is None:
                continue
            if LAYERS[dst] > LAYERS[src]:
                out.append(f"{module} -> {dep}: up from {src} to {dst}")
            elif src in STAGES and dst in STAGES and src != dst:
                out.append(f"{module} -> {dep}: stage {src} imports stage {dst}")
            elif backend_of(module) and dst == "mpdeploy.backends" and backend_of(dep) not in (None, backend_of(module)):
                out.append(f"{module} -> {dep}: a backend imports another backend")
    return out


def import_loops(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops = []
    for start in g:
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(g.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    loops.append(sorted(component))
    return loops


def test_every_module_sits_in_a_layer():
    homeless = sorted(m for m in MODULES if owner(m) is None)
    assert not homeless, f"modules in no layer package: {homeless}; move them into one (docs/architecture.md)"


def test_no_import_runs_up_or_across():
    breaks = rule_breaks(graph())
    assert not breaks, "\n".join(breaks)


def test_no_import_loops():
    loops = import_loops(graph())
    assert not loops, f"{len(loops)} import loops: {loops}"


def test_loop_finder_finds_a_planted_loop():
    """The checker itself can fail: a planted loop through an in-function import is found."""
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_loops(planted) == [["a", "b", "c"]]
    assert rule_breaks({"mpdeploy.core.kinds": {"mpdeploy.models.load"},
                        "mpdeploy.prune.stage": {"mpdeploy.export.stage"},
                        "mpdeploy.backends.ort": {"mpdeploy.backends.trt.plan"}}) == [
        "mpdeploy.backends.ort -> mpdeploy.backends.trt.plan: a backend imports another backend",
        "mpdeploy.core.kinds -> mpdeploy.models.load: up from mpdeploy.core to mpdeploy.models",
        "mpdeploy.prune.stage -> mpdeploy.export.stage: stage mpdeploy.prune imports stage mpdeploy.export"]


def test_core_imports_no_torch_at_import_time():
    """core/ is what `mpdeploy --help` and every reader of artifacts load: no torch, numpy-free is not required."""
    code = ("import sys, importlib, pkgutil, mpdeploy.core as c\n"
            "[importlib.import_module(m.name) for m in pkgutil.iter_modules(c.__path__, 'mpdeploy.core.')]\n"
            "print('torch' in sys.modules)")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "a core module imports torch at import time"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_absolute_imports_only_and_no_reexport_shims(module):
    """Absolute imports keep `mpdeploy.onnx` from ever shadowing the onnx package; `noqa: F401` marks a
    re-export shim (a second import path for a name)."""
    path = MODULES[module]
    relative = [n.lineno for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, f"{module}: relative imports at lines {relative}"
    assert "noqa: F401" not in path.read_text(), f"{module}: a re-export shim (noqa: F401); import from the owner"


def _defined_and_reimported(path: Path) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """Top-level names a module defines itself, and those it imports from another mpdeploy module."""
    defined: set[str] = set()
    reimported: dict[str, tuple[str, str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mpdeploy":
            reimported.update({a.asname or a.name: (node.module, a.name) for a in node.names})
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        else:
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    defined.add(sub.name)
                elif isinstance(sub, (ast.Name, ast.arg)) and isinstance(getattr(sub, "ctx", ast.Store()), ast.Store):
                    defined.add(sub.id if isinstance(sub, ast.Name) else sub.arg)
    return defined, reimported


@pytest.mark.parametrize("path", sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py")]),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_one_import_path_per_name(path):
    """`from mpdeploy.x import n` takes n from the module that defines it, not from one that imported it."""
    second_paths = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.ImportFrom) and node.module in MODULES):
            continue
        defined, reimported = _defined_and_reimported(MODULES[node.module])
        for alias in node.names:
            if f"{node.module}.{alias.name}" not in MODULES and alias.name not in defined and alias.name in reimported:
                second_paths.append(f"line {node.lineno}: {alias.name} from {node.module} (defined in "
                                    f"{reimported[alias.name][0]})")
    assert not second_paths, second_paths


@pytest.mark.parametrize("module", sorted(m for m, p in MODULES.items() if p.name == "__init__.py"))
def test_package_inits_import_nothing(module):
    """A package's __init__ is its docstring (and the root's __version__): no package API re-exports its
    modules' names, so each name has the one import path of the module that defines it."""
    tree = ast.parse(MODULES[module].read_text())
    imports = [node.lineno for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
    assert not imports, f"{module}: imports at lines {imports}; import from the defining module instead"


def _private_imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mpdeploy":
            out += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return out


@pytest.mark.parametrize("path", sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py")]),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_private_names_cross_modules(path):
    private = _private_imports(path)
    assert not private, f"imports private names {private}; make them public where they are defined"


def test_no_god_modules_or_functions():
    """Small modules and functions (about 400 and 80 lines; the limits leave a little slack): a file or
    function over them is split, not waved through."""
    too_long = []
    for module, path in sorted(MODULES.items()):
        text = path.read_text()
        if text.count("\n") > 450:
            too_long.append(f"{module}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 90:
                too_long.append(f"{module}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


# --- literals with one owner: artifact file names, Triton's repository layout, backend names -------------------

FILE_NAME = re.compile(r"^[\w-]+(\.[\w-]+)+$")  # a file name with an extension (not a schema "a.b/1")
# Strings that equal a backend name but mean something else there (the same word, another thing).
NOT_BACKEND_NAMES: dict[tuple[str, str], str] = {
    ("mpdeploy.models.files", "torch"): "a checkpoint format (torch.save / torch.export), not the torch backend",
    ("mpdeploy.models.programs", "torch"): "the torch package's logger",
    ("mpdeploy.core.artifacts", "torch"): "the torch package, for the manifest's tool versions",
}
# Modules that may spell an owned name themselves, and why.
OUTSIDE_MPDEPLOY = {
    "mpdeploy.serve.triton_python_model": "copied verbatim into a Triton repository and run by Triton's Python "
                                          "backend, where mpdeploy is not installed (its ONNX file name is "
                                          "checked against the owner below)",
}


def _file_names_in(value) -> set[str]:
    if isinstance(value, str):
        return {value} if FILE_NAME.match(value) else set()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return set().union(*map(_file_names_in, value)) if value else set()
    return set()


def owned_literals() -> dict[str, tuple[set[str], str]]:
    """literal -> (the modules that own it, how it is matched: "word" inside any string, "exact" string)."""
    sys.path.insert(0, str(ROOT))
    from mpdeploy.core import artifacts, kinds, names
    from mpdeploy.serve import triton_repo

    owned: dict[str, tuple[set[str], str]] = {}

    def own(literal: str, module: str, how: str) -> None:
        owned.setdefault(literal, (set(), how))[0].add(module)

    for cls in vars(kinds).values():
        if isinstance(cls, type) and issubclass(cls, kinds.ArtifactFolder):
            for key, value in vars(cls).items():
                if key.isupper() and key not in ("KIND", "SCHEMA"):
                    for name in _file_names_in(value):
                        own(name, "mpdeploy.core.kinds", "word")
    own(artifacts.MANIFEST, "mpdeploy.core.artifacts", "word")
    for key, value in vars(triton_repo).items():
        if key.isupper():
            for name in _file_names_in(value):
                own(name, "mpdeploy.serve.triton_repo", "word")
    for backend in names.BACKENDS:
        own(backend, "mpdeploy.core.names", "exact")
    return owned


def string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string constant, f-string parts included, docstrings left out."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def misplaced_literals(sources: dict[str, str], owned: dict[str, tuple[set[str], str]]) -> list[str]:
    """`module:line: literal` for every owned literal spelled outside its owners (and the known exceptions)."""
    patterns = {lit: re.compile(rf"(?<![\w.]){re.escape(lit)}(?!\w)") for lit, (_, how) in owned.items() if how == "word"}
    out = []
    for module, text in sorted(sources.items()):
        if module in OUTSIDE_MPDEPLOY:
            continue
        for line, value in string_literals(ast.parse(text)):
            for literal, (owners, how) in owned.items():
                if module in owners or (module, literal) in NOT_BACKEND_NAMES:
                    continue
                if (value == literal) if how == "exact" else patterns[literal].search(value):
                    out.append((module, line, literal, f"{module}:{line}: {literal!r} (owned by {', '.join(sorted(owners))})"))
    return [text for *_, text in sorted(out)]


def test_file_and_backend_names_have_one_owner():
    """Each artifact file name is spelled only in its kind (mpdeploy/core/kinds.py; the manifest's in
    core/artifacts.py), each file of Triton's repository layout only in serve/triton_repo.py, and each
    backend name only in core/names.py: everyone else uses the owner's constant or a backend's traits.
    Docstrings may describe files in words."""
    owned = owned_literals()
    assert {"model.onnx", "audit.json", "build_report.json", "trt", "ort", "torch"} <= set(owned)
    misplaced = misplaced_literals({m: p.read_text() for m, p in MODULES.items()}, owned)
    assert not misplaced, f"{len(misplaced)} literals outside their owner:\n" + "\n".join(misplaced)
    for (module, literal), why in NOT_BACKEND_NAMES.items():  # no stale exception
        assert any(v == literal for _, v in string_literals(ast.parse(MODULES[module].read_text()))), (module, why)


def test_literal_checker_finds_planted_names():
    owned = {"audit.json": ({"mpdeploy.core.kinds"}, "word"), "trt": ({"mpdeploy.core.names"}, "exact")}
    planted = {
        "mpdeploy.core.kinds": 'RESULT = "audit.json"\n',
        "mpdeploy.audit.x": '"""Writes audit.json."""\ndef f(b):\n    """audit.json"""\n'
                            '    return b == "trt", f"{b}/audit.json", "trt engines", "audit.jsonl"\n',
    }
    assert misplaced_literals(planted, owned) == [
        "mpdeploy.audit.x:4: 'audit.json' (owned by mpdeploy.core.kinds)",
        "mpdeploy.audit.x:4: 'trt' (owned by mpdeploy.core.names)"]


def test_the_triton_template_serves_the_owners_onnx_file_name():
    from mpdeploy.serve.triton_repo import MODEL_FILES

    template = MODULES["mpdeploy.serve.triton_python_model"]
    literals = {v for _, v in string_literals(ast.parse(template.read_text())) if FILE_NAME.match(v)}
    assert literals == {MODEL_FILES["onnxruntime_onnx"]}, literals
