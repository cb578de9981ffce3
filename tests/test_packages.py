"""capfilt's generic top-level package names (model, pipeline, flows, schemas) cannot be shadowed silently."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capfilt.errors import ConfigError
from capfilt.packages import OWN_PACKAGES, check_own_packages

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_exactly_capfilts_own_packages():
    import tomllib

    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert sorted(wheel["packages"]) == sorted(OWN_PACKAGES)


def test_the_built_wheel_holds_the_packages_and_their_data_files(tmp_path):
    """What a pip install gets: every package, and the files code reads next to it (the named
    Q-Former architectures model/factory.py lists, the report templates)."""
    import shutil
    import zipfile

    from model.factory import architectures

    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv builds the wheel (hatchling); not on PATH here")
    out = subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = tmp_path.glob("capfilt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names if "/" in name and ".dist-info" not in name} == set(OWN_PACKAGES)
    assert {f"model/configs/{name}.json" for name in architectures()} <= names
    assert architectures() and "pipeline/templates/filter.html" in names
    assert "model/toy/__init__.py" in names


def test_no_other_installed_distribution_declares_one_of_the_names():
    owners = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name or name.lower() == "capfilt":
            continue
        top = set((dist.read_text("top_level.txt") or "").split())
        top |= {Path(f.parts[0]).stem for f in (dist.files or []) if len(f.parts) > 1 and f.parts[0].isidentifier()}
        for package in set(OWN_PACKAGES) & top:
            owners.setdefault(package, []).append(name)
    assert owners == {}, f"installed distributions also provide capfilt's package names: {owners}"


def test_the_guard_passes_here_and_names_a_shadowing_folder(tmp_path):
    check_own_packages()  # this checkout: every package sits next to capfilt
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Python puts the working directory first for `-c`: a folder named schemas there wins
    out = subprocess.run([sys.executable, "-c", "from capfilt.cli import main; main(['--help'])"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        f"capfilt: error: 'import schemas' finds {(tmp_path / 'schemas' / '__init__.py').resolve()}, not capfilt's "
        f"{ROOT / 'schemas'}: another package or a folder named 'schemas' shadows it. Uninstall that package or run "
        f"capfilt from another directory / environment."]


def test_a_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("capfilt.packages._location", lambda name: None if name == "flows" else ROOT / name / "__init__.py")
    with pytest.raises(ConfigError, match="capfilt's package 'flows' is missing"):
        check_own_packages()
