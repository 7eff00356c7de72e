"""The repository's layout: devtools/ (what tests and benchmarks share) stays outside the installed package."""

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def devtools_uses(path: Path) -> list[str]:
    """Every place in `path` that imports devtools or names one of its modules for `python -m` / import_module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names if re.fullmatch(r"devtools(\..+)?", n)]
    return found


def test_fastross_never_imports_devtools():
    files = sorted((REPO / "fastross").rglob("*.py")) + sorted((REPO / "kernels").rglob("*.py"))
    assert len(files) > 50
    assert [use for f in files for use in devtools_uses(f)] == []
    # the scan sees the imports that are there: the fault benchmark's, and the launcher it names for torchrun
    bench = devtools_uses(REPO / "benchmarks" / "faults.py")
    assert any(u.endswith(": devtools") for u in bench) and any(u.endswith(": devtools.fault_train") for u in bench)


def test_wheel_ships_fastross_only():
    """pyproject.toml's wheel.packages maps fastross and its kernels only: `pip install` leaves devtools/ out."""
    if sys.version_info < (3, 11):
        import pytest

        pytest.skip("tomllib is Python 3.11's")
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["scikit-build"]["wheel"]["packages"]
    assert packages == {"fastross": "fastross", "fastross/kernels": "kernels"}
    assert (REPO / "devtools" / "__init__.py").is_file()
