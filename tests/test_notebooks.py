"""The notebooks run from top to bottom on the shipped flux-mini, and the checks they make hold.

Each notebook asserts what it shows (the forward taken apart equals model(...), the sweep's
lambda = 0 is the original, the training loss falls), so running it is a test of the code it uses.
"""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 600  # seconds; the longest cell (03's training run) takes about a minute on 2 CPU cores
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


@pytest.mark.parametrize("name", ["01_anatomy.ipynb", "02_fluxspace.ipynb", "03_training.ipynb"])
def test_notebook_runs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    try:
        client.execute()
    except CellExecutionError as error:  # its message holds the failing cell's source and traceback
        pytest.fail(f"{name} failed:\n{ANSI_COLOUR.sub('', str(error))}", pytrace=False)
