"""The wheel ships every package: pyproject lists packages by hand (convert/, chat/ and
metal_kernels/ are mapped under mlx_deepseek), so a new subpackage must be added there or a
plain `pip install .` (not editable) would lack it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_in_the_wheel():
    from setuptools.config.pyprojecttoml import read_configuration  # any Python we support

    setup = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]
    listed = set(setup["packages"])
    dirs = setup["package-dir"]
    found = set()
    for name, folder in dirs.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
                continue
            found.add(".".join([name, *rel.parts]))
    missing = sorted(found - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    assert listed <= found, sorted(listed - found)
