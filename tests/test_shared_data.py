"""A clone without ``../shared``: the real-data tests skip, saying where the data go; not on CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A test of the ``shared_data`` fixture and a tutorial that reads the real data.
NEEDS_DATA = [
    "tests/jind/test_real_data.py::test_cellbench_celseq_to_dropseq",
    "tests/test_tutorials.py::test_tutorial_runs[scnym_kang]",
]


def _pytest_without_data(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["LABELTRANSFER_DATA"] = str(tmp_path / "no_shared_data")
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-rsfE", "-q", "-p", "no:cacheprovider"]
    return subprocess.run(
        [*command, *NEEDS_DATA], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_real_data_tests_skip_saying_where_the_data_go(tmp_path):
    run = _pytest_without_data(tmp_path, ci=None)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 skipped" in run.stdout
    reason = (
        f"the real data sets are not at {tmp_path / 'no_shared_data'}: put the project's "
        "shared data in ../shared/data beside the clone (or set LABELTRANSFER_DATA"
    )
    assert run.stdout.count(reason) == 2, run.stdout


def test_missing_real_data_fails_on_ci(tmp_path):
    run = _pytest_without_data(tmp_path, ci="true")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 1 error" in run.stdout  # the fixture errs, the tutorial test fails
    assert "skipped" not in run.stdout
    assert "CI=true and the real data sets are not at" in run.stdout
