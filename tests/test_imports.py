"""Every module of the three packages imports, and --help does not import heavy libraries."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ["lightning_modules", "datamodules", "callbacks"]


def _module_names() -> list[str]:
    names = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.append(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _module_names())
def test_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_help_skips_heavy_imports() -> None:
    probe = (
        "import sys, runpy; sys.argv = ['train.py', '--help']\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('diffusers', 'peft', 'lightning_modules.sciie') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert "fit" in result.stdout
    assert "HEAVY []" in result.stdout
