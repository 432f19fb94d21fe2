"""Import direction: artifacts / kinds / weights / backends sit below the stages; no private names cross modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mpdeploy"
# The stages and what drives them: nothing below may import these.
STAGES = ("mpdeploy.prune.stage", "mpdeploy.distill", "mpdeploy.export.stage", "mpdeploy.pipeline.build", "mpdeploy.core.runner",
          "mpdeploy.engine.stage", "mpdeploy.audit", "mpdeploy.serve.ship", "mpdeploy.analyze.stage", "mpdeploy.audit.compare",
          "mpdeploy.cli", "mpdeploy.commands")
# Modules allowed to break the rule for now (none).
PENDING: set[str] = set()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every `import` / `from ... import` of an mpdeploy module, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mpdeploy"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("mpdeploy")]
    return found


def _is_stage(module: str) -> bool:
    return any(module == s or module.startswith(s + ".") for s in STAGES)


LOWER = sorted([*(PACKAGE / "backends").glob("*.py"), PACKAGE / "atomic.py", PACKAGE / "artifacts.py", PACKAGE / "kinds.py",
                PACKAGE / "weights.py", PACKAGE / "figures.py"])


@pytest.mark.parametrize("path", LOWER, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_lower_layers_import_no_stage(path):
    rel = path.relative_to(PACKAGE).as_posix()
    bad = sorted({m for m, _ in _imports(path) if _is_stage(m)})
    if bad and rel in PENDING:
        pytest.xfail(f"{rel} still imports {bad} (issue 16 moves the ONNX sparsity rules out of export.py)")
    assert not bad, f"{rel} imports stage modules {bad}: backends and artifact kinds sit below the stages"


MINE = ["report.py", "atomic.py", "build.py", "stages.py", "engines.py", "kinds.py", "weights.py", "artifacts.py", "cli.py",
        "audit/stage.py", "audit/engine.py", "audit/config.py", "audit/subject.py", "audit/accuracy.py",
        "audit/verdict.py", "audit/result.py", "audit/markdown.py", "audit/plots.py", "figures.py", "analyze.py",
        "backends/base.py", "backends/torch_sparse.py",
        *[f"commands/{p.name}" for p in sorted((PACKAGE / "commands").glob("*.py"))]]


@pytest.mark.parametrize("rel", MINE)
def test_no_private_names_cross_modules(rel):
    private = [(m, n) for m, names in _imports(PACKAGE / rel) for n in names if n.startswith("_") and not n.startswith("__")
               and not (m.startswith("mpdeploy.commands") and rel.startswith("commands/"))]
    assert not private, f"{rel} imports private names {private}; make them public where they are defined"


def test_no_god_modules_or_functions():
    """Small modules and functions (about 400 and 80 lines; the limits leave a little slack): a file or
    function over them is split, not waved through."""
    root = Path(__file__).resolve().parents[1] / "mpdeploy"
    too_long = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 450:
            too_long.append(f"{path.relative_to(root)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 90:
                too_long.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
