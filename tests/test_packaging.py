"""A regular (non-editable) install holds every package of the checkout: pyproject.toml lists each one."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_package_folder_is_listed_for_a_regular_install():
    """An editable install finds a missing package in the checkout anyway; a wheel silently leaves it out (as it
    once did with qcompiler.driver: `pip install .` gave a qcompile that could not quantize)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder_of = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    listed = set(setuptools["packages"])
    found = set()
    for top in ("qcompiler", "qcompiler.passes", "qcompiler.kernels"):
        base = folder_of[top]
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((top, *rel)))
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == set(), "these listed packages have no folder"
