"""Run every notebook from top to bottom and store it with its outputs, so that a reader browsing the
repository sees the figures.

    .venv/bin/python notebooks/execute.py [NAME.ipynb ...]      # default: all of them

Each notebook is executed from scratch (outputs cleared first) in the notebooks/ folder, then
written back atomically. Run-to-run noise is kept out of the stored file (no execution timings, no
loading bars, execution counts from 1): a rerun changes only what a notebook prints of its own
timing (03's training seconds and its temporary folder). tests/test_notebooks.py executes the same notebooks the same way.
"""

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from flux_core.atomic import atomic_file

NOTEBOOKS = Path(__file__).resolve().parent
CELL_TIMEOUT = 600  # seconds; the longest cell (03's training run) takes about a minute on 2 CPU cores


def execute(path: Path) -> nbformat.NotebookNode:
    """The notebook at `path`, cleared and executed in its folder."""
    # No download bars from transformers' loaders in the stored outputs (they only add timings).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=CELL_TIMEOUT, record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )  # fmt: skip
    return client.execute()


def main(names: list[str]) -> int:
    paths = [NOTEBOOKS / n for n in names] if names else sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        notebook = execute(path)
        with atomic_file(path, "w") as f:
            nbformat.write(notebook, f)
        print(f"{path.name}: executed and stored with its outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
