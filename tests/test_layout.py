"""The design card's folders must not shadow the standard library, from the repository root."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def run_from_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_subprocess_from_repository_root():
    result = run_from_root("-c", "import subprocess, asyncio, selectors; print(selectors.SelectSelector.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SelectSelector"


def test_python_dash_m_works_from_repository_root():
    result = run_from_root("-m", "winnow.pipelines", "run", "--help")
    assert result.returncode == 0, result.stderr
    assert "--set" in result.stdout


def test_python_dash_m_pytest_collects_from_repository_root():
    result = run_from_root("-m", "pytest", "--collect-only", "-q", "tests/test_config.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_winnow_subpackages_come_from_the_card_folders():
    import winnow.pipelines.job as job
    import winnow.selectors.embedding as embedding

    assert "pipelines" in job.__file__ and "selectors" in embedding.__file__
    assert not (ROOT / "selectors" / "__init__.py").exists()
