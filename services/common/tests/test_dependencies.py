"""mesh_common imports only what its pyproject.toml brings: a service that installs it must not need more."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

COMMON = Path(__file__).resolve().parents[1]


def brought(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, theirs included, extras asked for included."""
    found: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found.add(name)
        for extra_asked in requirement.extras or {""}:
            todo.extend((Requirement(r), extra_asked) for r in requires(name) or [])
    return found


def imported_at_module_level(package: Path) -> set[str]:
    # Module level only: an import inside a function may be optional
    # (serve.py's uvloop, in every service's own dependencies).
    names: set[str] = set()
    for module in package.rglob("*.py"):
        for node in ast.parse(module.read_text()).body:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "mesh_common"}


def test_every_module_level_import_is_brought_by_the_declared_dependencies() -> None:
    declared = tomllib.loads((COMMON / "pyproject.toml").read_text())["project"]["dependencies"]
    available = brought(declared)
    distributions = packages_distributions()
    missing = {
        name
        for name in imported_at_module_level(COMMON / "mesh_common")
        if not {canonicalize_name(d) for d in distributions.get(name, [name])} & available
    }
    assert not missing, f"mesh_common imports {sorted(missing)}, which its dependencies do not bring"
