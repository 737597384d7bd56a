"""The import graph of ``src/resumekit`` keeps the architecture of docs/architecture.md.

Read with ``ast`` (no module is imported): every ``import``/``from ... import`` anywhere in a module counts, lazy ones
inside functions included, because a lazy import is still a dependency. The rules:

* no import cycle between modules;
* no import from a lower layer to a higher one (layers below);
* no ``torch`` at module level, directly or through the module-level imports of other modules, in the parts that
  must run where torch is absent or slow to import: the supervisor, the CLI, the layouts, storage, verification.
"""

from __future__ import annotations

import ast
import os

SRC = os.path.join(os.path.dirname(__file__), "..", "src", "resumekit")

#: lowest first; a module may import modules of its own layer or below
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("errors", "events", "units")),
    ("format", ("format", "verify")),
    ("pure", ("policy", "data", "codec", "state", "snapshot")),
    ("storage", ("storage",)),
    ("discovery+engine", ("layouts", "checkpointers", "distributed", "gc", "yamlconfig")),
    ("manager", ("options", "manager")),
    ("top", ("integrations", "supervisor", "demo", "report", "cli", "__main__", "")),
]

#: must import no torch at module level, not even through other modules
TORCH_FREE = (
    "supervisor",
    "cli",
    "layouts",
    "storage",
    "verify",
    "format",
    "events",
    "units",
    "gc",
    "yamlconfig",
    "report",
    "",
)


def _modules() -> dict[str, str]:
    """dotted name (without ``resumekit.``; "" for the package itself) -> file."""
    out = {}
    for root, _dirs, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, f), SRC)[:-3].replace(os.sep, ".")
            name = rel[: -len(".__init__")] if rel.endswith(".__init__") else ("" if rel == "__init__" else rel)
            out[name] = os.path.join(root, f)
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, "").endswith("__init__.py")


def _resolve(importer: str, level: int, module: str | None) -> str:
    """The absolute dotted name (within resumekit) of a relative import, '' for the package root."""
    parts = importer.split(".") if importer else []
    if not _is_package(importer):
        parts = parts[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    if module:
        parts += module.split(".")
    return ".".join(parts)


def _imports(name: str) -> list[tuple[str, bool]]:
    """(imported resumekit module, at module level) for every import in ``name``; ``torch`` appears as '<torch>'."""
    tree = ast.parse(open(MODULES[name]).read())
    top = {id(n) for n in tree.body}
    # Imports under `if TYPE_CHECKING:` at module level are not executed: not module-level dependencies.
    type_only = {id(n) for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)}
    top -= type_only
    found: list[tuple[str, bool]] = []

    def walk(node: ast.AST, at_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            # Any other `if`/`try` at module level runs at import (the `isinstance` below would let this one in too).
            child_top = (
                at_top and id(child) not in type_only and (id(child) in top or isinstance(child, (ast.Try, ast.If)))
            )
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "torch":
                        found.append(("<torch>", at_top))
                    elif a.name.startswith("resumekit"):
                        found.append((a.name[len("resumekit.") :] if "." in a.name else "", at_top))
            elif isinstance(child, ast.ImportFrom):
                if child.level == 0:
                    mod = child.module or ""
                    if mod.split(".")[0] == "torch":
                        found.append(("<torch>", at_top))
                    elif mod.startswith("resumekit"):
                        base = mod[len("resumekit.") :] if "." in mod else ""
                        found.extend((t, at_top) for t in _targets(base, child))
                else:
                    base = _resolve(name, child.level, child.module)
                    found.extend((t, at_top) for t in _targets(base, child))
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                walk(child, False)
            else:
                walk(child, child_top)

    walk(tree, True)
    return found


def _targets(base: str, node: ast.ImportFrom) -> list[str]:
    """``from base import a, b``: the submodules a, b where they are modules, else the package ``base``."""
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}" if base else a.name
        out.append(sub if sub in MODULES else base)
    return out


def _layer(name: str) -> int:
    head = name.split(".")[0]
    for i, (_, members) in enumerate(LAYERS):
        if head in members:
            return i
    raise AssertionError(f"resumekit.{name} belongs to no layer: add it to LAYERS and docs/architecture.md")


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = []
    for m, deps in GRAPH.items():
        for d, _ in deps:
            if d != "<torch>" and d in MODULES and _layer(d) > _layer(m):
                bad.append(f"resumekit.{m} ({LAYERS[_layer(m)][0]}) imports resumekit.{d} ({LAYERS[_layer(d)][0]})")
    assert not bad, "\n".join(bad)


def _cycle() -> list[str] | None:
    edges = {m: sorted({d for d, _ in deps if d in MODULES and d != m}) for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in edges[m]:
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(f"resumekit.{m}" if m else "resumekit" for m in cycle)


def _module_level_closure(name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        m = todo.pop()
        for d, at_top in GRAPH.get(m, []):
            if at_top and d not in seen:
                seen.add(d)
                if d in MODULES:
                    todo.append(d)
    return seen


def test_torch_free_parts_import_no_torch_at_module_level():
    bad = []
    for m in MODULES:
        if m.split(".")[0] in TORCH_FREE and "<torch>" in _module_level_closure(m):
            bad.append(f"resumekit.{m}" if m else "resumekit")
    assert not bad, f"these modules pull in torch at import time: {bad}"


def test_the_graph_reader_sees_what_it_must(tmp_path):
    # The rules are only as good as the reader: check it on the modules whose imports are known.
    assert ("<torch>", True) in GRAPH["codec"]
    assert ("format", True) in GRAPH["verify"]
    assert any(d == "checkpointers.local" for d, _ in GRAPH["manager"])
    lazy = [d for d, top in GRAPH["manager"] if not top]
    assert "checkpointers.dcp" in lazy  # imported inside a function: counted, but not at module level
