"""benchmarks/ and notebooks/ hold scripts, not packages: tests import a script by its path."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NOTEBOOKS = BENCHMARKS.parent / "notebooks"


def load_script(name: str, folder: Path = BENCHMARKS):
    """The module of <folder>/<name>.py (default: benchmarks/), imported by path."""
    spec = importlib.util.spec_from_file_location(f"{folder.name}_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
