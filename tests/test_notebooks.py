"""The example notebooks execute top to bottom without errors (at their default, CPU-sized settings)."""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, monkeypatch_module):
    """A ``python3`` kernelspec that runs *this* interpreter, first on ``JUPYTER_PATH``.

    Without it, ``python3`` resolves to whichever spec Jupyter finds first (a user-wide one may point at
    another Python without jaxcryo); jupyter_client only substitutes ``sys.executable`` for a bare
    ``python`` in ``argv``.
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (jaxcryo tests)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch_module.setenv("JUPYTER_PATH", str(root))
    monkeypatch_module.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_notebooks_found():
    assert NOTEBOOKS == ["01_forward_model.ipynb", "02_conditioning.ipynb", "03_sgd_vs_psgd.ipynb",
                         "04_your_data.ipynb", "05_refine.ipynb"]


def test_notebooks_committed_without_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name} has outputs; clear them"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, kernel_env):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    # The kernel ran this interpreter (the one with jaxcryo installed), not another Python.
    check = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    nbclient.NotebookClient(check, timeout=60, kernel_name="python3").execute()
    assert check.cells[0].outputs[0].text.strip() == sys.executable
    # Every notebook draws at least one figure.
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
