"""The quickstart notebook runs top to bottom in a fresh kernel (its own local Ray) and shows real results."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.integration  # the notebook starts its own local Ray in a kernel

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _result_of(cell: nbformat.NotebookNode) -> str:
    results = [output["data"]["text/plain"] for output in cell.outputs if output["output_type"] == "execute_result"]
    assert results, f"cell shows no result: {cell.source[:80]!r}"
    return results[-1]


def test_quickstart_notebook_executes(tmp_path: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    mean_metrics = _result_of(code_cells[3])
    assert "image_auroc" in mean_metrics and "pixel_auroc" in mean_metrics
    prediction = _result_of(code_cells[4])
    assert "'is_anomalous'" in prediction and "'heatmap'" in prediction
