"""The notebooks run from top to bottom (01-03 on the shipped flux-mini, 04 on a tiny random FLUX.2),
and the checks they make hold.

Each notebook asserts what it shows (the forward taken apart equals model(...), the sweep's
lambda = 0 is the original, the training loss falls, FLUX.2's zero-strength edit is plain generate),
so running it is a test of the code it uses.
"""

import re

import pytest
from nbclient.exceptions import CellExecutionError
from scripts import NOTEBOOKS, load_script

execute = load_script("execute", NOTEBOOKS)  # the same runner that stores them with their outputs
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


@pytest.mark.parametrize(
    "name", ["01_anatomy.ipynb", "02_fluxspace.ipynb", "03_training.ipynb", "04_flux2.ipynb"]
)
def test_notebook_runs(name):
    try:
        execute.execute(execute.NOTEBOOKS / name)  # from scratch: stored outputs are cleared first
    except CellExecutionError as error:  # its message holds the failing cell's source and traceback
        pytest.fail(f"{name} failed:\n{ANSI_COLOUR.sub('', str(error))}", pytrace=False)
