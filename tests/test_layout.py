"""The package's shape: the layer contracts hold, and every module says its one job."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "daemon" / "segd"
REPO = PACKAGE.parents[1]


def test_layer_contracts_are_kept() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (it comes with the dev extra)")
    done = subprocess.run([lint, "--config", str(REPO / "pyproject.toml")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("module", sorted(PACKAGE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_opens_with_a_docstring(module: Path) -> None:
    if module.name == "__main__.py":
        return
    doc = ast.get_docstring(ast.parse(module.read_text(encoding="utf-8")))
    assert doc, f"{module} has no docstring saying what it is for"
