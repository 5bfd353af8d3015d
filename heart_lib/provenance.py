"""Content digests of what results depend on: the library's source and the packages it imports.

`code_digest(*modules)` digests only the heart_lib modules that `modules` depend on: the transitive
closure of their heart_lib imports, read with `ast` (imports inside functions included, and the
`__init__` of every package on the way, since importing a submodule runs them). Caches and the
runner's notebook keys use it, so an edit to an unrelated module invalidates nothing.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from heart_lib.paths import PROJECT_ROOT

LIBRARY_DIR = Path(__file__).resolve().parent


def digest_files(paths: list[Path], root: Path) -> str:
    """SHA-256 over (relative name, content) of `paths`, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@lru_cache(maxsize=1)
def library_digest() -> str:
    """Digest of heart_lib's Python source and data files (profiles excluded: they are parameters)."""
    files = [p for p in LIBRARY_DIR.rglob("*") if p.is_file() and p.suffix in {".py", ".yaml", ".json"}
             and "__pycache__" not in p.parts]
    return digest_files(files, LIBRARY_DIR)


PACKAGE = "heart_lib"


def module_file(name: str) -> Path | None:
    """The source file of heart_lib module `name` (a package's `__init__.py`), or None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = LIBRARY_DIR.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(source: str, module: str = PACKAGE) -> set[str]:
    """heart_lib modules that `source` (of module `module`) imports anywhere, lazily or not."""
    found: set[str] = set()
    package = module if module_file(module) and module_file(module).name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            found.add(base)
            # `from heart_lib import data` imports a module, `from heart_lib.x import f` a name
            found.update(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}"))
    return {m for m in found if module_file(m)}


@lru_cache(maxsize=None)
def module_closure(*roots: str) -> frozenset[str]:
    """`roots` and every heart_lib module they import, transitively, with their parent packages."""
    todo, seen = list(roots), set()
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages' __init__ run too
        todo += sorted(imported_modules(module_file(name).read_text(), name))
    unknown = [r for r in roots if module_file(r) is None]
    if unknown:
        raise ValueError(f"modules {unknown} are not heart_lib modules")
    return frozenset(seen)


def code_digest(*roots: str) -> str:
    """Digest of the source of `roots` and every heart_lib module they depend on (see module
    docstring), and of the installed versions of the packages those modules import (with everything
    those packages require): a new torch re-runs the chapters, a new documentation tool does not."""
    closure = module_closure(*roots)
    h = hashlib.sha256(digest_files([module_file(m) for m in closure], LIBRARY_DIR).encode())
    for pin in package_versions(frozenset().union(*(third_party_imports(module_file(m).read_text())
                                                     for m in closure))):
        h.update(pin.encode() + b"\0")
    return h.hexdigest()


def third_party_imports(source: str) -> set[str]:
    """Top-level names of the non-heart_lib modules `source` imports anywhere (stdlib included)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - {PACKAGE}


@lru_cache(maxsize=1)
def _providers() -> dict[str, list[str]]:
    """Import name -> the installed distributions providing it (a scan of every installed package)."""
    from importlib import metadata

    return metadata.packages_distributions()


@lru_cache(maxsize=None)
def package_versions(import_names: frozenset[str]) -> tuple[str, ...]:
    """'name==version' of the installed distributions providing `import_names` (the standard
    library provides none) and of every distribution they require, transitively."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    providers = _providers()
    todo = sorted({dist for name in import_names for dist in providers.get(name, ())})
    seen: dict[str, str] = {}
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name == PACKAGE.replace("_", "-"):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return tuple(f"{n}=={v}" for n, v in sorted(seen.items()))


def modules_in(source: str) -> tuple[str, ...]:
    """heart_lib modules a piece of code (a notebook's cells) imports."""
    return tuple(sorted(imported_modules(source)))


def notebook_modules(code_cells: Iterable[str]) -> tuple[str, ...]:
    """heart_lib modules imported by a notebook's code cells (IPython magics skipped)."""
    lines = [line for cell in code_cells for line in cell.splitlines() if not line.lstrip().startswith(("%", "!"))]
    return modules_in("\n".join(lines))
