"""The package layers (README, "Library map") as a contract: imports only point down, no circles.

Every ``import``/``from ... import`` of ``lclsc_jax`` is read with ``ast``, including those inside
functions (they hide edges from a plain import graph).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "lclsc_jax"

# Lowest first. A package may import its own modules and any package of a lower layer.
LAYERS = (
    ("method", "models", "evaluate"),
    ("data", "interop"),
    ("explain", "train"),
    ("protocols",),
    ("cli",),
)
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _module_name(path: pathlib.Path) -> str:
    parts = ["lclsc_jax", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """The ``lclsc_jax`` modules ``path`` imports (absolute names, at any depth of the file)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("lclsc_jax"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("lclsc_jax"):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names
                           if (ROOT.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                           or (ROOT.parent / f"{base}.{a.name}".replace(".", "/") / "__init__.py").exists())
    return out


GRAPH = {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_package_has_a_layer():
    assert {_package(m) for m in GRAPH if _package(m)} == set(RANK)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    here = _package(module)
    if not here:
        return
    up = sorted(m for m in GRAPH[module] if _package(m) and _package(m) != here and RANK[_package(m)] >= RANK[here])
    assert not up, f"{module} imports {up}: same or higher layer than {here!r} ({LAYERS})"


def test_no_import_circle_between_modules():
    # Module-level edges only through packages' own modules; __init__ re-exports are edges too.
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH.get(m, ())):
            if n not in GRAPH or n == m or m.startswith(n + "."):  # a module importing its own package's face
                continue
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_building_the_cli_parser_imports_no_jax():
    # `lclsc --help` and every subcommand's --help must not pay for JAX (seconds on a small machine).
    import subprocess
    import sys

    code = ("import sys, lclsc_jax.cli as c; c.build_parser(); "
            "heavy = sorted(m for m in ('jax', 'flax', 'optax', 'tensorflow_datasets', 'grain', 'torch') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
