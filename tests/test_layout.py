"""The package layout (issue 17): layers import only downwards, no import circle between modules, no module over
450 lines, and no top-level name of ``jaxcryo`` shadows a submodule."""

from __future__ import annotations

import ast
import importlib
import pathlib
import pkgutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jaxcryo"

#: Bottom to top: a module may import from its own layer and the ones before it, never from a later one.
LAYERS = ["errors", "plotting", "jax_util", "ndimage", "rotations", "forward", "io", "data", "parallel", "leastsq",
          "solvers", "post", "poses", "compilation_cache", "__init__", "cli", "__main__"]


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), path, is_pkg


def _imports(name: str, path: pathlib.Path, is_pkg: bool) -> set[str]:
    """Every ``jaxcryo`` module ``name`` imports, at any depth of its code (function-level imports too)."""
    package = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("jaxcryo"):
                continue
            if node.module is None or target in _ALL:  # ``from . import x``: x may be a submodule
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in _ALL else target)
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("jaxcryo"))
    found.discard(name)
    return {f for f in found if f in _ALL}


_ALL = {m for m, _, _ in _modules()}
_GRAPH = {m: _imports(m, p, pkg) for m, p, pkg in _modules()}


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS.index(key)


def test_every_module_has_a_layer():
    missing = sorted({m.split(".")[1] for m in _ALL if "." in m} - set(LAYERS))
    assert not missing, f"modules outside the declared layers: {missing}"


def test_layers_import_only_downwards():
    upward = [(m, t) for m, targets in _GRAPH.items() for t in targets
              if _layer(t) > _layer(m) and not m.endswith("jaxcryo")]
    assert not upward, "imports against the layer order:\n" + "\n".join(f"{m} -> {t}" for m, t in upward)


def test_no_import_circle():
    """No cycle among modules, counting a package's ``__init__`` as importing what it re-exports."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(_GRAPH[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(_GRAPH):
        if m not in state:
            visit(m)


def test_no_subpackage_circle():
    """Between subpackages too (``data`` imports ``io`` and never the reverse)."""
    def pkg(m):
        parts = m.split(".")
        return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else None
    edges = {(pkg(m), pkg(t)) for m, ts in _GRAPH.items() for t in ts if pkg(m) and pkg(t) and pkg(m) != pkg(t)}
    both = sorted((a, b) for a, b in edges if (b, a) in edges)
    assert not both, f"subpackages importing each other: {both}"


def test_modules_at_most_450_lines():
    long = {str(p.relative_to(ROOT)): n for _, p, _ in _modules() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"


def test_top_level_names_do_not_shadow_modules():
    jc = importlib.import_module("jaxcryo")
    subs = {m.name for m in pkgutil.iter_modules(jc.__path__)}
    for name in subs - {"__main__"}:
        importlib.import_module(f"jaxcryo.{name}")
    shadowed = [n for n in jc.__all__ if n in subs and not isinstance(getattr(jc, n), type(jc))]
    assert not shadowed, f"top-level names that hide a submodule: {shadowed}"


@pytest.mark.parametrize("name", ["refine", "abinitio", "RefineSettings", "AbinitioSettings", "reconstruct",
                                  "ReconstructSettings", "SpectralPrior", "Tikhonov"])
def test_headline_names(name):
    jc = importlib.import_module("jaxcryo")
    assert callable(getattr(jc, name))
