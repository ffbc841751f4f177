"""Execute every tutorial notebook, with few epochs, so that the tutorials keep working."""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbclient.exceptions
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))

#: Epochs the notebooks train for in this test (they read LABELTRANSFER_TUTORIAL_EPOCHS).
EPOCHS = "3"


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebook found in {TUTORIALS}"


def _reads_shared_data(notebook: nbformat.NotebookNode) -> bool:
    """Whether a notebook reads the real data sets (through $LABELTRANSFER_DATA)."""
    return any(
        "LABELTRANSFER_DATA" in cell.source for cell in notebook.cells if cell.cell_type == "code"
    )


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.shared_data)
        if _reads_shared_data(nbformat.read(p, as_version=4))
        else p
        for p in NOTEBOOKS
    ],
    ids=[p.stem for p in NOTEBOOKS],
)
def test_tutorial_runs(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
):
    """Run the notebook top to bottom in a fresh kernel; any cell error fails the test.

    A notebook that reads the real data sets skips without them (fails under ``CI=true``).
    """
    notebook = nbformat.read(path, as_version=4)
    if request.node.get_closest_marker("shared_data"):
        monkeypatch.setenv("LABELTRANSFER_DATA", str(request.getfixturevalue("shared_data")))
    monkeypatch.setenv("LABELTRANSFER_TUTORIAL_EPOCHS", EPOCHS)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # run in a scratch folder
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}")
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, f"{path.name} stored error outputs: {errors}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_is_stored_executed(path: Path):
    """The docs render the stored outputs (no execution at build time): they must be there."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.get("execution_count") for cell in code]
    assert all(c is not None for c in counts), (
        f"{path.name} has unexecuted cells; run "
        f"`jupyter nbconvert --to notebook --execute --inplace tutorials/{path.name}`"
    )
    assert counts == sorted(counts), f"{path.name} was not executed top to bottom"
    assert not any(
        output.get("output_type") == "error" for cell in code for output in cell.get("outputs", [])
    ), f"{path.name} has stored error outputs"
