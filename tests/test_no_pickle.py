"""No pickle anywhere the project loads or saves, and no eval/exec.

Unpickling a file can run any code it names, so a checkpoint, cache or text encoder from elsewhere
would be a program. Weights, checkpoints and caches are safetensors plus JSON (flux_core.files,
fluxspace/mini/checkpoint.py). The scan reads the code (Python's own parser), not the prose: the
packages explain in docstrings and error messages why they refuse pickles, and
`safetensors.torch.load_file` is not `torch.load`.
"""

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("flux_core", "fluxspace", "weights_tools", "benchmarks")  # plus the notebooks' code cells
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
TORCH_PICKLE = {"load", "save"}  # torch.load / torch.save (and torch.serialization.load / save)


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def forbidden(source: str) -> list[str]:
    """Pickle, torch.load/save, eval and exec used as code in `source`: one line each, with its line number."""
    tree = ast.parse(source)
    # What `torch` is called in this file (import torch as t; import torch.serialization as ser).
    torch_names = {"torch": "torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch") and alias.asname:
                    torch_names[alias.asname] = alias.name
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [
                f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in PICKLE_MODULES:
                found.append(f"{line}: from {module} import ...")
            if module in ("torch", "torch.serialization"):
                found += [
                    f"{line}: from {module} import {a.name}" for a in node.names if a.name in TORCH_PICKLE
                ]
        elif isinstance(node, ast.Name) and node.id in PICKLE_MODULES:
            found.append(f"{line}: {node.id}")
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            head, _, rest = (dotted or "").partition(".")
            full = f"{torch_names[head]}.{rest}" if head in torch_names and rest else None
            if full in {f"{m}.{f}" for m in ("torch", "torch.serialization") for f in TORCH_PICKLE}:
                found.append(f"{line}: {dotted}")
            elif "pickle" in node.attr.lower():  # pandas.read_pickle, obj.to_pickle, ...
                found.append(f"{line}: .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg is not None:
            allow_false = isinstance(node.value, ast.Constant) and node.value.value is False
            if node.arg == "pickle_module" or (node.arg == "allow_pickle" and not allow_false):
                found.append(f"{node.value.lineno}: {node.arg}=")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                found.append(f"{line}: {name}(")
    return found


def sources() -> list[tuple[str, str]]:
    """(name, code) of every scanned Python file and of each notebook's code cells, joined."""
    out = [
        (p.relative_to(ROOT).as_posix(), p.read_text())
        for d in SCANNED
        for p in sorted((ROOT / d).rglob("*.py"))
    ]
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        out.append((p.relative_to(ROOT).as_posix(), code))
    return out


def test_no_pickle_torch_load_eval_or_exec_in_the_code():
    scanned = sources()
    assert {name.split("/")[0] for name, _ in scanned} >= {*SCANNED, "notebooks"}  # the scan found the code
    found = [f"{name}:{hit}" for name, code in scanned for hit in forbidden(code)]
    assert not found, "pickle, torch.load/save, eval or exec in the code:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "code",
    [
        "import pickle",
        "import cloudpickle as cp",
        "from pickle import loads",
        "from torch import load",
        "import torch\nx = torch.load('a.pt', weights_only=True)",
        "import torch\ntorch.save({}, 'a.pt')",
        "import torch as t\nt.load('a.pt')",
        "import torch.serialization as s\ns.load('a.pt')",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "import pandas as pd\npd.read_pickle('a.pkl')",
        "eval('1 + 1')",
        "exec('x = 1')",
        "import builtins\nbuiltins.eval('1')",
    ],
)
def test_the_scan_catches(code):
    assert forbidden(code), code


def test_the_scan_ignores_prose_and_lookalikes():
    code = '''
"""Why there is no torch.load, pickle, eval( or exec( here."""
import numpy as np
import safetensors.torch
# torch.load(path) would unpickle
PICKLE_SUFFIXES = (".bin",)
message = "holds only pickle weights; eval(...) and exec(...) are not used"
tensors = safetensors.torch.load_file("a.safetensors")
data = safetensors.torch.save(tensors)
faces = np.load("faces.npz", allow_pickle=False)
model.eval()
'''
    assert forbidden(code) == []
