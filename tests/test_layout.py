"""The shape of the package: imports form a tree, imports sit at module top, every method registers once."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import rankone
from rankone import methods
from rankone.methods.base import KINDS, Method

PACKAGE = Path(rankone.__file__).parent
# Imported inside a function on purpose: optional extras, and the package's own light `rankone.load`.
DEFERRED = {"matplotlib", "matplotlib.figure", "sklearn.datasets", "skimage.data",
            "fusion_bench.tasks.clip_classification", "rankone.methods"}
# And in one module only: `rankone demo --zoo-path` prints a cached zoo's folder before anything imports torch.
DEFERRED_IN = {"rankone.cli.demo": {"rankone.cli.stages"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(rankone modules imported at module level, every module imported inside a function or class)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top: set[str] = set()
    nested: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            # `from rankone.methods import merging` imports the submodule; `import names` imports the module.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        if node.col_offset == 0:
            top.update(name for name in names if name in known)
        else:
            nested.update(names)
    return top, nested


def test_imports_form_a_tree():
    known = set(modules())
    graph = {name: imports_of(path, known)[0] for name, path in modules().items()}
    # A package's __init__ that imports every module of its package (the method registry) does so at run time.
    for name, path in modules().items():
        if "pkgutil.walk_packages" in path.read_text(encoding="utf-8"):
            graph[name] |= {other for other in known if other.startswith(name + ".")}
    graph = {name: {target for target in targets if target != name} for name, targets in graph.items()}
    cycles = []

    def visit(name: str, trail: list[str], done: set[str]) -> None:
        if name in trail:
            cycles.append(trail[trail.index(name):] + [name])
            return
        if name in done:
            return
        for target in sorted(graph.get(name, ())):
            visit(target, trail + [name], done)
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [], done)
    assert not cycles, " → ".join(cycles[0])


def test_imports_are_at_module_top_unless_deferred_on_purpose():
    known = set(modules())
    for name, path in modules().items():
        _, nested = imports_of(path, known)
        allowed = DEFERRED | DEFERRED_IN.get(name, set())
        assert nested <= allowed, f"{name}: imports {sorted(nested - allowed)} inside a function"


def test_the_cli_holds_no_method_logic():
    # The commands reach the library through the pipeline's stages and the registry, never a method's module.
    known = set(modules())
    for name, path in modules().items():
        if name.startswith("rankone.cli"):
            top, _ = imports_of(path, known)
            reaching_in = sorted(target for target in top if target.startswith("rankone.methods.")
                                 and target not in ("rankone.methods.artifact",))
            assert not reaching_in, f"{name} imports {reaching_in}"


def test_every_method_module_registers_exactly_one_method():
    registered = {method.name: method for method in methods.registered()}
    found: dict[str, Method] = {}
    for module in pkgutil.walk_packages(methods.__path__, prefix="rankone.methods."):
        method = getattr(__import__(module.name, fromlist=["METHOD"]), "METHOD", None)
        if isinstance(method, Method):
            # A package may re-export its module's METHOD; it is still one method.
            assert found.setdefault(method.name, method) is method, f"{method.name}: declared twice"
    assert sorted(found) == sorted(registered)
    assert {method.kind for method in registered.values()} == set(KINDS)
    rows = [method.row for method in methods.registered()]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)


def test_the_defaults_table_of_docs_method_matches_the_declarations():
    import re

    from rankone.pipeline import STAGES

    declared: dict[str, set[str]] = {}
    classes = {stage.options for stage in STAGES.values()} | {method.options for method in methods.registered()}
    for options_class in classes:
        for info in options_class.options():
            shown = f"{info.default:g}" if isinstance(info.default, float) else str(info.default)
            declared.setdefault(info.flag, set()).add(shown)
    table = (PACKAGE.parent / "docs" / "method.md").read_text(encoding="utf-8").split("## 11. Defaults")[1].split("\n## ")[0]
    checked = 0
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        flags = re.findall(r"`(--[a-z-]+)`", cells[1]) if len(cells) == 3 else []
        if len(flags) != 1:
            continue
        # Parentheses hold who uses a value, not values: `1e-4 (RankOne-MoE, WEMoE); 1e-3 (AdaMerging)`.
        values = re.findall(r"[0-9][0-9.e-]*|[a-z]+(?:-[a-z]+)*", re.sub(r"\([^)]*\)", "", cells[2]))
        for value in values:
            shown = f"{float(value):g}" if value[0].isdigit() else value
            assert shown in declared[flags[0]], f"docs/method.md defaults: {flags[0]} {value}, declared {sorted(declared[flags[0]])}"
            checked += 1
    assert checked >= 10
