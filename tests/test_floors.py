"""Imports point down (ARCHITECTURE.md, "Floors"): no module imports one on a higher floor,
except the arrows listed here, each waiting for the change that removes it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("capfilt", "schemas", "model", "pipeline", "flows")
# Storage: run layout, manifest, lineage, curated reader, how Ray starts, the stage summary; and typed configs by
# field name and as JSON. They live in pipeline/ beside the stages but import nothing above the bottom floor, so
# every floor may use them.
BOTTOM = {"capfilt", "capfilt.errors", "capfilt.device", "capfilt.logs", "capfilt.environment", "capfilt.packages",
          "pipeline.run_store", "pipeline.lineage", "pipeline.curated", "pipeline.ray_env", "pipeline.summary",
          "pipeline.configs"}
KNOWN_UP: set[tuple[str, str]] = set()  # an arrow that must point up for a while goes here, with why


def floor(module: str) -> int:
    """0 errors/device/schemas/storage, 1 model, 2 stages, 3 flows and presets, 4 CLI."""
    top = module.split(".")[0]
    if top == "schemas" or module in BOTTOM:
        return 0
    if top == "model":
        return 1
    if top == "pipeline":
        return 2
    if top == "flows" or module == "capfilt.presets":
        return 3
    return 4  # capfilt.cli, capfilt.commands.*


def module_of(name: str) -> str | None:
    """The longest prefix of a dotted name that is one of capfilt's modules or packages."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        path = ROOT.joinpath(*parts[:i])
        if parts[0] in PACKAGES and (path.with_suffix(".py").exists() or (path / "__init__.py").exists()):
            return ".".join(parts[:i])
    return None


def imports(path: Path, module: str) -> set[str]:
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            out |= {f"{base}.{a.name}" for a in node.names}  # a module, or a name in `base` (resolved below)
    return {m for m in map(module_of, out) if m}


def upward_imports() -> set[tuple[str, str]]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found |= {(module, target) for target in imports(path, module) if floor(target) > floor(module)}
    return found


def test_imports_point_down():
    up = upward_imports()
    assert up - KNOWN_UP == set(), f"imports from a lower floor to a higher one: {sorted(up - KNOWN_UP)}"
    # an exception fixed is an exception removed from the list
    assert KNOWN_UP - up == set(), f"no longer imported, remove from KNOWN_UP: {sorted(KNOWN_UP - up)}"


def test_the_check_sees_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from flows.params import BootstrapParams\nfrom . import run_store\n")
    assert imports(probe, "pipeline.probe") == {"flows.params", "pipeline.run_store"}
    assert floor("flows.params") > floor("pipeline.probe") > floor("pipeline.run_store")
