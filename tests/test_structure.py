"""One road through the package: imports flow one way and form no circle.

Floors, from the ground up (a module may import its own floor's package and lower floors):

- ground: ``kernels`` (and ``fdr``, ``_jax``, ``options``), ``execution``, ``io``
  (``io`` may ask ``execution.plan``, the one chunk planner; nothing else on the ground
  imports across);
- ``estimators``;
- ``differential`` (the pipeline and the documented classes);
- the user-facing layer: ``parallel``, ``anndata`` (da/de), ``plot``, the CLI, the package ``__init__``.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "kompot_dask"

FLOOR = {"_jax": 0, "options": 0, "kernels": 0, "fdr": 0, "execution": 0, "io": 0, "testing": 0,
         "estimators": 1, "differential": 2, "parallel": 3, "anndata": 3, "plot": 3, "cli": 3, "_cli": 3, "demo": 3,
         "__init__": 3}
GROUND_ALLOWED = {  # ground-floor packages and what else on the ground they may import
    "kernels": {"_jax", "options", "kernels"},
    "fdr": {"_jax", "options", "kernels"},
    "execution": {"options", "execution"},
    "io": {"options", "io", "execution.plan"},
}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] or ["__init__"]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Package-internal modules imported anywhere in ``path`` (function bodies included)."""
    here = _module_name(path).split(".")
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                if base == ["__init__"]:
                    base = []
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("kompot_dask"):
                target = node.module[len("kompot_dask."):] if node.module != "kompot_dask" else ""
            else:
                continue
            names = [f"{target}.{a.name}" if target else a.name for a in node.names]
            for name in names:
                out.add(name if _exists(name) else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kompot_dask."):
                    out.add(alias.name[len("kompot_dask."):])
    out.discard("")
    return out


def _exists(dotted: str) -> bool:
    p = PACKAGE.joinpath(*dotted.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_imports_flow_one_way():
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            src, dst = _top(module), _top(target)
            if FLOOR[dst] > FLOOR[src]:
                wrong.append(f"{module} -> {target} (up from floor {FLOOR[src]} to {FLOOR[dst]})")
            elif FLOOR[src] == 0 and src != dst and src in GROUND_ALLOWED:
                if not any(target == a or target.startswith(a + ".") or _top(target) == a and "." not in a
                           for a in GROUND_ALLOWED[src]):
                    wrong.append(f"{module} -> {target} (across the ground floor)")
    assert wrong == []


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            nxt = nxt if nxt in graph else nxt.rsplit(".", 1)[0]
            if nxt not in graph or nxt == node:
                continue
            if state.get(nxt) == 1:
                circles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    # A package __init__ re-exporting its own modules is not a circle of design.
    circles = [c for c in circles if not any(m.count(".") == 0 and _top(c[0]) == m for m in c[1:-1])]
    assert circles == []


def test_io_is_used_by_the_library():
    users = {m for m, targets in _graph().items() if _top(m) != "io" and any(_top(t) == "io" for t in targets)}
    assert {"differential.abundance", "differential.expression"} <= users
