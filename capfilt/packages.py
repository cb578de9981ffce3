"""capfilt's own top-level packages, and the guard that they are the ones Python imports.

capfilt's wheel installs five top-level packages beside each other (pyproject's
`[tool.hatch.build.targets.wheel] packages`): `capfilt` and the floors the design names,
`pipeline`, `flows`, `model` and `schemas`. Those names are common; another distribution that
installs a `model` or `schemas` package into the same environment, or a folder of that name in
the working directory, would be imported instead and fail far from the cause. Two guards:
- at start-up, `check_own_packages()` finds each package without importing it and refuses one
  that does not sit next to `capfilt` (in a wheel install: the same site-packages; in a
  checkout: the repo root), naming the file that shadows it;
- tests/test_packages.py checks that no other installed distribution declares one of the names.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from capfilt.errors import ConfigError

OWN_PACKAGES = ("capfilt", "schemas", "model", "pipeline", "flows")  # bottom floor to top (capfilt: errors .. CLI)


def _location(name: str) -> Path | None:
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
    return Path(origin).resolve() if origin else None


def check_own_packages() -> None:
    """Raise ConfigError when one of capfilt's packages would be imported from somewhere else."""
    home = Path(__file__).resolve().parent.parent
    for name in OWN_PACKAGES[1:]:
        where = _location(name)
        if where is None:
            raise ConfigError(f"capfilt's package '{name}' is missing next to {home / 'capfilt'}; reinstall capfilt "
                              f"(uv sync, or pip install the capfilt wheel).")
        if where.parent.parent != home or where.name != "__init__.py":
            raise ConfigError(f"'import {name}' finds {where}, not capfilt's {home / name}: another package or a "
                              f"folder named '{name}' shadows it. Uninstall that package or run capfilt from another "
                              f"directory / environment.")
