"""The library map (heart_lib's docstring) names every module, and module-level imports only point
to modules above the importer in it (one-way layering, no cycles)."""

from __future__ import annotations

import ast
import re

import heart_lib
from heart_lib.provenance import LIBRARY_DIR


def _map_order() -> list[str]:
    order = []
    for line in heart_lib.__doc__.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            order += [name.split(".")[0] for name in re.findall(r"`([\w.<>]+)`", first)]
    return order


def _top_modules() -> set[str]:
    return {p.stem if p.is_file() else p.name for p in LIBRARY_DIR.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").is_file()) and p.stem not in ("__init__", "__main__")}


def test_map_names_every_module():
    assert set(_map_order()) == _top_modules()


def test_module_level_imports_point_up_the_map():
    rank = {name: i for i, name in enumerate(_map_order())}
    upward = []
    for path in LIBRARY_DIR.rglob("*.py"):
        top = path.relative_to(LIBRARY_DIR).parts[0].removesuffix(".py")
        if top in ("__init__", "__main__"):
            continue
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are allowed
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if isinstance(node, ast.ImportFrom) and names == ["heart_lib"]:  # from heart_lib import data
                names = [f"heart_lib.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "heart_lib" and len(parts) > 1 and parts[1] != top and rank[parts[1]] > rank[top]:
                    upward.append(f"{path.relative_to(LIBRARY_DIR)} imports {name}")
    assert not upward
