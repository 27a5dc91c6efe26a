"""The notebooks run from top to bottom on the shipped flux-mini, and the checks they make hold.

Each notebook asserts what it shows (the forward taken apart equals model(...), the sweep's
lambda = 0 is the original, the training loss falls), so running it is a test of the code it uses.
"""

import re

import pytest
from nbclient.exceptions import CellExecutionError
from scripts import NOTEBOOKS, load_script

execute = load_script("execute", NOTEBOOKS)  # the same runner that stores them with their outputs
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


@pytest.mark.parametrize("name", ["01_anatomy.ipynb", "02_fluxspace.ipynb", "03_training.ipynb"])
def test_notebook_runs(name):
    try:
        execute.execute(execute.NOTEBOOKS / name)  # from scratch: stored outputs are cleared first
    except CellExecutionError as error:  # its message holds the failing cell's source and traceback
        pytest.fail(f"{name} failed:\n{ANSI_COLOUR.sub('', str(error))}", pytrace=False)
